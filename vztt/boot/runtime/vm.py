"""The VM runtime: boot a root tree with vztt's own kernel in qemu, run
commands in it through a guest agent, power it off, leave nothing behind.

    with VM(tree, scratch, bzimage, hostname="check", console_log=log) as vm:
        state, failed = vm.wait_running(timeout=60)
        status, output = vm.exec(["uname", "-r"], timeout=10)
        vm.poweroff(timeout=30)

The interface is runtime.Container's, so the boot test's checks run unchanged.

- The disk (guest.py): the tree (a scratch copy: it is changed) gets
  /etc/hostname, the agent and its unit (and, with `osrelease`, an init
  wrapper); `mkfs.ext4 -d` then makes an ext4 image of it in the scratch
  directory, without mounting anything or using a loop device. It is the
  guest's virtio-blk root.
- The machine (MACHINES, by the template's architecture): for x86_64 qemu's
  microvm (virtio-mmio devices, described by ACPI, which also powers it off),
  for aarch64 qemu's virt (virtio-mmio transports described by the device
  tree qemu generates, the PL011 console ttyAMA0, PSCI powers it off). The
  kernel of that architecture (`vztt kernel build --arch`) given with -kernel
  (no initramfs, no modules), the serial console written to the console log,
  -no-reboot so that a poweroff, a reboot or a panic (panic=-1) ends qemu.
  The disk, the agent's port and the network are the same -device lines on both.
- The network (with `link`, a hostnet.HostNet): a virtio-net device backed by
  a tap device in the link's own network namespace, where qemu runs (through
  nsenter); the guest's kernel calls it eth0. Nothing reaches the host's network.
- The result channel: a virtio-serial port named org.vztt.agent, backed by
  qemu's stdin and stdout. In the guest, vztt-agent.service (pulled into the
  boot with systemd.wants= on the kernel command line) opens the port, says
  `H`, and runs each request `X <id> <timeout> <base64 arg>...` under
  timeout(1), answering `R <id> <status> <base64 output>`; `P <id>` powers
  off. So the checks are the container's, command for command.
- Acceleration (accel.py): KVM when a probe shows that it runs our kernel (a boot to
  the root-mount panic within PROBE_TIMEOUT; remembered per host boot), TCG
  otherwise; always TCG for a guest of another architecture than the host's
  (KVM runs only the host's; no probe then). VZTT_VM_ACCEL=kvm|tcg|auto
  overrides. The CPU of an x86_64 guest (cpu.py): the
  host's under KVM, which must have the recipe's `cpu_level`; under TCG
  qemu's `max` model with that level's flags enforced (qemu 7.2 emulates up
  to x86-64-v3, what EL 10 needs). Under TCG every time
  bound a caller gives is TCG_SLOWDOWN times longer (an aarch64 guest under
  TCG boots about as fast as an x86_64 one: the same factor), and an x86_64
  guest kernel is told the host's TSC rate (tsc_early_khz=, measured by
  host_tsc_khz): a TCG guest reads the host's TSC, and calibrating it against
  the PIT fails when the host is busy, leaving the guest without a clock,
  hung. An aarch64 guest's generic timer has its rate in CNTFRQ: no hint.
- osrelease: kernel.virt_osrelease cannot be set in the initial UTS
  namespace, so the init wrapper moves the booted system (PID 1 stays PID 1)
  into a UTS namespace of its own, sets the release there and execs
  /sbin/init: everything in the guest sees the recipe's release, kernel
  threads (the initial namespace) the real one.
- Cleanup: qemu runs in a session of its own with PR_SET_PDEATHSIG (it dies
  with us, even on SIGKILL), is killed by close(), and the scratch directory
  (the disk) is removed; its name ends in our pid, so TemplateCache's
  clean_stale_work removes a killed run's. The console log is kept.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import re
import select
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import BootError, RuntimeUnavailable
from vztt.base.proc import PIPE, Popen, TimeoutExpired, kill_tree, spawn
from vztt.recipe.settings import OSRELEASE_PATTERN, OSRELEASE_WORDS
from . import cpu
from .accel import die_with_parent, host_tsc_khz, kvm_usable
from .guest import INIT_PATH, PORT_NAME, UNIT_NAME, make_disk, prepare_tree
from .host import require, signals_deferred
from .hostnet import HostNet

REPLY_GRACE = 15.0           # beyond a command's own timeout (timeout -k 5, transfer)
TIMED_OUT = 124              # as timeout(1), and as Container.exec
TCG_SLOWDOWN = 3.0           # under TCG every time bound a caller gives is this many times longer
OSRELEASE = re.compile(OSRELEASE_PATTERN)


@dataclass(frozen=True)
class Machine:
    """What differs between guest architectures. Both machines give
    virtio-mmio transports, so the disk, the agent's virtio-serial and the
    network are the same -device lines."""
    arch: str               # uname -m of the guest (a recipe's arch)
    qemu: str               # the program
    package: str            # its Debian package
    machine: str            # -machine
    console: str            # the serial console's tty: console=, and the serial getty masked
    tsc_hint: bool          # under TCG, tell the guest kernel the host's TSC rate (x86 only)


MACHINES: dict[str, Machine] = {
    "x86_64": Machine("x86_64", "qemu-system-x86_64", "qemu-system-x86", "microvm", "ttyS0", True),
    # virt: GIC, PL011 (ttyAMA0), PL031 RTC, 32 virtio-mmio transports and a PCIe host bridge,
    # in the device tree qemu hands the kernel; PSCI SYSTEM_OFF powers it off (qemu exits).
    "aarch64": Machine("aarch64", "qemu-system-aarch64", "qemu-system-arm", "virt", "ttyAMA0", False),
}
QEMU = MACHINES["x86_64"].qemu
TCG_CPU = "max"              # a non-x86 guest's TCG model: everything qemu emulates


def machine(arch: str) -> Machine:
    """The machine for a guest of `arch`; RuntimeUnavailable for one the VM runtime has none for."""
    if arch not in MACHINES:
        raise RuntimeUnavailable(f"the VM runtime boots {', '.join(MACHINES)} guests, not {arch}")
    return MACHINES[arch]


def check_osrelease(value: str) -> str:
    """A release string uname(2) can carry (ValueError otherwise)."""
    if not OSRELEASE.fullmatch(value):
        raise ValueError(f"{value!r} is not a release string: {OSRELEASE_WORDS}")
    return value


class VM:
    """One VM run: start() (or `with`) makes the disk and starts qemu; close()
    kills it and removes the scratch directory. Used as a context manager,
    close always runs, also on KeyboardInterrupt."""

    def __init__(self, tree: str | os.PathLike, scratch: str | os.PathLike, kernel: str | os.PathLike, *,
                 name: str = "vztt-vm", hostname: str | None = None, osrelease: str | None = None,
                 console_log: str | os.PathLike | None = None, accel: str | None = None,
                 probe_cache: str | os.PathLike | None = None, memory_mb: int = 1024, cpus: int = 1,
                 link: HostNet | None = None, cpu_level: str = cpu.BASELINE, arch: str = "x86_64"):
        self.target = machine(arch)        # the guest's architecture: the template's, the kernel's
        self.tree = Path(tree).resolve()
        self.scratch = Path(scratch).resolve()
        self.kernel = Path(kernel).resolve()
        self.name = name
        self.hostname = hostname or name
        self.osrelease = check_osrelease(osrelease) if osrelease else None
        self.console_log = Path(console_log) if console_log else self.scratch.with_suffix(".console.log")
        self.accel_wanted = (accel or os.environ.get("VZTT_VM_ACCEL") or "auto").lower()
        if self.accel_wanted not in ("auto", "kvm", "tcg"):
            raise RuntimeUnavailable(f"VZTT_VM_ACCEL={self.accel_wanted}: expected kvm, tcg or auto")
        self.probe_cache = Path(probe_cache) if probe_cache else None
        self.memory_mb, self.cpus = memory_mb, cpus
        # A virtio-net device backed by a tap in the link's namespace (qemu runs there);
        # the guest kernel names it eth0 (no udev in a template).
        self.link = link
        cpu.flags(cpu_level)               # ValueError for an unknown level
        self.cpu_level = cpu_level         # what the guest's programs need (a recipe's cpu_level)
        self.disk = self.scratch / "disk.ext4"
        self.accel = ""                    # kvm or tcg, once started
        self.slowdown = 1.0                # TCG_SLOWDOWN under TCG: callers' time bounds are scaled
        self.emulated = False              # the container's qemu-user case; a VM emulates a whole machine
        self.note = ""                     # one line: machine and accelerator, for reports
        self.boot_seconds: float | None = None
        self.disk_seconds: float | None = None
        self._qemu: Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0
        self._started_at = 0.0
        self._closed = False

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.close()

    def start(self) -> VM:
        """Make the disk and start qemu; returns once qemu runs (the guest boots
        on: wait_running waits for it). BootError if qemu stops at once;
        RuntimeUnavailable if this host cannot run it."""
        qemu = require(self.target.qemu, self.target.package)
        require("mkfs.ext4", "e2fsprogs")
        if not self.kernel.is_file():
            raise RuntimeUnavailable(f"no kernel at {self.kernel} (`vztt kernel build`)")
        if not self.tree.is_dir():
            raise BootError(f"cannot boot {self.tree}: not a directory")
        try:
            if self.scratch.exists():
                shutil.rmtree(self.scratch)
            self.scratch.mkdir(parents=True)
            prepare_tree(self.tree, self.hostname, self.osrelease)
            self.disk_seconds = make_disk(self.tree, self.disk)
            self.accel, why = self._choose_accel(qemu)
            self.slowdown = TCG_SLOWDOWN if self.accel == "tcg" else 1.0
            self.note = f"qemu {self.target.machine}, {self.accel}" + (f"; {why}" if why else "")
            self._start_qemu(qemu)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill qemu if it still runs and remove the scratch directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with signals_deferred():   # a second Ctrl-C waits until qemu is gone and the disk removed
            if self._qemu is not None:
                if self._qemu.poll() is None:
                    kill_tree(self._qemu)
                self._qemu.wait()
                for stream in (self._qemu.stdin, self._qemu.stdout):
                    with contextlib.suppress(OSError):
                        stream.close()  # type: ignore[union-attr]
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.scratch.exists():
            raise RuntimeUnavailable(f"cannot remove the VM's scratch directory {self.scratch}")

    @property
    def running(self) -> bool:
        return self._qemu is not None and self._qemu.poll() is None

    # -- using it -----------------------------------------------------------

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
        """Run argv in the guest (as root, from the agent's service, no stdin).
        Returns (exit status, stdout and stderr merged); 124 at the timeout
        (times the slowdown under TCG). BootError if the VM is down."""
        self._need_running()
        timeout *= self.slowdown
        self._next_id += 1
        ident = str(self._next_id)
        seconds = f"{max(timeout, 0.1):.3f}"
        args = " ".join(base64.b64encode(a.encode()).decode() or "-" for a in argv)
        self._send(f"X {ident} {seconds} {args}\n")
        deadline = time.monotonic() + timeout + REPLY_GRACE
        while True:
            line = self._read_line(deadline)
            if line is None:
                return TIMED_OUT, ""
            words = line.split(" ", 3)
            if words[0] == "R" and len(words) >= 3 and words[1] == ident:
                out = base64.b64decode(words[3]) if len(words) == 4 else b""
                return int(words[2]), out.decode("utf-8", "replace")
            # anything else: a late reply to a command that timed out, or a hello

    def wait_running(self, timeout: float = 60.0) -> tuple[str, list[str]]:
        """Wait for the agent, then for systemd to finish booting: (state,
        failed units), state being running or degraded. BootError otherwise.
        Under TCG the timeout is multiplied by the slowdown."""
        timeout *= self.slowdown
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(deadline)
            if line is None:
                raise BootError(f"VM {self.name} did not boot within {timeout:g} s (no answer from the guest "
                                f"agent); console log: {self.console_log}")
            if line.startswith("H "):
                break
        state = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootError(f"VM {self.name} did not reach running within {timeout:g} s "
                                f"(last state: {state or 'none'}); console log: {self.console_log}")
            status, out = self.exec(["systemctl", "is-system-running", "--wait"], timeout=left / self.slowdown)
            lines = out.strip().splitlines()
            state = lines[-1][:100] if lines else ""
            if status in (126, 127):
                raise BootError(f"VM {self.name}: cannot run systemctl: {state}")
            if state in ("running", "degraded"):
                break
            if state in ("maintenance", "stopping"):
                raise BootError(f"VM {self.name} did not boot: system is {state}; console log: {self.console_log}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - self._started_at
        _status, out = self.exec(["systemctl", "--failed", "--plain", "--no-legend"], timeout=30)
        return state, [line.split()[0] for line in out.splitlines() if line.strip()]

    def poweroff(self, timeout: float = 30.0) -> bool:
        """Ask the guest to power off and wait for qemu to exit. True if it
        did in time (times the slowdown under TCG); False if qemu had to be killed."""
        if not self.running:
            return True
        assert self._qemu is not None
        timeout *= self.slowdown
        self._next_id += 1
        with contextlib.suppress(BootError):
            self._send(f"P {self._next_id}\n")
        try:
            self._qemu.wait(timeout=timeout)
            return True
        except TimeoutExpired:
            kill_tree(self._qemu)
            return False

    # -- the steps ----------------------------------------------------------

    def _cmdline(self) -> str:
        tty = self.target.console
        words = [f"console={tty}", "root=/dev/vda", "rootfstype=ext4", "rw", "panic=-1",
                 f"systemd.wants={UNIT_NAME}",
                 # No udev in a container template: a serial getty would wait 90 s for dev-ttyS0.device.
                 # getty_auto=0 needs systemd 250; before it (Ubuntu 22.04's 249) the unit is masked.
                 "systemd.getty_auto=0", f"systemd.mask=serial-getty@{tty}.service",
                 # Our kernel has no module support (CONFIG_MODULES=n), so loading the modules of
                 # /etc/modules-load.d cannot work; systemd 257 (Debian 13) then fails the unit. In a
                 # container it is skipped for lack of CAP_SYS_MODULE: the VM does the same.
                 "systemd.mask=systemd-modules-load.service"]
        if self.target.tsc_hint and self.accel == "tcg" and (khz := host_tsc_khz()):
            # A TCG guest reads the host's TSC. Told its rate, the kernel skips
            # calibrating it against the PIT, which fails when the host is busy
            # (the guest then has no working clock and hangs early in boot).
            words.append(f"tsc_early_khz={khz}")
        if self.osrelease:
            words.append(f"init={INIT_PATH}")
        return " ".join(words)

    def _choose_accel(self, qemu: str) -> tuple[str, str]:
        if self.accel_wanted == "tcg":
            return "tcg", "VZTT_VM_ACCEL=tcg"
        host = platform.machine()
        if self.target.arch != host:                # KVM runs the host's architecture only: no probe
            if self.accel_wanted == "kvm":
                raise RuntimeUnavailable(f"VZTT_VM_ACCEL=kvm, but KVM cannot run an {self.target.arch} guest "
                                         f"on this {host} host")
            return "tcg", f"an {self.target.arch} guest on an {host} host"
        usable, why = kvm_usable(qemu, self.kernel, self.probe_cache, self.target.machine, self.target.console)
        if usable:
            return "kvm", ""
        if self.accel_wanted == "kvm":
            raise RuntimeUnavailable(f"VZTT_VM_ACCEL=kvm, but KVM cannot run the kernel here: {why}")
        return "tcg", f"KVM unusable: {why}"

    def _start_qemu(self, qemu: str) -> None:
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        self.console_log.unlink(missing_ok=True)
        if self.accel == "kvm":                     # the host's own CPU: it must have the level
            cpu.require_on_host(self.cpu_level, self.name)
            accel = ["-accel", "kvm", "-cpu", "host"]
        elif self.target.arch == "x86_64":          # emulated: a model with the level, or qemu says no
            accel = ["-accel", "tcg", "-cpu", cpu.qemu_cpu(self.cpu_level)]
        else:                                       # cpu_level is x86's; `max`: every feature qemu emulates
            accel = ["-accel", "tcg", "-cpu", TCG_CPU]
        command = [
            qemu, "-machine", self.target.machine, *accel, "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(self.kernel), "-append", self._cmdline(),
            "-chardev", f"file,id=console,path={_opt(self.console_log)}", "-serial", "chardev:console",
            "-drive", f"id=root,file={_opt(self.disk)},format=raw,if=none,cache=unsafe",
            "-device", "virtio-blk-device,drive=root",
            "-device", "virtio-serial-device",
            "-chardev", "stdio,id=agent,signal=off",
            "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
        ]
        if self.link is not None:
            tap = self.link.tap()
            command += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
                        "-device", "virtio-net-device,netdev=net0"]
            command = self.link.command(command)   # qemu opens the tap from the link's namespace
        stderr = open(self.scratch / "qemu.stderr", "wb")
        self._started_at = time.monotonic()
        try:
            self._qemu = spawn(command, what=f"starting {self.target.qemu}", error=RuntimeUnavailable, stdin=PIPE,
                               stdout=PIPE, stderr=stderr, preexec_fn=die_with_parent)
        except OSError as e:
            raise RuntimeUnavailable(f"cannot start {qemu}: {e.strerror}") from None
        finally:
            stderr.close()
        # qemu refuses bad options or a missing accelerator at once.
        with contextlib.suppress(TimeoutExpired):
            self._qemu.wait(timeout=0.5)
        if self._qemu.poll() is not None:
            raise RuntimeUnavailable(f"{self.target.qemu} exited at once with status {self._qemu.returncode}: "
                                     + self._qemu_errors())

    # -- the channel --------------------------------------------------------

    def _send(self, text: str) -> None:
        self._need_running()
        assert self._qemu is not None and self._qemu.stdin is not None
        try:
            self._qemu.stdin.write(text.encode())
            self._qemu.stdin.flush()
        except BrokenPipeError:
            raise BootError(f"VM {self.name} is not running: {self._exit_story()}; "
                            f"console log: {self.console_log}") from None

    def _read_line(self, deadline: float) -> str | None:
        """The next line from the agent; None at the deadline; BootError if qemu ends."""
        assert self._qemu is not None and self._qemu.stdout is not None
        fd = self._qemu.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = select.select([fd], [], [], min(left, 1.0))[0]
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self._qemu.wait()
                raise BootError(f"VM {self.name} stopped: {self._exit_story()}; console log: {self.console_log}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("ascii", "replace").strip("\r")

    def _need_running(self) -> None:
        if not self.running:
            raise BootError(f"VM {self.name} is not running: {self._exit_story()}; console log: {self.console_log}")

    def _exit_story(self) -> str:
        status = self._qemu.poll() if self._qemu else None
        if status is None:
            return "qemu is still running"
        tail = _tail(self.console_log, 400)
        if "Kernel panic" in tail:
            return "the kernel panicked"
        if "reboot: Power down" in tail:
            return "the guest powered off"
        if "reboot: Restarting system" in tail:
            return "the guest rebooted"
        return f"qemu exited with status {status}" + (f": {err}" if (err := self._qemu_errors()) else "")

    def _qemu_errors(self) -> str:
        return " | ".join(_tail(self.scratch / "qemu.stderr", 600).strip().splitlines()[-3:])


# -- helpers -----------------------------------------------------------------------

def _opt(path: Path) -> str:
    """A path inside a qemu option value: commas doubled."""
    return str(path).replace(",", ",,")


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
