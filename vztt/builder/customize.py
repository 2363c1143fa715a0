"""The recipe's own touches after the packages: files, hooks, final cleaning.

Paths are resolved inside the image with chroot semantics: a symlink in the
image that points to /etc points to the image's /etc, and `..` stops at the
image root, so no recipe file and no link planted by a package can make a
write land on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.base.files import atomic_file
from vztt.base.inroot import write_in_root
from vztt.base.proc import TOOL_ENV, Log, run
from vztt.recipe.recipe import FileSpec, Hook

MAX_LINKS = 40


def path_in_root(root: Path, path: str) -> Path:
    """Host path of `path` in the image; intermediate symlinks followed inside root, the last one not."""
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
        dest = path_in_root(root, f.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            if dest.is_dir() and not dest.is_symlink():
                raise BuildError(f"files[{f.path}]: a directory is in the way in the image")
            dest.unlink()
        # The owner first: chown clears setuid bits, which atomic_file's final chmod sets.
        with atomic_file(dest, f.mode, fsync=False) as fh:
            fh.write(f.content)
            os.fchown(fh.fileno(), f.uid, f.gid)


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
        inside = Path(tempfile.mkdtemp(prefix="vztt", dir=root))
        try:
            write_in_root(root, f"{inside.name}/script", hook.script.encode(), mode=0o700)
            run(["chroot", str(root), "bash", f"/{inside.name}/script"], log=log, what=what, env=full_env)
        finally:
            shutil.rmtree(inside, ignore_errors=True)
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


def clean_root(root: Path) -> None:
    """What no template should carry, whatever its distro (mmdebstrap's list)."""
    machine_id = root / "etc/machine-id"
    if machine_id.is_file() and not machine_id.is_symlink():
        machine_id.write_text("")          # empty: systemd makes one at first boot
    for rel in ("run", "tmp"):
        d = root / rel
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
