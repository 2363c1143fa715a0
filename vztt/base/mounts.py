"""Mounts that cannot leak.

A build first moves itself into a private mount namespace: every mount it
makes (the loop-mounted image, /proc and /dev inside it) is invisible to the
host and is torn down by the kernel when the last process of the build
exits, even on SIGKILL. Loop devices are attached by `mount -o loop`, which
sets autoclear, so they detach when their mount goes. The Mounts stack still
unmounts in reverse order on every normal exit, error and Ctrl-C; the
namespace is the safety net, not the plan.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from vztt.base import proc
from vztt.base.errors import BuildError, EnvironmentProblem

CLONE_NEWNS = 0x00020000
_private = False


def enter_private_namespace() -> bool:
    """Unshare the mount namespace (once per process); False if the kernel says no."""
    global _private
    if _private:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    # Without this, mount events would still propagate back to the host.
    proc.run(["mount", "--make-rprivate", "/"], what="mount --make-rprivate /", error=EnvironmentProblem,
             inherit_env=False)
    _private = True
    return True


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(f"{what} needs root (loop devices, mounts, chroot); run it with sudo")


def mounted_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (as this process sees them)."""
    prefix = str(path.resolve())
    points = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def loops_backed_by(directory: Path) -> list[str]:
    """Loop devices whose backing file lies below `directory`."""
    prefix = str(directory.resolve()) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().startswith(prefix):
                found.append("/dev/" + backing.parent.parent.name)
        except OSError:
            continue
    return found


def force_cleanup(directory: Path) -> None:
    """Unmount and detach whatever a dead build left below `directory`."""
    for point in mounted_below(directory):
        proc.run(["umount", "-l", point], what=f"umount {point}", check=False, inherit_env=False)
    for dev in loops_backed_by(directory):
        proc.run(["losetup", "-d", dev], what=f"losetup -d {dev}", check=False, inherit_env=False)


class Mounts:
    """A stack of mounts, undone in reverse order."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def mount(self, source: str, target: Path, *, fstype: str | None = None, options: str | None = None,
              bind: bool = False) -> None:
        target.mkdir(parents=True, exist_ok=True)
        cmd = ["mount"]
        if bind:
            cmd.append("--bind")
        if fstype:
            cmd += ["-t", fstype]
        if options:
            cmd += ["-o", options]
        cmd += [source, str(target)]
        done = proc.run(cmd, what=f"mount {source} on {target}", check=False, inherit_env=False)
        if done.returncode != 0:
            raise BuildError(f"mount {source} on {target}: {done.stderr.strip()}")
        self.points.append(target)

    def unmount(self, target: Path) -> None:
        if target in self.points:
            self.points.remove(target)
        done = proc.run(["umount", str(target)], what=f"umount {target}", check=False, inherit_env=False)
        if done.returncode != 0:
            # Busy: a stray process in the chroot. Detach lazily so the image can go.
            proc.run(["umount", "-l", str(target)], what=f"umount -l {target}", check=False, inherit_env=False)

    def unmount_all(self) -> None:
        for target in reversed(list(self.points)):
            self.unmount(target)

    def __enter__(self) -> "Mounts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount_all()
