"""Writing a file so that readers see the old one or the whole new one, never half.

Every file vztt puts in place (locks, manifests, caches, reports, images) is
written under a temporary name in the same directory, flushed to disk, and
renamed over the final name; the directory is fsync'ed so the rename survives
a crash. The temporary name is `.<name>.tmp-<random>-<pid>`: hidden, unique
per writer, and ending in the writer's pid, so the cache's stale-work cleanup
(store.templates.TemplateCache.clean_stale_work) can remove what a killed
writer left. The temporary file is created with O_EXCL|O_NOFOLLOW: a link
planted at its name is refused, not written through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

TMP_MARK = ".tmp-"


def temp_name(final: Path) -> Path:
    """A fresh temporary name beside `final` (see the module's docstring)."""
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}-{os.getpid()}")


def writer_pid(temp: Path) -> int | None:
    """The pid of the process that made temporary name `temp`, or None if it is not one."""
    tail = temp.name.rsplit("-", 1)[-1]
    return int(tail) if TMP_MARK in temp.name and tail.isdigit() else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_new(path: Path, perms: int) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perms)


@contextlib.contextmanager
def atomic_file(final: Path, perms: int = 0o644, *, fsync: bool = True, binary: bool = True) -> Iterator[IO[Any]]:
    """Write `final` through a temporary file: `with atomic_file(p) as fh: fh.write(...)`.
    On success the file is flushed, given `perms`, and renamed into place; on any error
    (or Ctrl-C) the temporary file goes and `final` is as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    fd = _open_new(tmp, perms)
    try:
        with open(fd, "wb" if binary else "w", closefd=True) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, perms)            # the umask may have taken bits away
        os.replace(tmp, final)
        if fsync:
            fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: Path, data: bytes | str, perms: int = 0o644, *, fsync: bool = True) -> None:
    """`final` holds `data`, all at once (see atomic_file)."""
    with atomic_file(final, perms, fsync=fsync, binary=True) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Fill a temporary directory beside `final`, then rename it into place (replacing
    an existing `final`, which is removed after the rename); removed on error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        stale = None
        if final.exists():
            stale = temp_name(final)
            os.replace(final, stale)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_into_place(tmp: Path, final: Path, perms: int | None = None) -> None:
    """Rename a finished temporary file (made by a tool that writes to a path of its
    own choosing) over `final`, durably."""
    if perms is not None:
        os.chmod(tmp, perms)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)
