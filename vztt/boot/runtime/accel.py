"""How qemu runs the guest here: KVM when a probe shows that it runs our
kernel (`kvm_usable`), otherwise TCG, whose guests need the host's TSC rate
(`host_tsc_khz`) to keep a clock."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import platform
import signal
import time
from pathlib import Path

from vztt.base.errors import RuntimeUnavailable
from vztt.base.files import atomic_write
from vztt.base.proc import PIPE, STDOUT, TimeoutExpired, kill_tree, spawn
from . import _linux

PROBE_TIMEOUT = 5.0          # seconds for a KVM guest to reach its root-mount panic


def kvm_usable(qemu: str, kernel: Path, cache: Path | None = None, machine: str = "microvm",
               console: str = "ttyS0") -> tuple[bool, str]:
    """Whether KVM runs this kernel here: /dev/kvm must open, and a guest with
    no root must reach its panic (and qemu exit, -no-reboot) within
    PROBE_TIMEOUT. Some hosts' /dev/kvm runs only special guests and hangs on
    ours. The answer is kept in `cache` for this boot of the host."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    boot_id = _read("/proc/sys/kernel/random/boot_id").strip()
    key = {"boot_id": boot_id, "kernel": str(kernel), "mtime": kernel.stat().st_mtime_ns}
    if cache is not None:
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(cache.read_text())
            if known.get("key") == key:
                return bool(known["usable"]), str(known["reason"])
    command = [qemu, "-machine", machine, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
               "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
               "-append", f"console={console} panic=-1 root=/dev/vztt-kvm-probe"]
    started = time.monotonic()
    proc = spawn(command, what="the KVM probe", error=RuntimeUnavailable, stdout=PIPE, stderr=STDOUT,
                 preexec_fn=die_with_parent)
    try:
        out, _ = proc.communicate(timeout=PROBE_TIMEOUT)
        text = out.decode("utf-8", "replace")
        if "Linux version" in text and "Kernel panic" in text:
            usable, reason = True, f"probe booted in {time.monotonic() - started:.1f} s"
        else:
            usable, reason = False, f"probe: qemu exited with status {proc.returncode}: " + \
                " | ".join(text.strip().splitlines()[-2:])[:200]
    except TimeoutExpired:
        usable, reason = False, f"a KVM guest did not boot within {PROBE_TIMEOUT:g} s"
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    if cache is not None:
        with contextlib.suppress(OSError):
            atomic_write(cache, json.dumps({"key": key, "usable": usable, "reason": reason}) + "\n")
    return usable, reason


# -- the TSC ------------------------------------------------------------------------

_RDTSC = bytes([0x0F, 0x31,              # rdtsc
                0x48, 0xC1, 0xE2, 0x20,  # shl rdx, 32
                0x48, 0x09, 0xD0,        # or rax, rdx
                0xC3])                   # ret


def host_tsc_khz(seconds: float = 0.2) -> int | None:
    """The rate of this host's time stamp counter in kHz, measured against
    CLOCK_MONOTONIC (to about 0.01 %), or None if it cannot be (not x86_64, no
    constant TSC, executable memory refused). TCG guests read this counter."""
    if platform.machine() != "x86_64" or "constant_tsc" not in _read("/proc/cpuinfo"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    try:
        page.write(_RDTSC)
        (ns0, ticks0), (ns1, ticks1) = _tsc_samples(page, seconds)
    finally:
        with contextlib.suppress(BufferError):
            page.close()
    khz = round((ticks1 - ticks0) * 1_000_000 / (ns1 - ns0))
    return khz if 100_000 <= khz <= 10_000_000 else None


def _tsc_samples(page: mmap.mmap, seconds: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two (ns, ticks) pairs `seconds` apart, each the closest of a few reads,
    calling the rdtsc code in `page` (references to it end with this call)."""
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))

    def sample() -> tuple[int, int]:
        best = (1 << 62, 0, 0)
        for _ in range(7):
            before = time.monotonic_ns()
            ticks = rdtsc()
            after = time.monotonic_ns()
            if after - before < best[0]:
                best = (after - before, (before + after) // 2, ticks)
        return best[1], best[2]

    first = sample()
    time.sleep(seconds)
    return first, sample()


def die_with_parent() -> None:
    """In qemu's process before exec: SIGKILL when the thread that started it ends."""
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
