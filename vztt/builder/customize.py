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
import re
import secrets
import shutil
import stat
import string
import tempfile
import uuid
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.base.inroot import UnsafePath, clear_in_root, mkdir_in_root, remove_in_root, stat_in_root, write_in_root
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


def run_hooks(root: Path, hooks: tuple[Hook, ...], env: dict[str, str], log: Log, recipe_name: str,
              phase: str = "after-packages", work: Path | None = None) -> int:
    """Run the hooks of one phase, in the recipe's order; how many ran. `work`: scratch
    outside the image for host scripts of the `ez` convention."""
    ran = [h for h in hooks if h.phase == phase]
    for h in ran:
        what = f"{recipe_name}: hook {h.name} ({h.where})"
        if h.convention == "ez":
            _run_ez(root, h, env, log, what, ez_ctid(recipe_name), work or root.parent)
        elif h.where == "image":
            run(["chroot", str(root), "/bin/sh", "-e", "-c", h.script], log=log, what=what,
                env={**TOOL_ENV, **env})
        else:
            run(["/bin/sh", "-e", "-c", h.script], log=log, what=what, cwd=root,
                env={**TOOL_ENV, **env, "VZTT_ROOT": str(root)})
    return len(ran)


def ez_ctid(recipe_name: str) -> str:
    """The CTID an `ez` script is given: Virtuozzo 7's ids are UUIDs; one per template, so that
    a rebuild runs the scripts with the same arguments."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vztt:ctid:{recipe_name}"))


def _run_ez(root: Path, hook: Hook, env: dict[str, str], log: Log, what: str, ctid: str, work: Path) -> None:
    """As vztt's call_VE_script / call_VE0_script (src/util.c): an image script is copied
    to /vzttXXXXXX/script in the root (mode 0700) and run there with bash; a host script is
    run as `SCRIPT VE_ROOT CTID` through /bin/sh (which runs a script without #! itself)."""
    full_env = {**TOOL_ENV, **env}
    if hook.where == "image":
        inside = _fresh_dir_in_root(root, "vztt")
        try:
            write_in_root(root, f"{inside}/script", hook.script.encode(), mode=0o700)
            run(["chroot", str(root), "bash", f"/{inside}/script"], log=log, what=what, env=full_env)
        finally:
            remove_in_root(root, inside, recursive=True)
        return
    host = Path(tempfile.mkdtemp(prefix="ez-script-", dir=work))
    try:
        script = host / (re.sub(r"[^A-Za-z0-9._-]", "_", hook.name).lstrip(".") or "script")   # its $0
        script.write_text(hook.script)
        os.chmod(script, 0o755)
        run(["/bin/sh", "-c", '"$0" "$@"', str(script), str(root), ctid], log=log, what=what, cwd=root,
            env=full_env)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def _fresh_dir_in_root(root: Path, prefix: str) -> str:
    """A new directory `prefix`XXXXXX at the top of the image (as mkdtemp names them), made
    through base.inroot: the image is the packages' and hooks' by now."""
    letters = string.ascii_letters + string.digits
    for _ in range(100):
        name = prefix + "".join(secrets.choice(letters) for _ in range(6))
        if stat_in_root(root, name) is None:
            mkdir_in_root(root, name)
            return name
    raise BuildError(f"{root}: no free name for a {prefix}XXXXXX scratch directory")


def clean_root(root: Path) -> None:
    """What no template should carry, whatever its distro (mmdebstrap's list)."""
    st = stat_in_root(root, "etc/machine-id")
    if st is not None and stat.S_ISREG(st.st_mode):
        # empty: systemd makes one at first boot; owner and mode as the package left them
        write_in_root(root, "etc/machine-id", b"", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    for rel in ("run", "tmp"):
        clear_in_root(root, rel)
