"""Expensive session inputs made in the background while other tests run.

The container kernels (x86_64 and the cross-built arm64 one) and the arm64
template (built under qemu-user) take minutes of CPU each, and most of the
suite leaves one of the two cores idle (apt, dpkg and a TCG guest are single
threaded; much of the rest waits on a network or a VM). So conftest starts
these commands when the run is collected, as SCHED_IDLE processes: they get
only CPU time nobody else wants, and never slow a test down for long. The
tests that need them are moved to the end of the run (whole modules, in
their order), and their fixtures wait() for the result: from then on the
command has the machine to itself.

Each command is what the fixture would have run itself, into the same
directories, so a run with prebuilds off (VZTT_TEST_PREBUILD=0, or a
non-root run) gets the same results, just later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Prebuild:
    """One background command: argv, its environment, where its output goes."""
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_dir: Path
    timeout: float = 3 * 3600
    process: subprocess.Popen | None = None
    started: float = 0.0
    outcome: Outcome | None = None
    _files: list = field(default_factory=list)

    def start(self) -> None:
        if self.process is not None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{self.name}.stdout", "w+")
        err = open(self.log_dir / f"{self.name}.stderr", "w+")
        self._files = [out, err]

        def idle() -> None:      # in the child: only CPU time nobody else wants
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

        self.started = time.monotonic()
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, start_new_session=True, preexec_fn=idle)

    def wait(self) -> Outcome:
        """The command's outcome; started now (in the foreground's class) if it was not."""
        if self.outcome is not None:
            return self.outcome
        if self.process is None:
            self.start()
        assert self.process is not None
        # Waited for: the run cannot go on without it, so it gets normal priority back.
        self._unidle()
        try:
            self.process.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
        seconds = time.monotonic() - self.started
        out, err = (f.seek(0) or f.read() for f in self._files)
        for f in self._files:
            f.close()
        self.outcome = Outcome(self.process.returncode, out, err, seconds)
        sys.stderr.write(f"prebuild {self.name}: exit {self.outcome.returncode} after {seconds:.0f} s\n")
        return self.outcome

    def _unidle(self) -> None:
        """SCHED_OTHER for every process of the command's session (new children inherit it
        from their parents: make from make, dpkg from apt)."""
        assert self.process is not None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                session = int(stat.rsplit(")", 1)[1].split()[3])
                if session == self.process.pid:
                    os.sched_setscheduler(int(pid), os.SCHED_OTHER, os.sched_param(0))
            except (OSError, ValueError, IndexError):
                continue          # gone meanwhile

    def stop(self) -> None:
        """SIGTERM the whole session (vztt cleans up on it), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


# fixture name -> the Prebuild for it (made by conftest, which knows the paths).
REGISTRY: dict[str, Prebuild] = {}
# fixture name -> a function making its Prebuild (given the session's base temp dir).
MAKERS: dict[str, Callable[[Path], Prebuild]] = {}


def enabled() -> bool:
    return os.geteuid() == 0 and os.environ.get("VZTT_TEST_PREBUILD", "1") != "0"


def get(fixture: str, basetemp: Path) -> Prebuild:
    if fixture not in REGISTRY:
        REGISTRY[fixture] = MAKERS[fixture](basetemp)
    return REGISTRY[fixture]


def stop_all() -> None:
    for p in REGISTRY.values():
        p.stop()
