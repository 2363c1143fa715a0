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
        """The steps that have ended well so far, in order (a step a signal stopped ends FAILED)."""
        return [m[1] for l in list(self.lines) if (m := STEP_LINE.match(l)) and m[2] == "ok"]

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


# -- a local distribution to build from (the session's Debian 12 packages, signed here) --

LEAF = """extends = "debian"
release = "stable"
version = "12"
[[repositories]]
name = "main"
url = "$FIXTURE_MIRROR"
keyring = "fixture.gpg"
[[repositories]]
name = "updates"
enabled = false
[[repositories]]
name = "security"
enabled = false
"""


class LocalDistro:
    """The real Debian 12 packages of the session's build, republished on file:// with a
    throwaway key, and a leaf recipe `fx-fault` over them: builds without the network."""

    def __init__(self, root: Path, lock: dict):
        from aptrepo import make_gpg_key, make_repo
        from conftest import RECIPES
        from minidist import stage_locked_debs
        import shutil
        self.root = root
        key = make_gpg_key(root / "key")
        debs = stage_locked_debs(lock, PACKAGE_CACHE, root / "debs")
        self.recipes = root / "recipes"
        shutil.copytree(RECIPES, self.recipes)
        shutil.copyfile(key.keyring, self.recipes / "keys" / "fixture.gpg")
        (self.recipes / "fx-fault.toml").write_text(LEAF)
        self.repo_root = root / "repo"
        make_repo(self.repo_root, debs, suite="stable", key=key)

    @property
    def env(self) -> dict[str, str]:
        return {"VZTT_MIRROR_FIXTURE_MIRROR": f"file://{self.repo_root}"}

    def argv(self, cache: Path, *args: str) -> list[str | os.PathLike[str]]:
        return ["--cache-dir", cache, "--recipes", self.recipes, *args]


def loop_devices(cache: Path) -> list[str]:
    """Loop devices backed by a file under `cache`, as "DEVICE FILE" (a device number is
    reused as soon as it is free: the backing file, in a build's own work dir, says whose)."""
    out = subprocess.run(["losetup", "-nO", "NAME,BACK-FILE"], capture_output=True, text=True).stdout.splitlines()
    return [" ".join(l.split()) for l in out if str(cache) in l]


def print_table(write) -> None:  # type: ignore[no-untyped-def]
    """The summary the fault suite ends with (tests/conftest.py's pytest_terminal_summary)."""
    if not TABLE:
        return
    w1 = max(len(r[0]) for r in TABLE + [("fault", "", "")])
    w2 = max(len(r[1]) for r in TABLE + [("", "step", "")])
    write(f"\nfault injection: {len(TABLE)} faults\n")
    write(f"{'fault':<{w1}}  {'step':<{w2}}  outcome\n")
    for fault, step, outcome in TABLE:
        write(f"{fault:<{w1}}  {step:<{w2}}  {outcome}\n")


# -- network faults: a loopback proxy in front of the suite's nginx -------------------

class Rule:
    """For the next `times` requests whose path holds `match`: "reset" (RST after `after`
    bytes of the response), "500" (answer 500 without asking nginx), "slow" (relay in
    16 KiB pieces, `delay` seconds apart)."""

    def __init__(self, match: str, action: str, times: int = 1, after: int = 0, delay: float = 0.02):
        self.match, self.action, self.times, self.after, self.delay = match, action, times, after, delay
        self.hits = 0


class FaultProxy:
    """One request per connection (it asks nginx to close after each), so that each
    request meets the rules."""

    def __init__(self, port: int, rules: list[Rule]):
        import socket
        self.target = ("127.0.0.1", port)
        self.rules = rules
        self.requests: list[str] = []
        self.ranges: list[str | None] = []        # each request's Range header
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, location: str) -> str:
        return f"http://127.0.0.1:{self.port}/{location}/"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client) -> None:  # type: ignore[no-untyped-def]
        import socket
        import struct
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            first, _, rest = head.partition(b"\r\n")
            path = first.split()[1].decode(errors="replace")
            self.requests.append(path)
            headers = [h for h in rest.split(b"\r\n") if h and not h.lower().startswith(b"connection:")]
            self.ranges.append(next((h.split(b":", 1)[1].strip().decode() for h in headers
                                     if h.lower().startswith(b"range:")), None))
            request = first + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"Connection: close\r\n\r\n"
            rule = next((r for r in self.rules if r.match in path and r.hits < r.times), None)
            if rule:
                rule.hits += 1
            if rule and rule.action == "500":
                client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            with socket.create_connection(self.target) as up:
                up.sendall(request)
                sent = 0
                while data := up.recv(16384):
                    if rule and rule.action == "reset" and sent + len(data) > rule.after:
                        client.sendall(data[: rule.after - sent])
                        time.sleep(0.5)         # read by the client first: an RST drops unread bytes
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return                                  # close with linger 0: RST
                    client.sendall(data)
                    sent += len(data)
                    if rule and rule.action == "slow":
                        time.sleep(rule.delay)
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        self.sock.close()
