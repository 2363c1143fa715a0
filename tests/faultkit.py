"""Killing a real vztt process at a known step, and looking at what it left, from outside.

A build prints one line per step when the step ends ("  fetch      3.1s  ok  ..."), so
"during step X" means: after the line of the step before X, and before X's own line.
`Watched` runs the real command line with its stderr read by a thread, so a test can wait
for a step's line and signal the process at once, then check that the next step's line
never came (the signal landed in the step the test names).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import PACKAGE_CACHE, REPO, leftovers, processes_naming

STEP_LINE = re.compile(r"^  (\S+)\s+\d+\.\ds  (ok|FAILED)")
# A build's steps, in order (`--locked`: "lock" instead of "resolve"; "base" only for a layer).
BUILD_STEPS = ["resolve", "lock", "fetch", "install", "customize", "clean", "pack", "test", "promote"]


class Watched:
    """`python -m vztt ARGS` with its stderr collected line by line as it comes."""

    def __init__(self, args: list[str | os.PathLike[str]], env: dict[str, str] | None = None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
        full_env["VZTT_PACKAGE_CACHE"] = str(PACKAGE_CACHE)
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "vztt", *map(str, args)], cwd=REPO, env=full_env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._eof = True
            self._new.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def steps(self) -> list[str]:
        """The steps that have ended so far, in order."""
        return [m[1] for l in list(self.lines) if (m := STEP_LINE.match(l))]

    def wait_step(self, step: str, timeout: float = 600) -> None:
        """Until STEP's line is printed; AssertionError if the process ends first."""
        deadline = time.monotonic() + timeout
        with self._new:
            while step not in self.steps():
                if self._eof:
                    raise AssertionError(f"vztt ended (exit {self.proc.poll()}) before step {step}:\n"
                                         + "\n".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no step {step} in {timeout} s:\n" + "\n".join(self.lines))
                self._new.wait(min(left, 1.0))

    def wait_child(self, name: str, timeout: float = 300) -> None:
        """Until a descendant process whose command line holds `name` runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(name in cmd for cmd in descendants(self.pid).values()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"vztt ended before running {name}:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        raise AssertionError(f"no {name} under pid {self.pid} in {timeout} s")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)       # children of a SIGKILLed build may hold stderr open
        return code

    def errors(self) -> list[str]:
        return [l for l in self.lines if l.startswith("vztt: ")]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `pid`."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            parent[int(p)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(p)] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        cur = todo.pop()
        for child, par in parent.items():
            if par == cur and child not in found:
                found[child] = cmd.get(child, "")
                todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out


def traces(cache: Path) -> list[str]:
    """What a finished (or killed, then cleaned) command must not leave, checked from outside:
    mounts and loop devices under the cache, work dirs and temporary files, processes naming
    the cache, held lock files."""
    found = leftovers(cache)
    found += [f"process {p}" for p in processes_naming(cache)]
    found += [str(p) for p in cache.rglob("*.tmp-*")]
    found += [str(p) for p in cache.rglob("*-old")]
    found += held_locks(cache)
    return found


def held_locks(cache: Path) -> list[str]:
    """flock/POSIX locks some process holds on a file under `cache` (/proc/locks, by inode)."""
    inodes = {}
    for p in cache.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        inodes[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = p
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        try:
            if "->" in parts:            # a waiter: "N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ..."
                fields = parts[parts.index("->") + 1:]
                pid, dev_ino = fields[3], fields[4]
            else:                        # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"
                pid, dev_ino = parts[4], parts[5]
            major, minor, ino = dev_ino.split(":")
            key = (int(major, 16), int(minor, 16), int(ino))
        except (IndexError, ValueError):
            continue
        if key in inodes:
            held.append(f"lock on {inodes[key]} held by pid {pid}")
    return held


# -- the suite's table -------------------------------------------------------------------

TABLE: list[tuple[str, str, str]] = []


def record(fault: str, step: str, outcome: str) -> None:
    """One row of the summary table the fault suite prints at its end."""
    TABLE.append((fault, step, outcome))


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name
