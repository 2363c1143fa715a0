"""Writing into a root tree vztt did not make, without following its links out of it.

A tree that packages were installed into, that hooks ran in, or that came out
of an archive is anyone's: a symlink in it may point at the host's /etc, and a
package script may plant one exactly where vztt is about to write. So every
path in such a tree is looked up from an fd of the root with openat2(2) and
RESOLVE_IN_ROOT: the kernel resolves it as if the root were `/` (an absolute
symlink, or `..`, stops at the root), so symlinks inside the tree resolve
chroot-style, as the booted system sees them, and the lookup is one atomic
step that a link swapped in meanwhile cannot redirect. The last component is
never followed when writing or removing: a file is written under a fresh
O_EXCL|O_NOFOLLOW temporary name (base.files.temp_name) through the fd of its
directory, owned and moded through its own fd (fchown before fchmod: chown
clears setuid bits), fsync'ed, and renamed over the name within that same
directory fd; a symlink at the name is replaced, never written through.

Linux 5.6 or later (openat2). Every write vztt makes into such a tree (recipe
files, apt sources, repo files, a layer's apt settings on its base's tree, the
`ez` hook scripts and their /vzttXXXXXX directory, hostname, hosts,
machine-id, the VM's agent, cleaning, the network settings of `vztt create`)
goes through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Iterator

from vztt.base.errors import BuildError, EnvironmentProblem
from vztt.base.files import temp_name

MAX_READ = 1 << 20            # read_in_root: larger files are not read (None)
MAX_LINKS = 40                # symlinks followed by hand when making directories (the kernel's limit)

_SYS_OPENAT2 = 437            # the same number on every architecture (a syscall added after 5.1)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY


class UnsafePath(BuildError):
    """A path in the tree that cannot be written as asked: a directory or a dangling
    symlink in the way, a component that is not a directory (exit 6)."""

    kind = "image"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(root_fd, path, flags | O_CLOEXEC, RESOLVE_IN_ROOT): an fd, or OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    raw = os.fsencode(path or ".")
    for _ in range(16):                    # EAGAIN: a rename elsewhere raced the lookup; retry
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(raw),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise EnvironmentProblem("this kernel has no openat2(2) (Linux 5.6 or later is needed to write "
                                     "safely into a root tree)")
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def _split(rel: str) -> tuple[str, str]:
    """(the directory part, the last name) of a path in the tree; `..` may appear on the
    way (it stops at the root), not as the last name."""
    parts = [p for p in str(rel).split("/") if p not in ("", ".")]
    if not parts or parts[-1] == "..":
        raise UnsafePath(f"{rel!r}: not a file path inside the tree")
    return "/".join(parts[:-1]), parts[-1]


@contextlib.contextmanager
def _root(root: Path) -> Iterator[int]:
    fd = os.open(root, _DIR_FLAGS | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_dir(root: Path, root_fd: int, path: str, create: bool, hops: int = 0) -> int:
    """An fd of directory `path` of the tree; missing directories are made (0755) if `create`,
    chroot-style: a symlink to a missing directory gets that directory made in the tree."""
    try:
        return _openat2(root_fd, path, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    except NotADirectoryError:
        raise UnsafePath(f"{root}: {path}: a file that is not a directory is on the way") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{root}: {path}: too many levels of symbolic links") from None
        raise
    # One component at a time, each looked up from the root again (a link on the way resolves in it).
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            os.close(_openat2(root_fd, prefix, _DIR_FLAGS))
            continue
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise UnsafePath(f"{root}: {prefix}: not a directory") from None
        parent = _openat2(root_fd, "/".join(parts[:i - 1]), _DIR_FLAGS)
        try:
            os.mkdir(parts[i - 1], 0o755, dir_fd=parent)
            continue
        except FileExistsError:          # a dangling symlink: follow it by hand, in the tree
            target = os.readlink(parts[i - 1], dir_fd=parent)
        finally:
            os.close(parent)
        if hops >= MAX_LINKS:
            raise UnsafePath(f"{root}: {path}: too many levels of symbolic links")
        base = "" if target.startswith("/") else "/".join(parts[:i - 1])
        rest = "/".join(p for p in (base, target.lstrip("/"), *parts[i:]) if p)
        return _open_dir(root, root_fd, rest, create, hops + 1)
    return _openat2(root_fd, path, _DIR_FLAGS)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _replacing(root: Path, rel: str) -> Iterator[tuple[int, str]]:
    """(directory fd, temporary name) for making what replaces root/rel: the directory
    resolved inside root (made if missing), a directory at rel refused. The block makes
    the temporary name; it is then renamed over rel within the directory fd (fsync'ed),
    or removed if the block fails."""
    parent, name = _split(rel)
    with _root(root) as root_fd:
        dir_fd = _open_dir(root, root_fd, parent, create=True)
        try:
            st = _lstat(name, dir_fd)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{root}: {rel}: a directory is in the way")
            tmp = temp_name(Path(name)).name
            try:
                yield dir_fd, tmp
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_in_root(root: Path, rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    """Replace root/rel (resolved inside root) with a regular file holding `data`, of
    owner uid:gid and permissions `mode` (setuid bits included); directories on the way
    are made. A symlink at rel is replaced; a directory there is refused."""
    with _replacing(root, rel) as (dir_fd, tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, uid, gid)        # first: chown clears the setuid bits fchmod sets
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_in_root(root: Path, rel: str) -> bytes | None:
    """root/rel (resolved inside root, a final symlink too) if it is a regular file of at
    most MAX_READ bytes; None otherwise."""
    with _root(root) as root_fd:
        try:
            fd = _openat2(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, total = [], 0
        while data := os.read(fd, 1 << 16):
            chunks.append(data)
            total += len(data)
            if total > MAX_READ:
                return None
        return b"".join(chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def dir_in_root(root: Path, rel: str) -> Iterator[int | None]:
    """An fd of directory root/rel (resolved inside root), or None if there is none (or
    the way there loops)."""
    with _root(root) as root_fd:
        try:
            fd = _openat2(root_fd, rel, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            fd = None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def stat_in_root(root: Path, rel: str) -> os.stat_result | None:
    """lstat of root/rel (the way to it resolved inside root, the last name not followed);
    None if it is missing."""
    parent, name = _split(rel)
    with dir_in_root(root, parent) as dir_fd:
        return _lstat(name, dir_fd) if dir_fd is not None else None


def mkdir_in_root(root: Path, rel: str) -> None:
    """Directory root/rel and the ones on its way (0755), resolved inside root."""
    with _root(root) as root_fd:
        os.close(_open_dir(root, root_fd, "/".join(p for p in rel.split("/") if p), create=True))


def list_in_root(root: Path, rel: str) -> list[str]:
    """The names in directory root/rel (resolved inside root); [] if there is none."""
    with dir_in_root(root, rel) as fd:
        return sorted(os.listdir(fd)) if fd is not None else []


def remove_in_root(root: Path, rel: str, recursive: bool = False) -> None:
    """Remove root/rel if it is not a directory (a symlink itself, not its target), or a
    directory with all it holds if `recursive`; nothing if it is missing."""
    parent, name = _split(rel)
    with dir_in_root(root, parent) as dir_fd:
        if dir_fd is None:
            return
        st = _lstat(name, dir_fd)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
        elif recursive:
            shutil.rmtree(name, dir_fd=dir_fd)     # fd-based: never follows a link out


def clear_in_root(root: Path, rel: str, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in directory root/rel but the names in `keep`. A symlink at rel
    itself is left alone: what it points to is not this directory's to clear."""
    parent, name = _split(rel)
    with dir_in_root(root, parent) as parent_fd:
        if parent_fd is None:
            return
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                return
            raise
    try:
        for child in os.listdir(fd):
            if child in keep:
                continue
            st = _lstat(child, fd)
            if st is not None and stat.S_ISDIR(st.st_mode):
                shutil.rmtree(child, dir_fd=fd)
            elif st is not None:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)


def readlink_in_root(root: Path, rel: str) -> str | None:
    """The target of the symlink root/rel as written in it (never resolved; the way to it
    resolved inside root), or None if root/rel is not a symlink."""
    parent, name = _split(rel)
    with dir_in_root(root, parent) as dir_fd:
        if dir_fd is None:
            return None
        try:
            return os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return None


def make_dir_in_root(root: Path, rel: str, mode: int = 0o755) -> None:
    """root/rel as a root-owned directory with `mode` (made if missing, its owner and mode
    set if present), the way to it resolved inside root (made 0755 where missing); a
    symlink or a file at rel itself is refused, never followed."""
    parent, name = _split(rel)
    with _root(root) as root_fd:
        dir_fd = _open_dir(root, root_fd, parent, create=True)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            try:
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{root}: {rel}: a symlink or a file that is not a directory is "
                                     f"in the way; not followed") from None
                raise
            try:
                os.fchown(fd, 0, 0)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)


def symlink_in_root(root: Path, rel: str, target: str) -> None:
    """Replace root/rel (not a directory) with a symlink to `target`, the way to it
    resolved inside root: made under a temporary name and renamed over it, so nothing at
    rel is followed or written through."""
    with _replacing(root, rel) as (dir_fd, tmp):
        os.symlink(target, tmp, dir_fd=dir_fd)
