"""Writing into a root tree vztt did not make, without following its links.

A tree unpacked from an archive (a pulled template, a container's root) is
anyone's: a symlink in it may point at /etc of the host. Paths in it are
opened one directory at a time from an fd of the root, with O_NOFOLLOW at
every step, so no symlink on the way is followed (it is refused) and one at
the end is replaced, never written through. This is the one helper for
writing into such trees.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from vztt.base.errors import VzttError
from vztt.base.files import temp_name

MAX_READ = 1 << 20            # read_in_root: larger files are not read (None)


class UnsafePath(VzttError):
    """A path in the tree that would lead out of it (a symlink or non-directory on the way)."""

    exit_code = 6
    kind = "archive"          # the tree came from an archive: reported as an archive problem


def _open_parent(root: Path, rel: str) -> tuple[int, str]:
    """An fd of the directory holding `rel` inside root, reached without following any
    symlink (missing directories are made), and the last name of `rel`."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UnsafePath(f"{rel!r}: not a path inside the tree")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{root}/{rel}: {part} is a symlink or not a directory; not followed") from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def write_in_root(root: Path, rel: str, data: bytes, mode: int = 0o644, *, uid: int = 0, gid: int = 0) -> None:
    """Replace root/rel with a regular file holding `data` (owned by uid:gid, root by
    default), never writing through a symlink: one at the end is replaced, one on the way refused."""
    dfd, name = _open_parent(root, rel)
    try:
        # base.files names the temporary file; it is written here through the directory's fd.
        tmp = temp_name(Path(name)).name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.unlink(tmp, dir_fd=dfd)
                raise UnsafePath(f"{root}/{rel}: is a directory")
        except FileNotFoundError:
            pass
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def read_in_root(root: Path, rel: str) -> bytes | None:
    """root/rel if it is a regular file (of at most MAX_READ bytes) reached without
    symlinks; None otherwise."""
    try:
        dfd, name = _open_parent(root, rel)
    except (UnsafePath, FileNotFoundError):
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while data := os.read(fd, 1 << 16):
            chunks.append(data)
            if sum(map(len, chunks)) > MAX_READ:
                return None
        return b"".join(chunks)
    finally:
        os.close(fd)


def remove_in_root(root: Path, rel: str) -> None:
    """Remove root/rel if it is not a directory (a symlink itself, not its target)."""
    try:
        dfd, name = _open_parent(root, rel)
    except (UnsafePath, FileNotFoundError):
        return
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


def stat_in_root(root: Path, rel: str) -> os.stat_result | None:
    """lstat of root/rel (a symlink itself, not its target), reached without following
    any symlink on the way; None if it is missing or cannot be reached so."""
    try:
        dfd, name = _open_parent(root, rel)
    except (UnsafePath, FileNotFoundError):
        return None
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)


def readlink_in_root(root: Path, rel: str) -> str | None:
    """The target of the symlink root/rel (as written in it, never resolved), or None
    if root/rel is not a symlink reached without following one on the way."""
    try:
        dfd, name = _open_parent(root, rel)
    except (UnsafePath, FileNotFoundError):
        return None
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)


def make_dir_in_root(root: Path, rel: str, mode: int = 0o755) -> None:
    """root/rel as a root-owned directory with `mode` (made if missing, its mode set
    if present); a symlink or a file there is refused, never followed."""
    dfd, name = _open_parent(root, rel)
    try:
        try:
            os.mkdir(name, mode, dir_fd=dfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(f"{root}/{rel}: is a symlink or not a directory; not followed") from None
            raise
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def symlink_in_root(root: Path, rel: str, target: str) -> None:
    """Replace root/rel (not a directory) with a symlink to `target`, made under a
    temporary name and renamed over it: nothing is followed, nothing written through."""
    dfd, name = _open_parent(root, rel)
    try:
        tmp = temp_name(Path(name)).name
        os.symlink(target, tmp, dir_fd=dfd)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.unlink(tmp, dir_fd=dfd)
                raise UnsafePath(f"{root}/{rel}: is a directory")
        except FileNotFoundError:
            pass
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)
