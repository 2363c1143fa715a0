"""The recipe's own touches after the packages: files, hooks, final cleaning.

Every write and removal goes through base/inroot.py: paths are resolved inside
the image with chroot semantics (a symlink in the image that points to /etc
points to the image's /etc, `..` stops at the image root), by the kernel
(openat2 RESOLVE_IN_ROOT), and a link at the name itself is replaced, never
written through, so no recipe file and no link planted by a package or a hook
can make a write land on the host.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.base.inroot import UnsafePath, clear_in_root, stat_in_root, write_in_root
from vztt.base.proc import TOOL_ENV, Log, run
from vztt.recipe.recipe import FileSpec, Hook

MAX_LINKS = 40


def path_in_root(root: Path, path: str) -> Path:
    """Host path of `path` in the image; intermediate symlinks followed inside root, the last one not.
    For reading a tree nobody changes meanwhile (tests, reports); writes go through base.inroot."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    todo = parts[:-1]
    while todo:
        part = todo.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > MAX_LINKS:
                raise BuildError(f"{path}: too many levels of symbolic links in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        resolved.append(part)
    if not parts:
        raise BuildError(f"{path!r}: not a file path")
    return root.joinpath(*resolved, parts[-1])


def write_files(root: Path, files: tuple[FileSpec, ...]) -> None:
    for f in files:
        try:
            write_in_root(root, f.path, f.content, f.mode, f.uid, f.gid)
        except UnsafePath as e:
            raise BuildError(f"files[{f.path}]: {e}") from None


def run_hooks(root: Path, hooks: tuple[Hook, ...], env: dict[str, str], log: Log, recipe_name: str) -> None:
    for h in hooks:
        what = f"{recipe_name}: hook {h.name} ({h.where})"
        if h.where == "image":
            run(["chroot", str(root), "/bin/sh", "-e", "-c", h.script], log=log, what=what,
                env={**TOOL_ENV, **env})
        else:
            run(["/bin/sh", "-e", "-c", h.script], log=log, what=what, cwd=root,
                env={**TOOL_ENV, **env, "VZTT_ROOT": str(root)})


def clean_root(root: Path) -> None:
    """What no template should carry, whatever its distro (mmdebstrap's list)."""
    st = stat_in_root(root, "etc/machine-id")
    if st is not None and stat.S_ISREG(st.st_mode):
        # empty: systemd makes one at first boot; owner and mode as the package left them
        write_in_root(root, "etc/machine-id", b"", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    for rel in ("run", "tmp"):
        clear_in_root(root, rel)
