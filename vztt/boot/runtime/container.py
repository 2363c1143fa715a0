"""Boot a root tree with its own init as PID 1 in namespaces, run commands in
it, power it off, and leave nothing behind.

    with Container(tree, state_dir, hostname="check") as box:
        state, failed = box.wait_running(timeout=60)
        status, output = box.exec(["systemctl", "is-active", "ssh"], timeout=10)
        box.poweroff(timeout=30)

What a container is here (the recipe from NOTES.md, "Booting templates here"):
- new user (ids: a slot of host ids, idmap.py; none only with userns=False), pid,
  mount, uts, ipc, net and cgroup namespaces; confined by _confine.py (by _stage.py,
  for init and every exec) and cgroup.py's device policy; test_escape.py tries it;
- the tree: an overlayfs whose upper and work dirs are in a scratch directory,
  over the tree as read-only lower (`overlay=True`, the tree stays pristine),
  or a scratch copy of it (`overlay=False`). `prepare(root)` may edit it before
  boot. Either way the scratch directory goes at the end;
- inside the container's own mount namespace (so these vanish with it): /proc
  and read-only /sys (both masked, see _confine.py), cgroup2 on /sys/fs/cgroup,
  a tmpfs /dev with the basic nodes, devpts and a private pty as /dev/console,
  tmpfs /run and /tmp; then pivot_root (see _stage.py);
- `container=vztt` in init's environment and /run/systemd/container;
  loopback up, hostname set (and written to /etc/hostname in the tree, which
  systemd would otherwise apply over ours);
- with `link` (a hostnet.HostNet), a veth pair whose inside end (`link_iface`,
  eth0) is in the container's network namespace before init runs: the
  distribution's own network configuration finds it at boot;
- with `osrelease`, the release uname(2) reports inside, set through
  kernel.virt_osrelease (vztt's kernel patch) in the container's UTS
  namespace; a kernel without it gets a note on the console, not an error;
- its own cgroups with optional memory and pids limits (see cgroup.py for
  what this host's hybrid layout allows);
- the console's output, copied to a log file (`console_log`), kept after the
  run and named in every BootError;
- a tree whose init is built for another architecture (an arm64 template on an
  x86_64 host) boots under qemu-user through binfmt_misc (base/emulation.py
  checks the entry first): `emulated` is then True, every time bound is
  `slowdown` times longer, and poweroff is asked from inside (see poweroff()).

Every run records its paths in STATE_DIR/NAME.json and holds a lock on that
file while it lives; `cleanup_stale(state_dir)`, called on every start, cleans
up runs whose owner died without doing so. Kill order on cleanup: every
process (through the cgroups), the host-side mounts under the scratch dir,
the cgroup directories (depth first), the scratch dir, the state file.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import select
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from vztt.base import emulation
from vztt.base.errors import BootError, RuntimeUnavailable, VzttError
from vztt.base.inroot import write_in_root
from vztt.base.proc import DEVNULL, PIPE, STDOUT, Popen, TimeoutExpired, kill_tree, run, spawn
from . import _linux, cgroup, idmap
from .console import ConsoleLog, start_console
from .host import EXEC_ENV, require, signals_deferred
from .hostnet import HostNet
from .stale import cleanup_stale, teardown

CONTAINER = "vztt"   # the value of $container and /run/systemd/container
STAGE = Path(__file__).with_name("_stage.py")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
TIMED_OUT = 124      # exec's status for a command killed at its timeout, as timeout(1)
SETUP_TIMEOUT = 30.0  # for the stage to set up the mounts and exec init
# An init of another architecture runs under qemu-user: measured here 10 to 13 times slower
# than natively (debian-12 arm64: 4.9 s to running on a quiet host, 0.37 s for amd64).
EMULATED_SLOWDOWN = 10.0


class Container:
    """One container run: `start()` (or `with`) boots it, `close()` removes
    everything; close always runs when used as a context manager, also on
    KeyboardInterrupt (SIGINT and SIGTERM wait until cleanup is done).

    The container is killed if the thread that started it exits (parent-death
    signal on the helper process): start it from the thread that owns it.
    """

    def __init__(self, tree: str | os.PathLike, state_dir: str | os.PathLike, *,
                 name: str | None = None, hostname: str | None = None, overlay: bool = True,
                 memory_max: int | None = None, pids_max: int | None = None,
                 init: tuple[str, ...] = ("/sbin/init",),
                 prepare: Callable[[Path], None] | None = None,
                 console_log: str | os.PathLike | None = None, osrelease: str | None = None,
                 link: HostNet | None = None, link_iface: str = "eth0", userns: bool = True):
        self.tree = Path(tree).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.name = name or f"vztt-{uuid.uuid4().hex[:12]}"
        if not NAME.fullmatch(self.name):
            raise ValueError(f"bad container name {self.name!r}")
        self.hostname = hostname or self.name
        self.overlay = overlay
        self.memory_max, self.pids_max = memory_max, pids_max
        self.init = tuple(init)
        self.prepare = prepare
        # The architecture init is built for; another one than the host's boots under emulation.
        try:
            self.arch = emulation.init_arch(self.tree, self.init[0]) if self.init else None
        except OSError:
            self.arch = None      # a link loop: start() finds no init and says so
        self.emulated = self.arch is not None and emulation.is_foreign(self.arch)
        self.slowdown = EMULATED_SLOWDOWN if self.emulated else 1.0   # scales every time bound
        self.osrelease = osrelease          # uname -r inside, if the kernel has kernel.virt_osrelease
        self.link, self.link_iface = link, link_iface   # a veth pair into the container, made before init runs
        self.userns = userns                # False: --unsafe-no-userns, the container's root is the host's
        self.ids: idmap.IdMap | None = None  # its user namespace's slot of host ids
        self._userns_fd: int | None = None
        self.scratch = self.state_dir / self.name
        self.root = self.scratch / "root"   # what the container sees as /
        self.console_log = Path(console_log) if console_log else self.state_dir / f"{self.name}.console.log"
        self.cgroups: cgroup.Cgroups | None = None
        self.init_pid: int | None = None    # PID 1, as the host sees it
        self.boot_seconds: float | None = None  # start to running/degraded
        self._state_file: Path | None = None
        self._lock = None                   # open state file, flock'ed while we live
        self._stage: Popen | None = None
        self._pidfd: int | None = None
        self._console: ConsoleLog | None = None
        self._started_at = 0.0
        self._closed = False

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_after(exc)

    def _close_after(self, exc: BaseException | None) -> None:
        """close(), but an incomplete cleanup does not hide the error `exc`
        that got us here: it becomes a note on it."""
        try:
            self.close()
        except VzttError as problem:
            if exc is None:
                raise
            exc.add_note(str(problem))

    def start(self) -> Container:
        """Boot: returns once init has been exec'd. BootError if it cannot be
        (e.g. no /sbin/init); RuntimeUnavailable if the host cannot do it."""
        _check_host(self.overlay)
        if self.userns:
            idmap.check_host()   # before anything is made (allocate() asks again, for its other callers)
        if not self.tree.is_dir():
            raise BootError(f"cannot boot {self.tree}: not a directory")
        if self.emulated:
            emulation.require(self.arch, f"the tree's init is {self.arch}", error=RuntimeUnavailable)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale(self.state_dir)
        self._claim()
        try:
            # Cgroup names are host-wide, container names only per state dir.
            unique = f"{self.name}.{uuid.uuid4().hex[:8]}"
            if self.userns:
                self.ids = idmap.allocate()
                self._userns_fd = idmap.make_userns(self.ids, [_python(), "-E", "-s", str(STAGE), "userns"])
            try:
                self.cgroups = cgroup.plan(unique, self.memory_max, self.pids_max)
                self._save()
                cgroup.create(self.cgroups)
                if self.ids is not None:
                    cgroup.delegate(self.cgroups, self.ids.uid, self.ids.gid)
            except OSError as e:
                raise RuntimeUnavailable(f"cannot create cgroups: {e}") from None
            host_view = self._make_root()
            self._write_hostname(host_view)
            if self.prepare is not None:
                self.prepare(host_view)
            if self.ids is not None and self.overlay:
                idmap.shift_tree(self.scratch / "upper", self.ids, self.root)  # what the host wrote: the container's ids
            if host_view != self.root:  # a scratch copy, seen with the container's ids from here on
                idmap.mount_shifted(host_view, self.root, self._userns_fd)
            self._boot()
        except BaseException as exc:
            self._close_after(exc)
            raise
        return self

    def close(self) -> None:
        """Kill whatever still runs and remove every trace but the console log.
        Idempotent. RuntimeUnavailable if something could not be removed (the
        state file then stays, for cleanup_stale to retry)."""
        if self._closed:
            return
        self._closed = True
        if self._lock is None:
            return  # we never claimed the name: nothing here is ours
        with signals_deferred():
            problems = teardown(self._record(), self.state_dir)
            if self._stage is not None:
                with contextlib.suppress(TimeoutExpired):
                    self._stage.wait(timeout=5)
            if self._pidfd is not None:
                os.close(self._pidfd)
            if self._console is not None:
                self._console.stop()
            if not problems:
                self._state_file.unlink(missing_ok=True)
            if self._userns_fd is not None:
                os.close(self._userns_fd)
            if self.ids is not None:
                self.ids.release()  # its processes are gone: another container may have the ids
            self._lock.close()  # releases the flock
        if problems:
            raise RuntimeUnavailable(f"cleanup of container {self.name} incomplete: "
                                     + "; ".join(problems) + f" (state kept in {self._state_file})")

    @property
    def running(self) -> bool:
        """Whether init (and so the container) is still alive."""
        return self._stage is not None and self._stage.poll() is None

    # -- using it -----------------------------------------------------------

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
        """Run argv inside: in all the container's namespaces, its root and its
        cgroup, with a clean environment and no stdin. Returns (exit status,
        stdout and stderr merged). At the timeout the command is killed and the
        status is 124, as with timeout(1). BootError if the container is down."""
        if not self.running:
            raise BootError(f"container {self.name} is not running: {self._exit_story()}; "
                            f"console log: {self.console_log}")
        timeout *= self.slowdown
        # _stage.py puts itself in the container's cgroups, then execs nsenter.
        procs = [str(p) for p in cgroup.procs_files(self.cgroups.dirs)]
        nsenter = [] if self.userns else [
            require("nsenter"), f"--target={self.init_pid}", "--mount", "--uts", "--ipc",
            "--net", "--pid", "--cgroup", "--root", "--wd", "--"]
        command = [_python(), "-E", "-s", str(STAGE), "enter", str(self.init_pid), "1" if self.userns else "0",
                   *procs, "--", *nsenter, *argv]
        # The command's environment is EXEC_ENV exactly: no build mark inside.
        proc = spawn(command, what=f"exec in container {self.name}", error=RuntimeUnavailable, env=EXEC_ENV,
                     mark=False, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
            status = proc.returncode
        except TimeoutExpired:
            # nsenter forks the command into the pid namespace; the process
            # group (its own session) reaches both.
            kill_tree(proc)
            out, _ = proc.communicate()
            status = TIMED_OUT
        except BaseException:
            kill_tree(proc)
            raise
        return status, out.decode("utf-8", "replace")

    def wait_running(self, timeout: float = 60.0) -> tuple[str, list[str]]:
        """Wait for systemd to finish booting: returns (state, failed units),
        state being "running" or "degraded". BootError if init exits, or the
        system ends in another state, or none within the timeout."""
        timeout *= self.slowdown
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            left = deadline - time.monotonic()
            if not self.running:
                raise BootError(f"container {self.name} did not boot: {self._exit_story()}; "
                                f"console log: {self.console_log}")
            if left <= 0:
                raise BootError(f"container {self.name} did not reach running within {timeout:g} s"
                                f" (last state: {state or 'none'}); console log: {self.console_log}")
            status, out = self.exec(["systemctl", "is-system-running", "--wait"], timeout=left / self.slowdown)
            lines = out.strip().splitlines()
            state = lines[-1][:100] if lines else ""
            if status in (126, 127):  # nsenter could not run it
                raise BootError(f"container {self.name}: cannot run systemctl: {state}")
            if state in ("running", "degraded"):
                break
            if state in ("maintenance", "stopping"):
                raise BootError(f"container {self.name} did not boot: system is {state}; "
                                f"console log: {self.console_log}")
            time.sleep(0.05)  # not up yet (no bus socket: "offline"), or still starting
        self.boot_seconds = time.monotonic() - self._started_at
        _status, out = self.exec(["systemctl", "--failed", "--plain", "--no-legend"], timeout=30)
        return state, [line.split()[0] for line in out.splitlines() if line.strip()]

    def poweroff(self, timeout: float = 30.0) -> bool:
        """Ask init to power off (SIGRTMIN+4, i.e. `systemctl poweroff` without
        needing it to be up) and wait for it to exit. True if it did in time;
        False if it had to be killed (every process, through the cgroups)."""
        if not self.running:
            return True
        timeout *= self.slowdown
        if self.emulated:
            # qemu-user maps real-time signals between host and guest numbers (7.2: host 34+n
            # is guest 32+n), so the host's SIGRTMIN+4 reaches systemd as SIGRTMIN+2 and
            # isolates emergency.target. A kill run inside, under the same emulator, is
            # translated both ways and arrives as the guest's own SIGRTMIN+4 (poweroff).
            status, _ = self.exec(["/bin/sh", "-c", f"kill -{int(signal.SIGRTMIN) + 4} 1"], timeout=10)
            if status != 0:
                timeout = 0.1     # could not ask: kill it through the cgroups at once
        else:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGRTMIN + 4)
        try:
            self._stage.wait(timeout=timeout)
            return True
        except TimeoutExpired:
            cgroup.kill(self.cgroups.dirs)
            self._stage.wait(timeout=10)
            return False

    # -- the steps ----------------------------------------------------------

    def _claim(self) -> None:
        """Create our state file, locked before it appears under its name."""
        self._state_file = self.state_dir / f"{self.name}.json"
        if self._state_file.exists() or self.scratch.exists():
            raise RuntimeUnavailable(f"container {self.name} already exists in {self.state_dir}")
        partial = self.state_dir / f".{self.name}.json.{os.getpid()}"
        lock = open(partial, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            os.link(partial, self._state_file)  # unlike rename, fails if it exists
        except FileExistsError:
            lock.close()
            raise RuntimeUnavailable(f"container {self.name} already exists in {self.state_dir}") from None
        finally:
            partial.unlink()
        self._lock = lock
        self._save()

    def _record(self) -> dict:
        return {
            "name": self.name, "owner_pid": os.getpid(), "scratch": str(self.scratch),
            "cgroups": [str(d) for d in self.cgroups.dirs] if self.cgroups else [],
            "init_pid": self.init_pid, "console_log": str(self.console_log),
        }

    def _save(self) -> None:
        self._lock.seek(0)
        self._lock.truncate()
        json.dump(self._record(), self._lock)
        self._lock.flush()

    def _make_root(self) -> Path:
        """Make the root; returns where the host writes before boot: the root, or (user
        namespace, no overlay) the scratch copy, idmapped onto the root later."""
        self.scratch.mkdir()
        if not self.overlay:
            copy = self.scratch / "copy"
            copy.mkdir()
            run(["cp", "-a", "--reflink=auto", f"{self.tree}/.", copy], what=f"cannot copy {self.tree}",
                error=RuntimeUnavailable)
            if self._userns_fd is None:
                copy.rename(self.root)
                return self.root
            return copy
        lower = self.tree if self._userns_fd is None else idmap.mount_shifted(self.tree, self.scratch / "lower",
                                                                              self._userns_fd)
        dirs = {"lowerdir": lower, "upperdir": self.scratch / "upper",
                "workdir": self.scratch / "work"}
        for path in dirs.values():
            if re.search(r"[,:\\]", str(path)):  # overlayfs option separators
                raise ValueError(f"path unusable for overlayfs: {path}")
        dirs["upperdir"].mkdir()
        dirs["workdir"].mkdir()
        if self.ids is not None:  # the upper directory is the merged root's: the container root's
            os.chown(dirs["upperdir"], self.ids.uid, self.ids.gid)
            os.chmod(dirs["upperdir"], self.tree.stat().st_mode & 0o7777)
        self.root.mkdir()
        try:
            _linux.mount("overlay", self.root, "overlay", 0,
                         ",".join(f"{key}={value}" for key, value in dirs.items()))
        except OSError as e:
            raise RuntimeUnavailable(f"cannot mount overlayfs over {self.tree}: {e.strerror}") from None
        return self.root

    def _write_hostname(self, root: Path) -> None:
        write_in_root(root, "/etc/hostname", (self.hostname + "\n").encode())

    def _boot(self) -> None:
        self._console = start_console(self.console_log)
        slave = self._console.slave
        if self.ids is not None:  # /dev/console: the container's root's tty
            os.fchown(slave, self.ids.uid, self.ids.gid + 5)
        status_read, status_write = os.pipe()
        # Init waits until we have put it into its cgroups and its interface in place (`go` pipe).
        go_read, go_write = os.pipe()
        config = {
            "root": str(self.root), "hostname": self.hostname, "container": CONTAINER,
            "console": os.ttyname(slave), "owner_pid": os.getpid(), "status_fd": status_write,
            "go_fd": go_read, "userns_fd": self._userns_fd,
            "init": list(self.init), "osrelease": self.osrelease,
            "env": {"container": CONTAINER, "PATH": EXEC_ENV["PATH"]},
        }
        self._started_at = time.monotonic()
        try:
            # Init gets config["env"] from the stage, which itself runs with PATH alone.
            self._stage = spawn([_python(), "-E", "-s", STAGE, "boot", json.dumps(config)],
                                what=f"container {self.name}", error=RuntimeUnavailable,
                                env={"PATH": EXEC_ENV["PATH"]}, mark=False, stdin=slave, stdout=slave,
                                stderr=slave, pass_fds=[fd for fd in (status_write, go_read, self._userns_fd)
                                                        if fd is not None])
        finally:
            os.close(status_write)
            os.close(go_read)
        link_problem: RuntimeUnavailable | None = None
        try:
            deadline = time.monotonic() + SETUP_TIMEOUT
            lines = _read_lines_until(status_read, deadline, "pid ")
            for line in lines:
                if line.startswith("pid "):
                    self.init_pid = int(line[4:])
                    # A pidfd stays valid even once the pid is reused: safe to signal.
                    with contextlib.suppress(ProcessLookupError):
                        self._pidfd = os.pidfd_open(self.init_pid)
                    self._save()
            placed = False
            try:
                if self.init_pid is not None:
                    for procs in cgroup.procs_files(self.cgroups.dirs):
                        with open(procs, "w") as f:
                            f.write(str(self.init_pid))
                    if self.userns and self.osrelease:   # its note, if any, goes to the console
                        os.write(slave, run([_python(), "-E", "-s", str(STAGE), "osrelease", str(self.init_pid),
                                             self.osrelease], what="set osrelease", error=RuntimeUnavailable,
                                            env={"PATH": EXEC_ENV["PATH"]}, inherit_env=False).stderr.encode())
                    if self.link is not None:
                        self.link.veth_into(self.init_pid, self.link_iface)
                    placed = True
            except OSError as e:
                link_problem = RuntimeUnavailable(f"cannot put container {self.name} into its cgroups: "
                                                  f"{e.strerror}")
            except RuntimeUnavailable as e:
                link_problem = e        # unless init's own error explains it (below)
            finally:
                # `go` only into its cgroups (device policy, limits): otherwise init reads
                # end of file and stops before it sets anything up.
                if placed:
                    with contextlib.suppress(OSError):
                        os.write(go_write, b"go")
                os.close(go_write)
                go_write = None
            lines += _read_all(status_read, max(deadline - time.monotonic(), 0.1)).splitlines()
        finally:
            os.close(status_read)
            if go_write is not None:
                os.close(go_write)
        for line in lines:
            if line.startswith("unavailable: "):
                raise RuntimeUnavailable(f"cannot create namespaces: {line[13:]}")
            if line.startswith("error: ") and not (link_problem is not None and GO_REFUSED in line):
                raise BootError(f"container {self.name} did not boot: {line[7:]}; "
                                f"console log: {self.console_log}")
        if link_problem is not None:
            raise link_problem
        if self.init_pid is None or self._pidfd is None:
            with contextlib.suppress(TimeoutExpired):
                self._stage.wait(timeout=5)  # init is gone: let its parent report how
            raise BootError(f"container {self.name} did not boot: {self._exit_story()}; "
                            f"console log: {self.console_log}")

    def _exit_story(self) -> str:
        status = self._stage.poll() if self._stage else None
        if status is None:
            return "init is still running"
        if status == 128 + signal.SIGINT:
            return "init powered off"
        if status > 128:
            return f"init was killed by signal {status - 128}"
        return f"init exited with status {status}"


# -- helpers -----------------------------------------------------------------

# What _stage.py's init says when the host closes the `go` pipe without `go`: then the
# host's own problem (link_problem) is the story to tell.
GO_REFUSED = "the host went away before"


def _check_host(overlay: bool) -> None:
    if os.geteuid() != 0:
        raise RuntimeUnavailable("the container runtime needs root")
    for ns in ("pid", "mnt", "uts", "ipc", "net", "cgroup"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise RuntimeUnavailable(f"the kernel has no {ns} namespaces")
    if cgroup.unified_mount() is None:
        raise RuntimeUnavailable("no cgroup2 hierarchy is mounted")
    if overlay and "overlay" not in Path("/proc/filesystems").read_text().split():
        raise RuntimeUnavailable("the kernel has no overlayfs (modprobe overlay?)")
    require("nsenter")
    if importlib.util.find_spec("seccomp") is None:  # the stage builds its filter with it
        raise RuntimeUnavailable("the container's system call filter needs libseccomp's Python bindings "
                                 "(apt-get install python3-seccomp)")


def _python() -> str:
    return sys.executable or "/usr/bin/python3"


def _read_lines_until(fd: int, deadline: float, prefix: str) -> list[str]:
    """Whole lines from a pipe, up to and including the first that starts with
    `prefix` (or all of them, at end of file); BootError at the deadline. Reads one
    byte at a time: what follows that line is for the next reader."""
    lines, line = [], b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BootError(f"container setup did not finish within {SETUP_TIMEOUT:g} s")
        byte = os.read(fd, 1)
        if byte in (b"", b"\n"):
            if line:
                lines.append(line.decode("utf-8", "replace"))
            if not byte or line.startswith(prefix.encode()):
                return lines
            line = b""
        else:
            line += byte


def _read_all(fd: int, timeout: float) -> str:
    """Read a pipe to its end, or BootError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BootError(f"container setup did not finish within {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode("utf-8", "replace")
        data += chunk
