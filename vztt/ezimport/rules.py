"""How vztt reads the files of an EZ template (OpenVZ/vztt src/util.c, src/template.c).

Every reader skips blank lines and lines whose first non-blank character is
`#`, and strips blanks at both ends (cut_off_string). Then:

  words   split on spaces and tabs (string_list_read2): packages, packages_1,
          technologies, upgradable_versions
  lines   one entry per line (string_list_read): environment, packages_0,
          description, repositories, mirrorlist
  first   the first line only (read_string): package_manager, distribution,
          osrelease, summary, cache_type, multiarch, golden_image

Each entry keeps its line number, so that a message can name `file:line`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import RecipeError


class EzImportError(RecipeError):
    """An EZ template that cannot be imported: one line naming the file (and line)."""

    kind = "import"


@dataclass(frozen=True)
class EzFile:
    """One file of an EZ template, as read from the source."""

    name: str            # its name in the template directory (packages, post-install...)
    where: str           # what messages name: the file in the source (a spec tree's os_packages...)
    data: bytes
    executable: bool     # vztt runs a script only if it is executable (access(X_OK))


@dataclass(frozen=True)
class Entry:
    line: int
    text: str


def text_of(f: EzFile) -> str:
    """The file as text; a file that is not (NUL bytes, not UTF-8) is one line naming it."""
    if b"\0" in f.data:
        raise EzImportError(f"{f.where}: not a text file (it holds NUL bytes)")
    try:
        return f.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EzImportError(f"{f.where}: not a text file (not UTF-8 at byte {e.start})") from None


def lines(f: EzFile) -> list[Entry]:
    out = []
    for number, raw in enumerate(text_of(f).splitlines(), 1):
        text = raw.strip()
        if text and not text.startswith("#"):
            out.append(Entry(number, text))
    return out


def words(f: EzFile) -> list[Entry]:
    return [Entry(e.line, w) for e in lines(f) for w in e.text.split()]


def first(f: EzFile) -> Entry | None:
    found = lines(f)
    return found[0] if found else None


def read_file(path: Path, where: str | None = None) -> EzFile:
    try:
        data = path.read_bytes()
        executable = bool(path.stat().st_mode & 0o111)
    except OSError as e:
        raise EzImportError(f"{path}: cannot read: {e.strerror}") from None
    return EzFile(name=path.name, where=where or str(path), data=data, executable=executable)
