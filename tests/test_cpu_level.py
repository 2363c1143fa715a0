"""A recipe's `cpu_level` (boot/runtime/cpu.py): what the host's CPU must have
for a container or a KVM guest, and the qemu model a TCG guest gets. The boot
with an x86-64-v3 CPU is in test_el_fixture.py; here, the levels themselves
and a level qemu cannot emulate, refused when the VM starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_kernel import built_kernel  # noqa: F401  (the session's kernel)
from vztt.boot.runtime import RuntimeUnavailable, cpu
from vztt.boot.runtime.vm import VM

HASWELL = ("fpu lm cx8 cmov mmx fxsr sse sse2 syscall ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm movbe fma avx "
           "avx2 bmi1 bmi2 f16c abm xsave")
NEHALEM = "fpu lm cx8 cmov mmx fxsr sse sse2 syscall ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm"


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


def test_each_level_has_the_flags_of_those_below() -> None:
    assert cpu.flags("x86-64") == ()
    v2, v3, v4 = cpu.flags("x86-64-v2"), cpu.flags("x86-64-v3"), cpu.flags("x86-64-v4")
    assert set(v2) < set(v3) < set(v4)
    assert {"avx2", "fma", "bmi2", "movbe"} <= set(v3) and "avx512f" in v4 and "avx512f" not in v3
    with pytest.raises(ValueError):
        cpu.flags("x86-64-v5")


def test_the_host_check_names_what_the_cpu_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    cpu.require_on_host("x86-64-v3", "el10", cpuinfo(HASWELL))
    cpu.require_on_host("x86-64-v2", "el9", cpuinfo(NEHALEM))
    cpu.require_on_host("x86-64", "any", cpuinfo("fpu"))
    with pytest.raises(RuntimeUnavailable) as e:
        cpu.require_on_host("x86-64-v3", "almalinux-10-x86_64-minimal", cpuinfo(NEHALEM))
    assert e.value.exit_code == 10
    assert str(e.value) == ("almalinux-10-x86_64-minimal: its programs need an x86-64-v3 CPU (cpu_level), and this "
                            "host's lacks avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave: it cannot run them")


def test_the_tcg_model_enforces_the_level() -> None:
    assert cpu.qemu_cpu("x86-64") == "max"
    model = cpu.qemu_cpu("x86-64-v3").split(",")
    assert model[0] == "max" and model[-1] == "enforce"
    assert {"+avx2", "+fma", "+bmi2", "+movbe", "+lahf-lm", "+sse4.2"} <= set(model)


@pytest.mark.skipif(os.geteuid() != 0, reason="the VM runtime needs root")
@pytest.mark.slow
def test_a_level_qemu_cannot_emulate_is_refused_when_the_vm_starts(built_kernel: Path, tmp_path: Path) -> None:  # noqa: F811
    """qemu 7.2's TCG has no AVX-512: an x86-64-v4 guest stops at once, qemu's words in the line."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    kernel = next(built_kernel.glob("*/bzImage"))
    vm = VM(tree, tmp_path / "scratch", kernel, accel="tcg", cpu_level="x86-64-v4",
            console_log=tmp_path / "console.log")
    with pytest.raises(RuntimeUnavailable) as e:
        with vm:
            pass
    assert "exited at once" in str(e.value) and "TCG doesn't support requested feature" in str(e.value)
    assert "avx512" in str(e.value)
    assert not (tmp_path / "scratch").exists()
