"""The container runtime, with a real systemd: boot, exec, poweroff, cleanup.

Needs root and mmdebstrap; the Debian tree is built once (~20-30 s) and cached
(tests/rootfs_helpers.py). Each boot takes about half a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rootfs_helpers import debian_rootfs, rootfs_cached  # noqa: E402

from vztt.boot.runtime import BootError, Container, RuntimeUnavailable, cleanup_stale  # noqa: E402
from vztt.boot.runtime import cgroup  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="booting containers needs root"),
    # the first run builds the Debian tree from the mirror
    *([] if rootfs_cached() else [pytest.mark.network]),
]


@pytest.fixture(scope="session")
def rootfs() -> Path:
    return debian_rootfs()


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


# -- what the host looks like ----------------------------------------------------

def listing(tree: Path) -> dict[str, tuple]:
    """Every entry's metadata, mtimes and ctimes included: any write shows."""
    found = {}
    for parent, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else None
            found[os.path.relpath(path, tree)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                  st.st_mtime_ns, st.st_ctime_ns, link)
    return found


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def processes_in_cgroup(name: str, settle: float = 0.0) -> list[int]:
    """Processes (zombies included) whose cgroup is the container's; with
    `settle`, wait that long for the list to empty (a killed process is
    listed until its parent has reaped it)."""
    deadline = time.monotonic() + settle
    while (found := _processes_in_cgroup(name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _processes_in_cgroup(name: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"/{cgroup.PARENT}/{name}." in Path(f"/proc/{pid}/cgroup").read_text():
                found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


def assert_nothing_left(state_dir: Path, name: str, cgroup_dirs: list[Path]) -> None:
    assert mounts_under(state_dir) == []
    assert [d for d in cgroup_dirs if d.exists()] == []
    assert processes_in_cgroup(name, settle=2.0) == []
    assert not (state_dir / name).exists(), "scratch tree left"
    assert not (state_dir / f"{name}.json").exists(), "state file left"


def write_unit(root: Path, name: str, body: str) -> None:
    """Install and enable a unit in the tree (what `systemctl enable` would do)."""
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (units / name).write_text(body)
    (units / "multi-user.target.wants" / name).symlink_to(f"/etc/systemd/system/{name}")


# -- tests -------------------------------------------------------------------------

def test_boot_exec_poweroff_leaves_nothing(rootfs, state_dir):
    before = listing(rootfs)
    box = Container(rootfs, state_dir, name="t-boot", hostname="vztt-check",
                    memory_max=1 << 30, pids_max=1000)
    with box:
        state, failed = box.wait_running(timeout=60)
        assert (state, failed) == ("running", [])
        print(f"\nboot to running: {box.boot_seconds:.2f} s")

        assert box.exec(["hostname"]) == (0, "vztt-check\n")
        assert box.exec(["cat", "/etc/hostname"]) == (0, "vztt-check\n")
        assert box.exec(["cat", "/proc/1/comm"]) == (0, "systemd\n")
        assert box.exec(["cat", "/run/systemd/container"]) == (0, "vztt\n")
        status, links = box.exec(["ip", "-o", "link"])
        assert status == 0
        interfaces = [line.split(":")[1].strip() for line in links.splitlines()]
        assert interfaces == ["lo"]
        assert "<LOOPBACK,UP,LOWER_UP>" in links

        # exec runs in the container's cgroups: each is the root of its
        # cgroup namespace, "/" (a process outside would see "/..").
        status, own = box.exec(["cat", "/proc/self/cgroup"])
        assert status == 0 and "0::/\n" in own
        assert all(line.endswith(":/") for line in own.splitlines()), own
        assert processes_in_cgroup("t-boot")
        assert str(box.init_pid) in (box.cgroups.unified / "init.scope/cgroup.procs").read_text()
        # Both limits, set wherever the host keeps the controller: a v1 hierarchy (a hybrid
        # host) or cgroup2 (a unified host); a host with neither fails here, not quietly.
        assert box.cgroups.limits == {"memory": 1 << 30, "pids": 1000}
        checked = []
        for controller, limit in box.cgroups.limits.items():
            if controller in box.cgroups.v1:
                path = box.cgroups.v1[controller]
                knob = {"memory": "memory.limit_in_bytes", "pids": "pids.max"}[controller]
                assert str(box.init_pid) in (path / "cgroup.procs").read_text().split()
            else:
                path, knob = box.cgroups.unified, {"memory": "memory.max", "pids": "pids.max"}[controller]
            assert (path / knob).read_text().strip() == str(limit), (controller, path / knob)
            checked.append(controller)
        assert sorted(checked) == ["memory", "pids"]
        assert box.cgroups.notes == []

        assert box.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\nerr\n")
        started = time.monotonic()
        assert box.exec(["sleep", "30"], timeout=0.5)[0] == 124
        assert time.monotonic() - started < 5

        assert cleanup_stale(state_dir) == []  # a live run is not stale
        assert box.running

        started = time.monotonic()
        assert box.poweroff(timeout=30) is True
        print(f"poweroff: {time.monotonic() - started:.2f} s")
        assert not box.running
        with pytest.raises(BootError):
            box.exec(["true"])

    assert_nothing_left(state_dir, "t-boot", box.cgroups.dirs)
    assert "Welcome to Debian" in box.console_log.read_text()
    assert listing(rootfs) == before, "the overlay's lower tree changed"


def test_failed_unit_means_degraded(rootfs, state_dir):
    def prepare(root: Path) -> None:
        write_unit(root, "vztt-broken.service",
                   "[Service]\nType=oneshot\nExecStart=/bin/false\n"
                   "[Install]\nWantedBy=multi-user.target\n")

    # overlay=False: also covers booting a scratch copy
    with Container(rootfs, state_dir, name="t-degraded", overlay=False, prepare=prepare) as box:
        assert box.wait_running(timeout=60) == ("degraded", ["vztt-broken.service"])
        box.poweroff(timeout=30)
    assert_nothing_left(state_dir, "t-degraded", box.cgroups.dirs)


def test_missing_init_is_a_boot_error(rootfs, state_dir):
    def prepare(root: Path) -> None:
        (root / "sbin/init").unlink()  # a whiteout in the upper dir

    box = Container(rootfs, state_dir, name="t-noinit", prepare=prepare)
    with pytest.raises(BootError) as error:
        box.start()
    assert "cannot execute /sbin/init" in str(error.value)
    assert str(box.console_log) in str(error.value)
    assert "cannot execute /sbin/init" in box.console_log.read_text()
    assert_nothing_left(state_dir, "t-noinit", box.cgroups.dirs)


def test_init_that_exits_is_a_boot_error(rootfs, state_dir):
    def prepare(root: Path) -> None:
        (root / "sbin/init").unlink()
        (root / "sbin/init").write_text("#!/bin/sh\necho init giving up\nexit 1\n")
        (root / "sbin/init").chmod(0o755)

    with pytest.raises(BootError) as error:
        with Container(rootfs, state_dir, name="t-exit1", prepare=prepare) as box:
            box.wait_running(timeout=30)
    assert "init exited with status 1" in str(error.value)
    assert str(box.console_log) in str(error.value)
    assert "init giving up" in box.console_log.read_text()
    assert_nothing_left(state_dir, "t-exit1", box.cgroups.dirs)


def test_wait_running_times_out(rootfs, state_dir):
    def prepare(root: Path) -> None:  # a unit that keeps the boot from finishing
        write_unit(root, "vztt-slow.service",
                   "[Service]\nType=oneshot\nExecStart=/bin/sleep 60\n"
                   "[Install]\nWantedBy=multi-user.target\n")

    with Container(rootfs, state_dir, name="t-slow", prepare=prepare) as box:
        started = time.monotonic()
        with pytest.raises(BootError, match="did not reach running within 2 s"):
            box.wait_running(timeout=2)
        assert time.monotonic() - started < 10
        assert box.poweroff(timeout=0) is False  # no time to stop: killed
        assert not box.running
    assert_nothing_left(state_dir, "t-slow", box.cgroups.dirs)


INTERRUPTED_OWNER = """
import sys, time
from vztt.boot.runtime import Container
with Container(sys.argv[1], sys.argv[2], name="t-sigint") as box:
    box.wait_running(timeout=60)
    print("up", flush=True)
    time.sleep(600)
"""


def test_keyboard_interrupt_cleans_up(rootfs, state_dir):
    owner = subprocess.Popen([sys.executable, "-c", INTERRUPTED_OWNER, str(rootfs), str(state_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert owner.stdout.readline() == "up\n"
        dirs = [Path(d) for d in json.loads((state_dir / "t-sigint.json").read_text())["cgroups"]]
        assert dirs[0].exists()
        owner.send_signal(signal.SIGINT)
        _, err = owner.communicate(timeout=30)
    finally:
        owner.kill()
        owner.wait()
    assert "KeyboardInterrupt" in err
    assert_nothing_left(state_dir, "t-sigint", dirs)


KILLED_OWNER = """
import json, sys, time
from vztt.boot.runtime import Container
box = Container(sys.argv[1], sys.argv[2], name="t-orphan").start()
box.wait_running(timeout=60)
print(json.dumps([str(d) for d in box.cgroups.dirs]), flush=True)
time.sleep(600)
"""


def test_cleanup_stale_after_owner_killed(rootfs, state_dir):
    owner = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(rootfs), str(state_dir)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        dirs = [Path(d) for d in json.loads(owner.stdout.readline())]
    finally:
        owner.kill()
        owner.wait()
    # What the killed run left (its container dies with it: parent-death signal).
    assert (state_dir / "t-orphan.json").exists()
    assert mounts_under(state_dir / "t-orphan")
    assert dirs[0].exists()

    assert cleanup_stale(state_dir) == ["t-orphan"]
    assert_nothing_left(state_dir, "t-orphan", dirs)


def test_cleanup_stale_kills_a_live_orphan(rootfs, state_dir):
    box = Container(rootfs, state_dir, name="t-live").start()
    try:
        box.wait_running(timeout=60)
        box._lock.close()  # as if our owner were gone, with the container still up
        assert processes_in_cgroup("t-live")
        assert cleanup_stale(state_dir) == ["t-live"]
        assert_nothing_left(state_dir, "t-live", box.cgroups.dirs)
    finally:
        box.close()


def test_not_root_is_runtime_unavailable(rootfs, tmp_path):
    script = ("import sys\nfrom vztt.boot.runtime import Container, RuntimeUnavailable\n"
              "try:\n    Container(sys.argv[1], sys.argv[2]).start()\n"
              "except RuntimeUnavailable as e:\n    print(type(e).__name__, e.exit_code, e)\n")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", script, str(rootfs), str(tmp_path / "state")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout == "RuntimeUnavailable 10 the container runtime needs root\n", result.stderr
    assert RuntimeUnavailable.exit_code == 10
