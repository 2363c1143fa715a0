"""The shared package cache: files stored by their sha256, verified on the way
in and before every use.

Layout: `<root>/sha256/<2 hex>/<64 hex>`. A file enters only by an atomic
rename after its digest matched. Re-hashing every package on every build
would cost seconds, so a sidecar stamp records (size, mtime, inode) at the
last verification; a file whose stat no longer matches its stamp is hashed
again, and dropped if it no longer matches its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vztt.base.errors import EnvironmentProblem
from vztt.base.files import atomic_write, replace_into_place, temp_name
from vztt.store.locking import wait_for_flock

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Download:
    """A package file to bring into the cache: where from, and what it must hash to
    (a backend says, builder.fetch does it)."""

    label: str       # what the user knows it as (package name and version)
    url: str
    sha256: str
    size: int


class PackageCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def partial(self, sha256: str) -> Path:
        """Where a download in progress lives; kept across runs for resuming."""
        return self.tmp / f"{sha256}.part"

    def _stamp(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / f".{sha256}.ok"

    @staticmethod
    def _stat_key(st: os.stat_result) -> str:
        return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"

    def lookup(self, sha256: str, size: int | None = None) -> Path | None:
        """The cached file if present and intact; a corrupt one is removed."""
        path = self.path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = self._stamp(sha256)
        try:
            if stamp.read_text() == self._stat_key(st) and (size is None or st.st_size == size):
                return path
        except FileNotFoundError:
            pass
        if (size is not None and st.st_size != size) or sha256_file(path) != sha256:
            self.drop(sha256)
            return None
        self._write_stamp(sha256, st)
        return path

    def _write_stamp(self, sha256: str, st: os.stat_result) -> None:
        # Whole or not at all: builds verifying the same file side by side each write it.
        atomic_write(self._stamp(sha256), self._stat_key(st), fsync=False)

    def drop(self, sha256: str) -> None:
        for p in (self.path(sha256), self._stamp(sha256)):
            p.unlink(missing_ok=True)

    def add(self, sha256: str, verified_file: Path) -> Path:
        """Move a file whose digest the caller has just checked into the cache."""
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        replace_into_place(verified_file, dest, perms=0o644)
        self._write_stamp(sha256, dest.stat())
        return dest

    def add_copy(self, sha256: str, source: Path) -> Path | None:
        """Copy a local file in if its digest matches; None if it does not."""
        tmp = temp_name(self.tmp / sha256)          # tmp/ is emptied by prune
        shutil.copyfile(source, tmp)
        if sha256_file(tmp) != sha256:
            tmp.unlink()
            return None
        return self.add(sha256, tmp)

    # ------------------------------------------------------------------ lock
    @contextmanager
    def locked(self, exclusive: bool = False, timeout: float = 0) -> Iterator[None]:
        """Builds share the cache; `vztt prune` needs it alone. Waits up to `timeout` seconds,
        then names who holds it."""
        path = self.root / ".lock"
        holders = self.root / ".holders"
        holders.mkdir(exist_ok=True)
        me = holders / str(os.getpid())
        with open(path, "a+") as fh:
            wait_for_flock(fh, exclusive=exclusive, timeout=timeout, busy=lambda: EnvironmentProblem(
                f"package cache {self.root} is in use by {self._holders(holders)}; "
                "try again later or pass --wait SECONDS"))
            me.write_text(" ".join(sys.argv[1:])[:200] or "vztt")
            try:
                yield
            finally:
                me.unlink(missing_ok=True)

    @staticmethod
    def _holders(holders: Path) -> str:
        found = []
        for h in holders.iterdir():
            if h.name.isdigit() and Path(f"/proc/{h.name}").exists():
                found.append(f"pid {h.name} (vztt {h.read_text().strip()})")
        return ", ".join(found) or "another process"

    def prune(self, keep: set[str]) -> tuple[int, int]:
        """Remove cached files whose sha256 is not in `keep`; (files, bytes) removed."""
        files = size = 0
        for p in (self.root / "sha256").glob("*/*"):
            if p.name.startswith(".") or p.name in keep:
                continue
            size += p.stat().st_size
            self.drop(p.name)
            files += 1
        for part in self.tmp.iterdir():
            part.unlink(missing_ok=True)
        return files, size
