"""x86-64 microarchitecture levels: what a template's programs need from the
CPU (a recipe's `cpu_level`; EL 10 is built for x86-64-v3), whether this host
has it (a container, and a KVM guest, run on the host's CPU), and the qemu
CPU model that gives a TCG guest it.

A program built for a level its CPU lacks does not start: EL 10's glibc stops
every one with "CPU ISA level is lower than required". Better one line before
booting, naming the missing instructions, than a template that does not boot.
"""

from __future__ import annotations

import platform
from pathlib import Path

from vztt.base.errors import RuntimeUnavailable

BASELINE = "x86-64"
# Each level adds these CPU flags (as /proc/cpuinfo names them) to the one before
# (the psABI's table; abm is LZCNT, xsave stands for OSXSAVE).
_ADDS: dict[str, tuple[str, ...]] = {
    BASELINE: (),
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
LEVELS: tuple[str, ...] = tuple(_ADDS)
# qemu's names where they differ from the kernel's
_QEMU_NAMES = {"lahf_lm": "lahf-lm", "sse4_1": "sse4.1", "sse4_2": "sse4.2"}
# The TCG model: everything qemu emulates (7.2 and later: AVX2, FMA, BMI2, MOVBE, F16C: x86-64-v3;
# not AVX-512). `enforce` below makes qemu refuse at start a level it cannot give.
TCG_MODEL = "max"


def flags(level: str) -> tuple[str, ...]:
    """Every CPU flag `level` needs (those of the levels below it included)."""
    if level not in _ADDS:
        raise ValueError(f"unknown x86-64 level {level!r} (one of {', '.join(LEVELS)})")
    out: list[str] = []
    for name, added in _ADDS.items():
        out += added
        if name == level:
            return tuple(out)
    raise AssertionError(level)


def host_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (every CPU of a host has the same)."""
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def require_on_host(level: str, template: str, cpuinfo: str | None = None) -> None:
    """RuntimeUnavailable if this host's CPU lacks what `level` needs (a container or a
    KVM guest of `template` would run its programs on it)."""
    if level == BASELINE or platform.machine() != "x86_64":
        return
    missing = [f for f in flags(level) if f not in host_flags(cpuinfo)]
    if missing:
        raise RuntimeUnavailable(f"{template}: its programs need an {level} CPU (cpu_level), and this host's "
                                 f"lacks {', '.join(missing)}: it cannot run them")


def qemu_cpu(level: str) -> str:
    """qemu's -cpu for a TCG guest of `level`: the emulated maximum, with the level's
    flags enforced (qemu exits at start, naming them, if it cannot emulate one)."""
    wanted = flags(level)
    if not wanted:
        return TCG_MODEL
    return ",".join([TCG_MODEL, *(f"+{_QEMU_NAMES.get(f, f)}" for f in wanted), "enforce"])
