"""The cgroups a container lives in: one per hierarchy, created, limited, killed, removed.

Every container gets a directory in the cgroup2 hierarchy. That one is the
container's own tree: its init runs in a cgroup namespace rooted there, sees it
mounted as /sys/fs/cgroup, and builds its slices and scopes inside it. It is
also how we find and kill every process of the container (`cgroup.kill`).

Limits go wherever the host has the controller:
- unified hosts (cgroup2 only, controllers in cgroup2): memory.max and
  pids.max on the same directory, if the controllers can be enabled down to
  it. They cannot when the parent cgroup holds processes itself (the
  "no internal processes" rule), as in a systemd login session: then the
  limits are skipped and `Cgroups.notes` says so.
- hybrid hosts, like ours (Debian 12 VM, kernel 6.18): the cgroup2 hierarchy
  at /sys/fs/cgroup/unified has no controllers at all (cgroup.controllers is
  empty), so it only tracks processes; memory and pids are v1 hierarchies at
  /sys/fs/cgroup/memory and /sys/fs/cgroup/pids. We make a directory in each
  (memory.limit_in_bytes plus memory.memsw.limit_in_bytes so swap does not
  dodge the limit, pids.max) and put the container's init there too. The
  container never sees the v1 hierarchies, so systemd inside cannot move its
  processes out of them: the limits cover the whole container.

Each directory sits in a "vztt" directory below the cgroup of the process that
creates it (nested, so an enclosing limit also bounds the container); on this
host that is /sys/fs/cgroup/unified/vztt/NAME, /sys/fs/cgroup/pids/vztt/NAME and
/sys/fs/cgroup/memory/<our job's cgroup>/vztt/NAME. Paths are absolute, so a
later process can clean them up from the state file.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._linux import mountinfo

PARENT = "vztt"

# The devices a container may open or mknod (cgroup v1 devices controller; the
# list nspawn allows): the basic character devices, its ptys, tun and fuse.
# Nothing else, no block device at all: a node made for the host's disk cannot
# be opened or mounted, and /dev/kmsg (1:11) or /dev/mem (1:1) cannot be read.
DEVICES_ALLOWED = ("c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                   "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm", "c 10:229 rwm")


@dataclass
class Cgroups:
    unified: Path                                       # the container's cgroup2 directory
    v1: dict[str, Path] = field(default_factory=dict)   # v1 controller -> its directory
    limits: dict[str, int] = field(default_factory=dict)  # controller -> limit (bytes or pids)
    notes: list[str] = field(default_factory=list)      # limits that could not be applied

    @property
    def dirs(self) -> list[Path]:
        return [self.unified, *self.v1.values()]


def _own_paths() -> dict[str, str]:
    """Our cgroup per hierarchy: "" for cgroup2, the controller names for v1."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def unified_mount() -> Path | None:
    """Where the cgroup2 hierarchy is mounted, or None."""
    for point, fstype, _ in mountinfo():
        if fstype == "cgroup2":
            return Path(point)
    return None


def _v1_mount(controller: str) -> Path | None:
    for point, fstype, options in mountinfo():
        if fstype == "cgroup" and controller in options:
            return Path(point)
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def plan(name: str, memory_max: int | None = None, pids_max: int | None = None) -> Cgroups:
    """Decide where the container's cgroups go, creating nothing (so that the
    paths can be recorded before anything exists). OSError without cgroup2."""
    root = unified_mount()
    if root is None:
        raise OSError(errno.ENOENT, "no cgroup2 hierarchy is mounted")
    own = _own_paths()

    def place(mount: Path, controller: str) -> Path:
        return mount / own.get(controller, "/").lstrip("/") / PARENT / name

    groups = Cgroups(place(root, ""))
    # A cgroup2-only host has no devices controller (systemd attaches BPF programs
    # there): the note says the device policy is missing, the other walls stay.
    if (mount := _v1_mount("devices")) is not None:
        groups.v1["devices"] = place(mount, "devices")
    else:
        groups.notes.append("no cgroup v1 devices controller: no device policy")
    in_unified = set((root / "cgroup.controllers").read_text().split())
    for controller, limit in (("memory", memory_max), ("pids", pids_max)):
        if limit is None:
            continue
        if controller not in in_unified:
            if (mount := _v1_mount(controller)) is None:
                groups.notes.append(f"no {controller} controller on this host: limit not applied")
                continue
            groups.v1[controller] = place(mount, controller)
        groups.limits[controller] = limit
    return groups


def create(groups: Cgroups) -> None:
    """Make the planned directories and set the limits. A limit that cannot be
    applied only adds to `notes`; OSError if a directory cannot be made."""
    for directory in groups.dirs:
        for attempt in range(3):  # another container may rmdir our empty parent meanwhile
            try:
                directory.mkdir(parents=True)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
    if "devices" in groups.v1:
        # deny all first, then allow: the policy holds before any process joins
        _write(groups.v1["devices"] / "devices.deny", "a")
        for rule in DEVICES_ALLOWED:
            _write(groups.v1["devices"] / "devices.allow", rule)
    root = unified_mount()
    for controller, limit in groups.limits.items():
        if controller in groups.v1:
            _limit_v1(groups, groups.v1[controller], controller, limit)
        else:
            _limit_unified(groups, root, controller, limit)


def delegate(groups: Cgroups, uid: int, gid: int) -> None:
    """Hand the container's cgroup2 directory to its user namespace's root (as
    systemd delegates a subtree): it may make cgroups below it and move its
    processes among them, nothing above or beside it. The v1 directories
    (limits, device policy) stay the host's: the container never sees them."""
    os.chown(groups.unified, uid, gid)
    for name in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        if (groups.unified / name).exists():
            os.chown(groups.unified / name, uid, gid)


def _limit_unified(groups: Cgroups, root: Path, controller: str, limit: int) -> None:
    # Enable the controller in subtree_control from the hierarchy's root down
    # to the container's parent.
    try:
        for ancestor in reversed(groups.unified.parents):
            if ancestor.is_relative_to(root):
                _write(ancestor / "cgroup.subtree_control", f"+{controller}")
        if controller == "memory":
            _write(groups.unified / "memory.max", str(limit))
            if (groups.unified / "memory.swap.max").exists():
                _write(groups.unified / "memory.swap.max", "0")
        else:
            _write(groups.unified / "pids.max", str(limit))
    except OSError as e:
        groups.notes.append(f"cgroup2 {controller} limit not applied: {e.strerror}")


def _limit_v1(groups: Cgroups, directory: Path, controller: str, limit: int) -> None:
    try:
        if controller == "memory":
            _write(directory / "memory.limit_in_bytes", str(limit))
            if (directory / "memory.memsw.limit_in_bytes").exists():
                _write(directory / "memory.memsw.limit_in_bytes", str(limit))
        else:
            _write(directory / "pids.max", str(limit))
    except OSError as e:
        groups.notes.append(f"cgroup v1 {controller} limit not applied: {e.strerror}")


def procs_files(dirs: list[Path]) -> list[Path]:
    """The files a process writes its pid to, to join the container's cgroups."""
    return [d / "cgroup.procs" for d in dirs]


def _subtree(directory: Path) -> list[Path]:
    """The directory and every cgroup below it, deepest first."""
    found = []
    for parent, children, _files in os.walk(directory, topdown=False):
        found.extend(Path(parent) / child for child in children)
    found.append(directory)
    return found


def pids(dirs: list[Path]) -> set[int]:
    """Every process in these cgroups and their descendants."""
    found: set[int] = set()
    for directory in dirs:
        if not directory.is_dir():
            continue
        for group in _subtree(directory):
            try:
                found.update(int(p) for p in (group / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass  # removed meanwhile
    return found


def kill(dirs: list[Path], timeout: float = 10.0) -> bool:
    """SIGKILL every process in the cgroups; True once they are all gone.

    `cgroup.kill` (cgroup2, Linux 5.14+) kills a whole subtree atomically, even
    processes forking meanwhile. Where it is missing, or for v1 directories, we
    signal the listed pids until none are left: a pid listed in our cgroup is
    one of ours.
    """
    deadline = time.monotonic() + timeout
    for directory in dirs:
        try:
            _write(directory / "cgroup.kill", "1")
        except OSError:
            pass  # no such file: not cgroup2, too old, or already removed
    while True:
        left = pids(dirs)
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def remove(dirs: list[Path], timeout: float = 5.0) -> list[str]:
    """rmdir the cgroups depth first (systemd leaves slices behind), then our
    "vztt" parents if they are empty. Returns what could not be removed."""
    problems = []
    for directory in dirs:
        if not directory.exists():
            continue
        for group in _subtree(directory):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY right after a kill, until the exits are accounted.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        problems.append(f"cannot remove cgroup {group}: {e.strerror}")
                        break
                    time.sleep(0.05)
        parent = directory.parent
        if parent.name == PARENT:
            try:
                parent.rmdir()
            except OSError:
                pass  # another container is still using it
    return problems
