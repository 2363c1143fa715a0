"""The host ids a container's ids map to: its user namespace's range.

A container's root (and every id 0..65535 inside) maps to an unprivileged range
on the host, one range of SLOT ids per container:

- the ranges come from a `vztt` line of /etc/subuid and /etc/subgid
  (`vztt:FIRST:COUNT`, the format newuidmap reads), or, without one, the
  default DEFAULT_FIRST..+DEFAULT_COUNT (ids no distribution hands out to
  users, and above the 1000000.. ranges useradd gives subordinate ids from);
- each container takes a free slot of SLOT ids of that range: an flock on
  /run/vztt/userns/<first id>.lock held while it lives, so two containers never
  share ids (whichever cache or process they belong to). A killed owner's lock
  goes with it.

We write the maps ourselves (we are root in the host's user namespace), so no
newuidmap is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import RuntimeUnavailable
from vztt.base.proc import PIPE, TimeoutExpired, spawn
from . import _linux
from .host import EXEC_ENV

SLOT = 65536                      # ids 0..65535 inside (nobody is 65534)
DEFAULT_FIRST = 0x60000000        # 1610612736
DEFAULT_COUNT = SLOT * 1024       # 1024 containers at once
SUBUID, SUBGID = Path("/etc/subuid"), Path("/etc/subgid")
OWNER = "vztt"                    # the /etc/subuid line vztt reads
LOCKS = Path("/run/vztt/userns")
MAX_USERNS = Path("/proc/sys/user/max_user_namespaces")
UNSAFE_FLAG = "--unsafe-no-userns"


@dataclass(frozen=True)
class IdRange:
    first: int
    count: int

    def slots(self) -> range:
        return range(self.first, self.first + self.count - SLOT + 1, SLOT)


@dataclass
class IdMap:
    """A container's slot: host ids `uid`..`uid`+SLOT-1 are 0..SLOT-1 inside (gids likewise)."""
    uid: int
    gid: int
    lock: object                  # the open, flock'ed slot file: the slot is ours while it is open

    def uid_map(self) -> str:
        return f"0 {self.uid} {SLOT}\n"

    def gid_map(self) -> str:
        return f"0 {self.gid} {SLOT}\n"

    def shift(self, uid: int, gid: int) -> tuple[int, int]:
        """Host ids of a file that was written with the ids it should have inside."""
        return (uid if self.uid <= uid < self.uid + SLOT else self.uid + uid % SLOT,
                gid if self.gid <= gid < self.gid + SLOT else self.gid + gid % SLOT)

    def release(self) -> None:
        self.lock.close()


def _configured(path: Path) -> IdRange | None:
    """The `vztt:FIRST:COUNT` line of a subordinate id file, if there is one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == OWNER:
            try:
                first, count = int(parts[1]), int(parts[2])
            except ValueError:
                raise RuntimeUnavailable(f"{path}: bad line {line.strip()!r} (want {OWNER}:FIRST:COUNT)") from None
            if count < SLOT or first <= 0:
                raise RuntimeUnavailable(f"{path}: {OWNER}:{first}:{count} is too small: a container needs "
                                         f"{SLOT} ids above 0 ({OWNER}:FIRST:COUNT with COUNT >= {SLOT})")
            return IdRange(first, count)
    return None


def check_host() -> None:
    """RuntimeUnavailable (exit 10) naming the setting if this host cannot give a
    container a user namespace."""
    if not Path("/proc/self/ns/user").exists():
        raise RuntimeUnavailable(f"the kernel has no user namespaces (CONFIG_USER_NS); "
                                 f"boot without one only with {UNSAFE_FLAG}")
    try:
        allowed = int(MAX_USERNS.read_text())
    except (OSError, ValueError):
        allowed = 1
    if allowed == 0:
        raise RuntimeUnavailable(f"user namespaces are disabled (sysctl user.max_user_namespaces = 0): "
                                 f"set it above 0, or boot without one with {UNSAFE_FLAG}")


def allocate() -> IdMap:
    """A free slot, locked for the caller's lifetime (release() or exit frees it)."""
    check_host()
    uids = _configured(SUBUID) or IdRange(DEFAULT_FIRST, DEFAULT_COUNT)
    gids = _configured(SUBGID) or IdRange(DEFAULT_FIRST, DEFAULT_COUNT)
    LOCKS.mkdir(parents=True, exist_ok=True)
    for index, first in enumerate(uids.slots()):
        gid = gids.first + index * SLOT
        if gid + SLOT > gids.first + gids.count:
            break
        lock = open(LOCKS / f"{first}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return IdMap(first, gid, lock)
    raise RuntimeUnavailable(f"every user namespace slot of {SUBUID}'s {OWNER} range (or the default "
                             f"{DEFAULT_FIRST}:{DEFAULT_COUNT}) is in use: widen it")


def shift_tree(top: Path, ids: IdMap, through: Path) -> None:
    """Give every entry under `top` (an overlay's upper directory) that has host
    ids outside the slot the slot's ids for them: what the host wrote into a
    container's overlay before boot, hostname and network files. Changed
    through the overlay mounted at `through`, never in `top` itself: overlayfs
    checks permissions against its own copy of the owner, which a change under
    it would not update. (chown clears a setuid bit; nothing written there has one.)"""
    for parent, dirs, files in os.walk(top):
        for name in [".", *dirs, *files] if parent == str(top) else [*dirs, *files]:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue  # a whiteout: a file the host removed, absent from the overlay
            uid, gid = ids.shift(st.st_uid, st.st_gid)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.lchown(os.path.normpath(os.path.join(through, os.path.relpath(path, top))), uid, gid)


def make_userns(ids: IdMap, helper_argv: list[str]) -> int:
    """A file descriptor of a user namespace mapping 0..SLOT-1 to the slot `ids`:
    the container's. Made by a helper (`_stage.py userns`: a process must be in
    it for us to write its maps), which goes once we hold it."""
    helper = spawn(helper_argv, what="user namespace helper", error=RuntimeUnavailable,
                   env={"PATH": EXEC_ENV["PATH"]}, mark=False, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    try:
        if helper.stdout.readline() != b"ready\n":
            helper.wait(timeout=10)
            raise RuntimeUnavailable(f"cannot create a user namespace: {helper.stderr.read().decode().strip()}")
        with open(f"/proc/{helper.pid}/uid_map", "w") as f:
            f.write(ids.uid_map())
        with open(f"/proc/{helper.pid}/gid_map", "w") as f:
            f.write(ids.gid_map())
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RuntimeUnavailable(f"cannot map the container's user namespace: {e.strerror}") from None
    finally:
        helper.stdin.close()
        with contextlib.suppress(TimeoutExpired):
            helper.wait(timeout=10)
        helper.stdout.close()
        helper.stderr.close()


def mount_shifted(tree: Path, at: Path, userns_fd: int) -> Path:
    """`tree` at `at`, seen with the container's ids (an idmapped mount). Idmapped
    rather than chowned at unpack: nothing is copied or rewritten (the unpack takes
    what it took), and the tree stays as shipped. RuntimeUnavailable (exit 10)
    where the kernel or the tree's filesystem cannot."""
    at.mkdir()
    try:
        _linux.idmapped_bind(tree, at, userns_fd)
    except OSError as e:
        raise RuntimeUnavailable(f"cannot map {tree} into the container's ids (idmapped mount: Linux 5.12, "
                                 f"tmpfs 6.3): {e.strerror}; without a user namespace only with "
                                 f"{UNSAFE_FLAG}") from None
    return at
