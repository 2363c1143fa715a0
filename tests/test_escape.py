"""Escape attempts from inside a booted container: each must fail, with the error
the wall that stops it gives (the capability bounding set, the seccomp filter,
the device policy, the /proc masks, the namespaces).

tests/escape.c is built static and put into the container's scratch tree (the
overlay's upper directory, through Container's `prepare`); the template tree
stays as it was. One container serves every attempt; each runs as root inside
through Container.exec, as a test's or `vztt run`'s command would.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rootfs_helpers import debian_rootfs, rootfs_cached  # noqa: E402

from vztt.boot.runtime import Container, RuntimeUnavailable, _confine, idmap  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="booting containers needs root"),
    *([] if rootfs_cached() else [pytest.mark.network]),
]

SOURCE = Path(__file__).with_name("escape.c")
INSIDE = "/usr/local/sbin/vztt-escape"   # in the overlay's upper directory only


@pytest.fixture(scope="module")
def escape_binary(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("escape") / "escape"
    subprocess.run(["gcc", "-static", "-O1", "-Wall", "-Werror", "-o", str(out), str(SOURCE)], check=True)
    return out


def host_block_device() -> str:
    """MAJ:MIN of a block device of the host (the disk under / if / is on one)."""
    dev = os.stat("/").st_dev
    if os.major(dev) != 0:
        return f"{os.major(dev)}:{os.minor(dev)}"
    for entry in sorted(Path("/sys/class/block").iterdir()):
        if not entry.name.startswith(("loop", "ram")):
            return (entry / "dev").read_text().strip()
    return (next(Path("/sys/class/block").iterdir()) / "dev").read_text().strip()


@pytest.fixture(scope="module")
def box(escape_binary, tmp_path_factory):
    rootfs = debian_rootfs()
    state = tmp_path_factory.mktemp("escape-state")

    def put_escape(root: Path) -> None:
        target = root / INSIDE.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(escape_binary, target)

    with Container(rootfs, state, hostname="escape", prepare=put_escape) as container:
        state_, failed = container.wait_running(timeout=60)
        container.boot_state = (state_, failed)
        yield container
        container.poweroff(timeout=30)
    assert not (rootfs / INSIDE.lstrip("/")).exists(), "the escape program got into the template's tree"


def attempt(box: Container, *args: str) -> str:
    status, out = box.exec([INSIDE, *args], timeout=30)
    assert status == 0, out
    return out.strip().splitlines()[-1]


def assert_blocked(line: str, *errnos: str, step: str | None = None) -> None:
    match = re.fullmatch(r"blocked (\S+) \((.*)\)", line)
    assert match, line
    assert match.group(1) in errnos, line
    if step is not None:
        assert match.group(2) == step, line


def test_the_container_booted_clean(box):
    assert box.boot_state == ("running", [])


def own_bounding_set() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd in /proc/self/status")


def test_capabilities_inside_are_the_kept_set(box):
    # in a user namespace: the kept list, within it (joining one starts from a full set);
    # without: what the host's own bounding set allows of it (this host's lacks CAP_SYS_RESOURCE)
    expected = _confine.KEEP_MASK if box.userns else _confine.KEEP_MASK & own_bounding_set()
    assert expected & (1 << _confine.CAPS["CAP_SYS_ADMIN"])
    status, out = box.exec(["grep", "-E", "^Cap(Eff|Bnd|Amb|Inh):", "/proc/self/status"])
    caps = dict(line.split(":\t") for line in out.split("\n") if line)
    assert int(caps["CapBnd"], 16) == expected, out
    assert int(caps["CapEff"], 16) == expected, out
    assert int(caps["CapAmb"], 16) == 0 and int(caps["CapInh"], 16) == 0, out
    # init's too, not only exec's: its bounding set and a seccomp filter (mode 2)
    status, out = box.exec(["grep", "-E", "^(CapBnd|Seccomp):", "/proc/1/status"])
    assert f"{expected:016x}" in out and re.search(r"Seccomp:\s+2", out), out


def test_open_by_handle(box):
    assert_blocked(attempt(box, "by-handle"), "EPERM", step="open_by_handle_at")


def test_block_device_of_the_host(box):
    # the device policy refuses the node itself (no "m" for any block device)
    assert_blocked(attempt(box, "block-device", host_block_device()), "EPERM", step="mknod")


def test_mount_the_host_disk(box):
    assert_blocked(attempt(box, "mount-disk", host_block_device()), "EPERM", step="mknod")


def test_cgroup_v1_release_agent(box):
    # a v1 hierarchy mounted in the container's cgroup namespace is rooted at its own
    # cgroup, which has no release_agent (only a hierarchy's root has one)
    assert_blocked(attempt(box, "release-agent"), "ENOENT", "EPERM", step="open release_agent")


def test_sibling_cgroup(box):
    sibling = box.cgroups.unified.parent / f"escape-sibling-{uuid.uuid4().hex[:8]}"
    sibling.mkdir()
    try:
        assert_blocked(attempt(box, "sibling-cgroup", sibling.name), "ENOENT", step="open sibling cgroup.procs")
    finally:
        sibling.rmdir()


@pytest.mark.parametrize("name,step", [
    ("module", "init_module/finit_module"), ("kexec", "kexec_load"), ("iopl", "iopl"),
    ("time", "clock_settime/settimeofday"), ("perf", "perf_event_open"), ("bpf", "bpf"),
    ("userfaultfd", "userfaultfd"), ("swapon", "swapon"),
])
def test_refused_system_calls(box, name, step):
    assert_blocked(attempt(box, name), "EPERM", step=step)


def test_keyring(box):
    assert_blocked(attempt(box, "keyctl"), "ENOSYS", step="keyctl")


def test_kernel_log(box):
    # not in the container's /dev, and the device policy refuses making it
    assert_blocked(attempt(box, "kmsg"), "EPERM", step="mknod /dev/kmsg")


def test_kernel_memory(box):
    if Path("/proc/kcore").exists():   # masked by an empty file (and no CAP_SYS_RAWIO under it)
        assert_blocked(attempt(box, "kcore"), "ENODATA", "EPERM")
    else:                              # a kernel without CONFIG_PROC_KCORE, like this host's
        assert_blocked(attempt(box, "kcore"), "ENOENT", step="open /proc/kcore")


def test_sysrq_trigger(box):
    if Path("/proc/sysrq-trigger").exists():   # bound read-only
        assert_blocked(attempt(box, "sysrq"), "EROFS", step="open /proc/sysrq-trigger")
    else:                                      # a kernel without CONFIG_MAGIC_SYSRQ
        assert_blocked(attempt(box, "sysrq"), "ENOENT", step="open /proc/sysrq-trigger")


def test_hostname_stays_the_hosts(box):
    before = socket.gethostname()
    assert attempt(box, "sethostname") == "changed (own namespace)"
    assert socket.gethostname() == before


def test_ptrace_a_host_process(box):
    helper = subprocess.Popen(["sleep", "60"])
    try:
        assert_blocked(attempt(box, "ptrace", str(helper.pid)), "ESRCH", "EPERM", step="ptrace attach")
    finally:
        helper.kill()
        helper.wait()


def test_abstract_socket_of_the_host(box):
    name = f"vztt-escape-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(1)
        assert_blocked(attempt(box, "abstract-socket", name), "ECONNREFUSED", step="connect")


def test_host_root_file_through_proc_pid_root(box, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host only\n")
    secret.chmod(0o600)
    helper = subprocess.Popen(["sleep", "60"])
    try:
        assert_blocked(attempt(box, "proc-root", str(helper.pid), str(secret)), "ENOENT", "EACCES", "EPERM",
                       step="open /proc/PID/root/...")
    finally:
        helper.kill()
        helper.wait()


def test_proc_and_sys_masks(box):
    assert Path("/proc/kallsyms").read_bytes() and os.listdir("/sys/firmware")   # the host has them
    status, out = box.exec(["sh", "-c", "cat /proc/keys /proc/timer_list /proc/kallsyms | wc -c; "
                            "ls -A /sys/firmware | wc -l; "
                            "echo 1 > /proc/sys/kernel/panic 2>&1 || echo refused"])
    assert status == 0, out
    lines = out.split()
    assert lines[0] == "0" and lines[1] == "0", out
    assert "Read-only file system" in out, out


# -- what the user namespace adds ---------------------------------------------------

def test_root_inside_is_an_unprivileged_host_range(box):
    status, out = box.exec(["cat", "/proc/self/uid_map", "/proc/self/gid_map"])
    uid_line, gid_line = [line.split() for line in out.splitlines()]
    assert uid_line[0] == "0" and uid_line[2] == str(idmap.SLOT), out
    assert int(uid_line[1]) == box.ids.uid and int(gid_line[1]) == box.ids.gid, out
    assert box.ids.uid >= idmap.SLOT and box.ids.gid >= idmap.SLOT       # not the host's root, nor any user
    # a file made inside belongs, on the host, to the container's range
    assert box.exec(["touch", "/root/made-inside"])[0] == 0
    made = box.scratch / "upper/root/made-inside"
    assert (made.stat().st_uid, made.stat().st_gid) == (box.ids.uid, box.ids.gid)
    # and the tree's files are root's inside
    assert box.exec(["stat", "-c", "%u:%g", "/etc/passwd", "/usr/bin/passwd"])[1].split() == ["0:0", "0:0"]


def test_fresh_proc_sysctls_are_not_writable(box):
    """Without a user namespace, root with CAP_SYS_ADMIN mounts a new proc and writes
    kernel.core_pattern: the read-only /proc/sys is only a mount flag."""
    assert_blocked(attempt(box, "fresh-proc"), "EACCES", "EPERM", "EROFS")


def test_own_cgroup_limits_are_the_hosts(box):
    # mounted, the hierarchy shows the container its own cgroup without the limit files
    assert_blocked(attempt(box, "raise-limit"), "ENOENT", "EACCES", "EPERM", "EROFS")


def test_two_containers_never_share_ids(box, tmp_path):
    with Container(debian_rootfs(), tmp_path / "state", hostname="second") as other:
        assert other.ids.uid != box.ids.uid and other.ids.gid != box.ids.gid
        assert abs(other.ids.uid - box.ids.uid) >= idmap.SLOT
        assert other.wait_running(timeout=60) == ("running", [])
        assert other.poweroff(timeout=30)


def test_no_user_namespaces_on_the_host_is_runtime_unavailable(tmp_path, monkeypatch):
    disabled = tmp_path / "max_user_namespaces"
    disabled.write_text("0\n")
    monkeypatch.setattr(idmap, "MAX_USERNS", disabled)
    with pytest.raises(RuntimeUnavailable) as caught:
        Container(debian_rootfs(), tmp_path / "state").start()
    message = str(caught.value)
    assert "user.max_user_namespaces = 0" in message and "--unsafe-no-userns" in message
    assert "\n" not in message and caught.value.exit_code == 10
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_unsafe_no_userns_boots_as_the_hosts_root(tmp_path):
    with Container(debian_rootfs(), tmp_path / "state", userns=False) as box:
        assert box.wait_running(timeout=60) == ("running", [])
        assert box.exec(["cat", "/proc/self/uid_map"])[1].split() == ["0", "0", "4294967295"]
        # the other walls stay
        status, out = box.exec(["grep", "^Seccomp:", "/proc/self/status"])
        assert out.split() == ["Seccomp:", "2"], out
        assert box.poweroff(timeout=30)


# -- another's template boots in a VM by default ----------------------------------

def _cache_with(pulled) -> object:
    from types import SimpleNamespace
    entry = SimpleNamespace(manifest=SimpleNamespace(pulled=pulled))
    return SimpleNamespace(entry=lambda name: entry)


def test_pulled_template_of_another_key_boots_in_a_vm(monkeypatch):
    from types import SimpleNamespace
    from vztt.base.errors import BadUsage
    from vztt.boot.test import default_vm
    ours, theirs = "A" * 24 + "0123456789ABCDEF", "B" * 40
    pulled = lambda signer: SimpleNamespace(source="https://mirror.example/", signer=signer)  # noqa: E731
    for name in ("VZTT_OWN_KEYS", "VZTT_SIGN_KEY", "VZTT_UNTRUSTED_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    assert default_vm(_cache_with(None), "t") == (False, None)            # built here
    vm, why = default_vm(_cache_with(pulled(theirs)), "t")
    assert vm and theirs in why and "mirror.example" in why
    monkeypatch.setenv("VZTT_SIGN_KEY", "0x0123456789ABCDEF")             # our publishing key, as a long id
    assert default_vm(_cache_with(pulled(ours)), "t") == (False, None)
    assert default_vm(_cache_with(pulled(theirs)), "t")[0]
    monkeypatch.setenv("VZTT_OWN_KEYS", theirs.lower())                   # the configured list wins
    assert default_vm(_cache_with(pulled(theirs)), "t") == (False, None)
    assert default_vm(_cache_with(pulled(ours)), "t")[0]
    monkeypatch.setenv("VZTT_UNTRUSTED_RUNTIME", "container")
    assert default_vm(_cache_with(pulled(ours)), "t")[0] is False
    monkeypatch.setenv("VZTT_UNTRUSTED_RUNTIME", "chroot")
    with pytest.raises(BadUsage):
        default_vm(_cache_with(pulled(ours)), "t")


def test_rpm_verify_ignores_only_the_owner_of_kernel_mounts():
    """In a user namespace /proc and /sys belong to the host's root (nobody inside): rpm -Va
    says U and G for the filesystem package's directories; that alone is no defect."""
    from vztt.boot.checks import rpm_verify_problem
    assert not rpm_verify_problem(".....UG..    /proc")
    assert not rpm_verify_problem(".....U...    /sys")
    assert rpm_verify_problem(".M...UG..    /proc")        # a mode change still is
    assert rpm_verify_problem(".....UG..    /usr/bin/su")  # and an owner anywhere else
