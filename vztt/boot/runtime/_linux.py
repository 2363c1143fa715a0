"""The few Linux system calls the runtime needs that Python's os module lacks.

Standard library only: `_stage.py` imports this file as a plain module (it runs
as a script, before and after pivot_root, outside the vztt package).
Every wrapper raises OSError with errno set, like the os module does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import socket
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# unshare(2) and setns(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# vztt's kernel patch (kernel/patches/virt_osrelease.patch): uname -r in the writer's UTS namespace
OSRELEASE_SYSCTL = "/proc/sys/kernel/virt_osrelease"
PR_CAPBSET_DROP = 24
CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

# pivot_root has no glibc wrapper; its number depends on the architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_SYS_CAPGET_CAPSET = {"x86_64": (125, 126), "aarch64": (90, 91), "riscv64": (90, 91),
                      "ppc64le": (183, 184), "s390x": (184, 185)}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The new mount API (Linux 5.2; mount_setattr 5.12): one number on every
# architecture (the unified syscall table); glibc 2.36 wraps none of them.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(value: str | os.PathLike | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mountinfo() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of each mount we see, in mount order."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            point = left.split()[4]
            for escape in ("\\040", "\\011", "\\012", "\\134"):  # space, tab, newline, backslash
                point = point.replace(escape, chr(int(escape[1:], 8)))
            fstype, _source, options = right.split()[:3]
            found.append((point, fstype, set(options.split(","))))
    return found


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str | os.PathLike, fstype: str | None = None,
          flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount {target}")


def umount2(target: str | os.PathLike, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(ctypes.c_long(number), _b(new_root), _b(put_old)), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


def interface_up(name: str = "lo") -> None:
    """Set IFF_UP on an interface of the current network namespace."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", name.encode(), 0)  # struct ifreq: name, flags
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capcall(index: int, data) -> None:  # type: ignore[no-untyped-def]
    numbers = _SYS_CAPGET_CAPSET.get(platform.machine())
    if numbers is None:
        raise OSError(0, f"capget/capset: unknown syscall number on {platform.machine()}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.syscall(ctypes.c_long(numbers[index]), ctypes.byref(header), data), "capget/capset")


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, as 64-bit masks."""
    data = (_CapData * 2)()
    _capcall(0, data)
    return tuple(getattr(data[0], f) | getattr(data[1], f) << 32  # type: ignore[return-value]
                 for f in ("effective", "permitted", "inheritable"))


def capset(effective: int, permitted: int, inheritable: int) -> None:
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> 32 * i) & 0xFFFFFFFF
        data[i].permitted = (permitted >> 32 * i) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> 32 * i) & 0xFFFFFFFF
    _capcall(1, data)


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def idmapped_bind(source: str | os.PathLike, target: str | os.PathLike, userns_fd: int) -> None:
    """Bind `source` (the mount holding it, not its submounts) at `target`, its
    files' ids shown through the mapping of the user namespace `userns_fd`
    (an idmapped mount, Linux 5.12; tmpfs 6.3)."""
    fd = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(-100), _b(source),
                              ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC)), f"open_tree {source}")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), b"",
                             ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
               f"idmapped mount of {source}")
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(-100),
                             _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {target}")
    finally:
        os.close(fd)


def rebind_cwd() -> None:
    """Put an unlocked recursive copy of the mount at the working directory on
    top of it, and move into that copy. pivot_root refuses a mount a user
    namespace inherited (locked); its own copy it takes. By file descriptor, as
    the path up to here may be out of the caller's reach."""
    fd = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(-100), b".",
                              ctypes.c_uint(OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)), "open_tree .")
    try:
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(-100),
                             b".", ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), "move_mount .")
        os.fchdir(fd)
    finally:
        os.close(fd)
