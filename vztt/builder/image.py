"""The temporary build image: a sparse ext4 file, loop-mounted as the root
packages are installed into.

Why a loop image and not a directory: the template gets a real ext4 with its
own inode numbering, xattrs and capabilities as the container will see them,
and nothing the build writes can spill onto the host's filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path

from vztt.base.mounts import Mounts
from vztt.base.proc import Log, run


class BuildImage:
    def __init__(self, workdir: Path, size: int, log: Log):
        self.workdir = workdir
        self.file = workdir / "image.ext4"
        self.root = workdir / "root"
        self.size = size
        self.log = log
        self.mounts = Mounts()
        self._api: list[Path] = []

    def __enter__(self) -> "BuildImage":
        try:
            with open(self.file, "wb") as fh:
                fh.truncate(self.size)          # sparse: costs nothing until written
            # No journal and lazy init: a scratch filesystem that lives for one build.
            run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0",
                 "-E", "lazy_itable_init=1,nodiscard", str(self.file)], log=self.log, what="mkfs.ext4 build image")
            self.mounts.mount(str(self.file), self.root, fstype="ext4", options="loop,noatime,barrier=0")
            (self.root / "lost+found").rmdir()
        except BaseException:
            self.close()
            raise
        return self

    def mount_api(self) -> None:
        """/proc and /dev inside the root, for package maintainer scripts."""
        proc, dev = self.root / "proc", self.root / "dev"
        self.mounts.mount("proc", proc, fstype="proc", options="nosuid,nodev,noexec")
        self.mounts.mount("/dev", dev, bind=True)
        self._api = [dev, proc]

    def unmount_api(self) -> None:
        for p in self._api:
            self.mounts.unmount(p)
        self._api = []

    def used_bytes(self) -> int:
        st = os.statvfs(self.root)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def close(self) -> None:
        self.mounts.unmount_all()
        self.file.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
