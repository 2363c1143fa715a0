"""What a recipe may name, checked when it is loaded: package names by its distro's
rules, and files (`files[].source`, `hooks[].script`) inside the recipes directory.

A package name reaches apt and dnf: one that starts with `-` would be read as an
option (`-oAPT::Architecture=i386`), so each name must be one its distro could
have. Debian policy: lower-case letters, digits, `+ - .`, starting with a letter
or digit, at least two characters (apt also takes `name:arch`). dnf takes
specs: names (with version, release, arch, globs), provides such as
`perl(File::Temp)` or `system-release(releasever) = 9`, `@group` and
`@^environment` ids, and file paths (`/usr/bin/sh`). The backends also pass
`--` before names wherever a tool takes options.

A recipe's files are read on any machine that loads it (`vztt show`, `vztt
list`), so a source path must resolve (symlinks followed) to a regular file in
the recipes directory: no `/etc/shadow`, no `/proc/self/environ`, no symlink
under files/ that leads out.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from vztt.base.errors import RecipeError

DEB_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?")
DEB_WORDS = "Debian package names are lower-case letters, digits, '+', '-' and '.', start with a letter or digit " \
            "and have two characters at least (optionally ':arch')"
_RPM_WORD = r"[A-Za-z0-9_][A-Za-z0-9_.+~^:*?\[\]-]*"          # a name, name-version.arch, a glob
_RPM_PROVIDE = rf"{_RPM_WORD}(\([A-Za-z0-9_.+:/=@~ -]*\))*( ?(=|<|>|<=|>=) ?[A-Za-z0-9_.+~^:-]+)?"
RPM_SPEC = re.compile(rf"{_RPM_PROVIDE}|@\^?[A-Za-z0-9_][A-Za-z0-9_.:-]*|/[A-Za-z0-9_.+@/-]+")
RPM_WORDS = "dnf takes a package name (name-version.arch, globs), a provide (name(...) [= version]), an @group " \
            "or an absolute file path"
MAX_SOURCE = 64 << 20          # a recipe file bigger than this is a mistake


def check_packages(family: str, names: list[str] | tuple[str, ...], where: str) -> None:
    """Every name is one the distro family's tools take as a package name, never an option."""
    rule, words = (DEB_NAME, DEB_WORDS) if family == "apt" else (RPM_SPEC, RPM_WORDS)
    for name in names:
        if not rule.fullmatch(name):
            raise RecipeError(f"{where}: {name!r} is not a package name ({words})")


def confined_file(recipe: Path, ref: str, label: str) -> Path:
    """The file `ref` names (relative to the recipe file that names it), after symlinks:
    a regular file inside the recipes directory (the recipe's own), or a RecipeError."""
    top = recipe.parent.resolve()
    path = (recipe.parent / ref).resolve()
    if not path.is_relative_to(top):
        raise RecipeError(f"{label}: {ref!r} resolves to {path}, outside the recipes directory {top} "
                          "(recipe files must live in it)")
    try:
        st = path.stat()
    except OSError:
        raise RecipeError(f"{label}: no such file {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{label}: {path} is not a regular file")
    return path


def read_confined(path: Path, label: str) -> bytes:
    """The bytes of a file confined_file() accepted (not through a link swapped in since)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RecipeError(f"{label}: cannot read {path}: {e.strerror}") from None
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise RecipeError(f"{label}: {path} is not a regular file")
        data = fh.read(MAX_SOURCE + 1)
    if len(data) > MAX_SOURCE:
        raise RecipeError(f"{label}: {path} is over {MAX_SOURCE >> 20} MiB")
    return data


def as_text(data: bytes, path: Path, label: str, why: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{label}: {path} is not UTF-8 text (byte {e.start}), which {why}") from None
