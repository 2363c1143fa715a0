"""The VM runtime (issue #6): `vztt test NAME --vm` boots the cached template
in qemu with vztt's kernel (test_kernel.py's session build) and runs the
container boot test's checks in it through the guest agent; osrelease through
kernel.virt_osrelease.

Three boots in all: the debian-12 template as built (about 20 s under TCG),
the same with `osrelease` and smoke checks that exercise the sysctl's rules,
and one that cannot boot within its time bound (a few seconds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (PACKAGE_CACHE, REPO, RECIPES, BuiltTemplate, leftovers, one_line_error, processes_naming,
                      run_vztt)
import test_kernel
from test_kernel import kernel_env
from vztt.store.templates import TemplateCache
from vztt.boot.runtime import OSRELEASE_SYSCTL, guest, vm

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="booting templates needs root")

# The session's kernel fixture, bound here for pytest (assigned, not imported by name:
# pyflakes reads a test's parameter of an imported name as a redefinition)
built_kernel = test_kernel.built_kernel

OSRELEASE = "2.6.32-vztt"

# Smoke checks of the sysctl's rules, run in the guest (util-linux's nsenter,
# unshare and setpriv are in every minimal template). kthreadd (PID 2) lives
# in the initial UTS namespace; the booted system, with `osrelease`, in its own.
OSRELEASE_SMOKE = r'''
osrelease = "2.6.32-vztt"

[[smoke]]
name = "booted-system-release"
command = "uname -r; cat /proc/sys/kernel/osrelease /proc/sys/kernel/virt_osrelease"
output = '\A2\.6\.32-vztt\n2\.6\.32-vztt\n2\.6\.32-vztt\n\Z'

[[smoke]]
name = "initial-namespace-keeps-the-real-release"
command = "nsenter --uts=/proc/2/ns/uts uname -r"
output = '\A6\.1\.\d+-vztt\n\Z'

[[smoke]]
name = "fresh-namespace-from-the-initial-one"
command = "nsenter --uts=/proc/2/ns/uts unshare --uts sh -c 'echo 4.4.0-vztt > /proc/sys/kernel/virt_osrelease && uname -r'; nsenter --uts=/proc/2/ns/uts uname -r"
output = '\A4\.4\.0-vztt\n6\.1\.\d+-vztt\n\Z'

[[smoke]]
name = "fresh-namespace-from-the-system"
command = "unshare --uts sh -c 'echo 3.10.0-vztt > /proc/sys/kernel/virt_osrelease && uname -r'; uname -r"
output = '\A3\.10\.0-vztt\n2\.6\.32-vztt\n\Z'

[[smoke]]
name = "not-writable-in-the-initial-namespace"
command = "printf 9.9.9 | nsenter --uts=/proc/2/ns/uts tee /proc/sys/kernel/virt_osrelease"
exit_status = 1
output = 'virt_osrelease: Operation not permitted'

[[smoke]]
name = "not-writable-without-cap-sys-admin"
command = "printf 9.9.9 | unshare --uts setpriv --bounding-set=-sys_admin tee /proc/sys/kernel/virt_osrelease"
exit_status = 1
output = 'virt_osrelease: Operation not permitted'

[[smoke]]
name = "not-writable-by-an-unprivileged-user"
command = "printf 9.9.9 | setpriv --reuid=65534 --regid=65534 --clear-groups tee /proc/sys/kernel/virt_osrelease"
exit_status = 1
output = 'virt_osrelease: Permission denied'

[[smoke]]
name = "not-writable-by-an-unprivileged-user-in-its-own-namespaces"
command = "printf 9.9.9 | setpriv --reuid=65534 --regid=65534 --clear-groups unshare --user --map-root-user --uts tee /proc/sys/kernel/virt_osrelease"
exit_status = 1
output = 'virt_osrelease: Permission denied'
'''


def qemu_processes(cache: Path) -> list[str]:
    """qemu processes booting a disk under `cache`."""
    return [p for p in processes_naming(cache) if "qemu-system" in p]


def nothing_left(cache: Path) -> list[str]:
    return leftovers(cache) + qemu_processes(cache)


def recipes_with(tmp_path: Path, name: str, extra: str) -> Path:
    """A copy of the recipes in which NAME's recipe gets `extra` (TOML) at the end."""
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    leaf = recipes / f"{name}.toml"
    lines = extra.strip().splitlines()
    first_table = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    # top-level keys before the file's own, tables after everything
    top, tables = "\n".join(lines[:first_table]), "\n".join(lines[first_table:])
    leaf.write_text(top + "\n" + leaf.read_text() + "\n" + tables + "\n")
    return recipes


# -- fast: the guest's scripts, the TSC ---------------------------------------------------

@pytest.mark.parametrize("script", [guest.AGENT, guest.INIT.replace("RELEASE", "2.6.32")])
def test_guest_scripts_are_valid_sh(script: str, tmp_path: Path) -> None:
    path = tmp_path / "script"
    path.write_text(script)
    for shell in ("dash", "bash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr


def test_osrelease_values_are_checked() -> None:
    assert vm.check_osrelease("2.6.32-754.el6.x86_64") == "2.6.32-754.el6.x86_64"
    for bad in ("", "2.6 32", "x" * 65, "-2.6", "2.6\n", "$(reboot)"):
        with pytest.raises(ValueError):
            vm.check_osrelease(bad)


def test_host_tsc_rate_is_plausible() -> None:
    khz = vm.host_tsc_khz()
    if khz is None:
        pytest.skip("no constant TSC here")
    assert 100_000 <= khz <= 10_000_000


# -- boots -------------------------------------------------------------------------------

@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_debian12_boots_in_a_vm_and_passes_its_checks(debian12: BuiltTemplate, built_kernel: Path) -> None:
    name = debian12.name
    result = run_vztt("test", name, "--vm", "--json", cache=debian12.cache, env=kernel_env(built_kernel))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.json()
    assert report["result"] == "passed"
    names = [c["name"] for c in report["checks"]]
    assert names[:8] == ["boot", "failed-units", "hostname", "loopback", "network:address", "network:ping",
                         "network:ssh", "package-db"]
    assert names[-1] == "poweroff" and all(n.startswith("smoke:") for n in names[8:-1])
    # virtio-net: the same network rows as in a container
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["network:ssh"]["detail"].startswith("ssh root@192.0.2.2 uname -n: localhost; host key ")
    boot = report["checks"][0]["detail"]
    assert re.match(r"(running|degraded) in [\d.]+ s \(qemu microvm, (kvm|tcg)", boot), boot
    if not vm.kvm_usable(shutil.which(vm.QEMU) or vm.QEMU, next(built_kernel.glob("*/bzImage")))[0]:
        assert ", tcg; KVM unusable" in boot
    assert report["console_log"].endswith(f"logs/{name}.vm.console.log")
    console = Path(report["console_log"]).read_text(errors="replace")
    assert "Linux version 6.1." in console and "-vztt" in console and "reboot: Power down" in console
    assert report["ready_seconds"] < 180
    assert nothing_left(debian12.cache) == []


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_debian13_boots_in_a_vm_with_no_failed_unit(built_kernel: Path, tmp_path: Path) -> None:
    """Debian 13's systemd (257) runs systemd-modules-load for its
    /etc/modules-load.d/modules.conf and fails it on a kernel without module
    support: the VM masks the unit, as a container skips it (no
    CAP_SYS_MODULE), and the boot is clean."""
    name, cache = "debian-13-x86_64-minimal", tmp_path / "cache"
    built = run_vztt("build", name, "--no-test", cache=cache)
    assert built.returncode == 0, built.stderr[-3000:]
    result = run_vztt("test", name, "--vm", "--json", cache=cache, env=kernel_env(built_kernel))
    report = result.json()
    failed = {c["name"]: c.get("detail") for c in report["checks"] if c["result"] != "passed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    assert {"network:address", "network:ping", "network:ssh"} <= {c["name"] for c in report["checks"]}
    # and in a container: every row, the network's included (debian-13's only container boot in `make test`)
    result = run_vztt("test", name, "--json", cache=cache)
    report = result.json()
    failed = {c["name"]: (c.get("detail"), c.get("output", "")[-1500:]) for c in report["checks"]
              if c["result"] != "passed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    assert [c["name"] for c in report["checks"]][4:7] == ["network:address", "network:ping", "network:ssh"]
    state = run_vztt("run", name, "--vm", "--", "systemctl", "show", "-p", "LoadState,ActiveState",
                     "systemd-modules-load.service", cache=cache, env=kernel_env(built_kernel))
    assert state.returncode == 0, state.stderr[-2000:]
    assert state.stdout.split() == ["LoadState=masked", "ActiveState=inactive"]
    assert nothing_left(cache) == []


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_osrelease_in_the_vm(debian12: BuiltTemplate, built_kernel: Path, tmp_path: Path) -> None:
    """The recipe's osrelease is what the booted system's uname -r says; a
    fresh UTS namespace can set its own; the initial namespace keeps the real
    release and cannot be written; nor can a task without CAP_SYS_ADMIN or an
    unprivileged user (even root in its own user namespace)."""
    recipes = recipes_with(tmp_path, debian12.name, OSRELEASE_SMOKE)
    result = run_vztt("test", debian12.name, "--vm", "--json", cache=debian12.cache, recipes=recipes,
                      env=kernel_env(built_kernel))
    report = result.json()
    failed = {c["name"]: (c.get("detail"), c.get("output")) for c in report["checks"] if c["result"] != "passed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["osrelease"]["detail"] == OSRELEASE
    smoke = re.findall(r'^name = "(.*)"$', OSRELEASE_SMOKE, re.MULTILINE)
    assert len(smoke) == 8 and all(checks[f"smoke:{n}"]["result"] == "passed" for n in smoke)
    assert nothing_left(debian12.cache) == []


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_a_vm_that_does_not_boot_in_time_is_killed_and_its_console_kept(debian12: BuiltTemplate,
                                                                         built_kernel: Path,
                                                                         tmp_path: Path) -> None:
    # 3 s (9 s under TCG, which every VM here uses): far from a boot, long enough for the
    # kernel's first lines to reach the console on a loaded host (1 s left it empty).
    recipes = recipes_with(tmp_path, debian12.name, "[boot]\ntimeout = 3\n")
    result = run_vztt("test", debian12.name, "--vm", cache=debian12.cache, recipes=recipes,
                      env=kernel_env(built_kernel), timeout=120)
    assert result.returncode == 8, result.stdout + result.stderr
    line = one_line_error(result)
    console = debian12.cache / "logs" / f"{debian12.name}.vm.console.log"
    assert line.startswith(f"vztt: boot error: {debian12.name}: the template did not boot:"), line
    assert str(console) in line
    assert "Linux version" in console.read_text(errors="replace")
    assert nothing_left(debian12.cache) == []


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_container_on_a_kernel_without_the_patch_notes_osrelease(debian12: BuiltTemplate, tmp_path: Path) -> None:
    """The container runtime on a host kernel without kernel.virt_osrelease:
    noted on the console, the osrelease check says it was not applied, and the
    test passes."""
    if Path(OSRELEASE_SYSCTL).exists():
        pytest.skip("this host's kernel has kernel.virt_osrelease")
    recipes = recipes_with(tmp_path, debian12.name, f'osrelease = "{OSRELEASE}"\n')
    result = run_vztt("test", debian12.name, "--json", cache=debian12.cache, recipes=recipes)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    checks = {c["name"]: c for c in result.json()["checks"]}
    assert checks["osrelease"]["result"] == "passed"
    assert checks["osrelease"]["detail"].startswith("not applied: this kernel (")
    console = (debian12.cache / "logs" / f"{debian12.name}.console.log").read_text(errors="replace")
    assert f"no kernel.virt_osrelease: osrelease {OSRELEASE} not applied" in console


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_a_killed_vm_test_leaves_no_qemu_and_is_cleaned_up(debian12: BuiltTemplate, built_kernel: Path) -> None:
    """SIGKILL vztt while its VM boots: qemu dies with it (parent-death
    signal); the scratch disk is what the next run removes first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env.update(VZTT_PACKAGE_CACHE=str(PACKAGE_CACHE), **kernel_env(built_kernel))
    proc = subprocess.Popen([sys.executable, "-m", "vztt", "--cache-dir", str(debian12.cache), "test", debian12.name,
                             "--vm"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not qemu_processes(debian12.cache) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert qemu_processes(debian12.cache), "qemu never started"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while qemu_processes(debian12.cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_processes(debian12.cache) == []
    TemplateCache(debian12.cache).clean_stale_work()   # what the next test, run or build does first
    assert nothing_left(debian12.cache) == []
