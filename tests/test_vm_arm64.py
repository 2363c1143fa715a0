"""The VM boot test on aarch64 (issue #21): `vztt test NAME --vm` of the arm64
template (conftest's debian12_arm64, built on this x86_64 host) in
`qemu-system-aarch64 -machine virt` under TCG, with the arm64 kernel built
from the same kernel/ series and fragments (test_kernel.py's session build,
`vztt kernel build --arch aarch64`, cross-compiled).

One boot: the template as built, with smoke checks added to its recipe that
ask the guest what it is (uname -m, the kernel's version) and with the
recipe's `osrelease` (the patch's kernel.virt_osrelease, as test_vm.py checks
on x86_64). conftest's VZTT_TEST_ARM64_CACHE: a template cache holding an already built
debian-12-aarch64-minimal (copied, never written), instead of building it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import BuiltTemplate, run_vztt
import test_kernel
from test_kernel import kernel_env
from test_vm import nothing_left, recipes_with
from vztt.base.errors import RuntimeUnavailable
from vztt.boot.runtime import vm

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="booting templates needs root")
NAME = "debian-12-aarch64-minimal"
OSRELEASE = "2.6.32-vztt"

built_kernel_arm64 = test_kernel.built_kernel_arm64     # the session's arm64 kernel cache

# Asked inside the booted guest. The initial UTS namespace (kthreadd's) keeps the real release.
ARM64_SMOKE = r'''
osrelease = "2.6.32-vztt"

[[smoke]]
name = "machine"
command = "uname -m; dpkg --print-architecture"
output = '\Aaarch64\narm64\n\Z'

[[smoke]]
name = "booted-system-release"
command = "uname -r; cat /proc/sys/kernel/osrelease /proc/sys/kernel/virt_osrelease"
output = '\A2\.6\.32-vztt\n2\.6\.32-vztt\n2\.6\.32-vztt\n\Z'

[[smoke]]
name = "our-arm64-kernel"
command = "nsenter --uts=/proc/2/ns/uts uname -r; cat /proc/version"
output = '\A6\.1\.\d+-vztt\n.*aarch64-linux-gnu-gcc'
'''


# -- fast: the machine table --------------------------------------------------------------

def test_an_aarch64_guest_gets_virt_its_console_and_tcg_without_a_probe(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if vm.platform.machine() != "x86_64":
        pytest.skip("an x86_64 host's view of a foreign guest")

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("KVM probed for a foreign guest")

    monkeypatch.setattr(vm, "kvm_usable", no_probe)
    monkeypatch.delenv("VZTT_VM_ACCEL", raising=False)
    box = vm.VM(tmp_path / "tree", tmp_path / "scratch", tmp_path / "Image", arch="aarch64")
    assert (box.target.qemu, box.target.package, box.target.machine) == ("qemu-system-aarch64", "qemu-system-arm",
                                                                        "virt")
    box.accel, why = box._choose_accel("qemu-system-aarch64")
    assert (box.accel, why) == ("tcg", "an aarch64 guest on an x86_64 host")
    words = box._cmdline().split()
    assert "console=ttyAMA0" in words and "systemd.mask=serial-getty@ttyAMA0.service" in words
    assert not any(w.startswith("tsc_early_khz=") for w in words)      # x86's TSC hint: not for arm64
    x86 = vm.VM(tmp_path / "tree", tmp_path / "scratch", tmp_path / "bzImage")
    x86.accel = "tcg"
    assert "console=ttyS0" in x86._cmdline().split() and x86.target.machine == "microvm"

    kvm = vm.VM(tmp_path / "tree", tmp_path / "scratch", tmp_path / "Image", arch="aarch64", accel="kvm")
    with pytest.raises(RuntimeUnavailable, match=r"KVM cannot run an aarch64 guest on this x86_64 host"):
        kvm._choose_accel("qemu-system-aarch64")
    with pytest.raises(RuntimeUnavailable, match=r"boots x86_64, aarch64 guests, not riscv64"):
        vm.VM(tmp_path / "tree", tmp_path / "scratch", tmp_path / "Image", arch="riscv64")


# -- the boot ----------------------------------------------------------------------------

@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_debian12_arm64_boots_in_an_aarch64_vm(debian12_arm64: BuiltTemplate, built_kernel_arm64: Path,
                                               tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    cache = debian12_arm64.cache
    recipes = recipes_with(tmp_path, NAME, ARM64_SMOKE)
    result = run_vztt("test", NAME, "--vm", "--json", cache=cache, recipes=recipes,
                      env=kernel_env(built_kernel_arm64), timeout=1200)
    report = result.json()
    failed = {c["name"]: (c.get("detail"), c.get("output", "")[-1500:]) for c in report["checks"]
              if c["result"] != "passed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    # running, not degraded: no failed unit at all (allowed_failed is not used for it)
    boot = checks["boot"]["detail"]
    assert re.match(r"running in [\d.]+ s \(qemu virt, tcg; an aarch64 guest on an x86_64 host", boot), boot
    assert checks["failed-units"]["result"] == "passed"
    assert checks["osrelease"]["detail"] == OSRELEASE
    for smoke in ("machine", "booted-system-release", "our-arm64-kernel"):
        assert checks[f"smoke:{smoke}"]["result"] == "passed", checks[f"smoke:{smoke}"]
    assert {"network:address", "network:ping", "network:ssh"} <= set(checks)
    console = Path(report["console_log"]).read_text(errors="replace")
    assert "Linux version 6.1." in console and "-vztt" in console and "aarch64-linux-gnu-gcc" in console
    assert "reboot: Power down" in console          # PSCI ended qemu, not a kill
    seconds = report["ready_seconds"]
    record_property("arm64_vm_boot_seconds", seconds)
    print(f"arm64 VM: {boot}; ready in {seconds} s")
    assert seconds < 600
    assert nothing_left(cache) == []
