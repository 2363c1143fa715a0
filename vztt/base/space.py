"""Free space: checked before anything big is downloaded or unpacked, so that a
full disk (or an index claiming an absurd size) is refused at once, with the
numbers, instead of failing halfway and leaving a partial file behind."""

from __future__ import annotations

import os
from pathlib import Path

from vztt.base.errors import EnvironmentProblem

MiB = 1 << 20
SLACK = 64 * MiB              # beyond the estimate, in every free-space check


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (or of
    its nearest existing parent: the directory may not be made yet)."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def check_space(where: Path, need: int, what: str) -> None:
    """EnvironmentProblem (exit 7) unless `where` has `need` bytes and some slack free."""
    free = free_bytes(where)
    if free < need + SLACK:
        raise EnvironmentProblem(f"{where}: {free / 1e6:.0f} MB free, {what} needs about "
                                 f"{(need + SLACK) / 1e6:.0f} MB")
