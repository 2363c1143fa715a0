"""Running external tools: output to the build log, failures as one line.

Every command a build runs appends its command line and output to the
build's log file, so a failure message can stay one line (the tool's last
error line) while the whole story is kept for the maintainer.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path
from typing import IO, Sequence

from vztt.base.errors import BuildError, VzttError

# Lines that say what went wrong, in the formats of the tools we drive.
_ERROR_LINE = re.compile(r"^(E:|W: GPG error|dpkg: error|dpkg: dependency problems|error:|Error:|.*: error:|ERROR)|"
                         r"(Depends|Pre-Depends|Conflicts|Breaks): |(not installable|is not signed|NO_PUBKEY|BADSIG)")

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


# Every command a build runs carries VZTT_BUILD=<its work dir name> in its environment,
# and so do their children (apt -> dpkg -> maintainer scripts): when a build is killed,
# the next run finds what it left running by this mark (cache.clean_stale_work).
MARK_VARIABLE = "VZTT_BUILD"
_mark: str | None = None


def mark_children(value: str) -> None:
    global _mark
    _mark = value


class Log:
    """The build log: a file every command's output goes to."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh: IO[str] | None = open(path, "a", buffering=1) if path else None

    def write(self, text: str) -> None:
        if self._fh:
            self._fh.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


def summarize(output: str, limit: int = 3) -> str:
    """The most telling lines of a tool's output, joined into one line."""
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    picked = [l for l in lines if _ERROR_LINE.search(l)]
    picked = picked or lines[-limit:]
    seen: list[str] = []
    for l in picked:
        if l not in seen:
            seen.append(l)
    return " | ".join(seen[:limit])[:600]


def kill_tree(child: subprocess.Popen[str]) -> None:
    """SIGKILL a child and everything in its session, then reap it."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def run(cmd: Sequence[str | os.PathLike[str]], *, log: Log | None = None, what: str,
        error: type[VzttError] = BuildError, env: dict[str, str] | None = None,
        cwd: Path | None = None, input: bytes | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise `error` with `what` and the telling lines."""
    argv = [str(c) for c in cmd]
    if log:
        log.write("$ " + shlex.join(argv))
    try:
        # A session of its own, so that on Ctrl-C, SIGTERM or an error we can stop the whole
        # tree (apt -> dpkg -> maintainer scripts) before unmounting the image under it.
        env = dict(env) if env is not None else {**os.environ, **BASE_ENV}
        if _mark:
            env[MARK_VARIABLE] = _mark
        child = subprocess.Popen(argv, env=env, cwd=cwd,
                                 stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                 start_new_session=True)
    except FileNotFoundError:
        raise error(f"{what}: {argv[0]} is not installed") from None
    try:
        stdout, stderr = child.communicate(input.decode() if input is not None else None, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(child)
        raise error(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from None
    except BaseException:
        kill_tree(child)
        raise
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    output = (proc.stdout or "") + (proc.stderr or "")
    if log and output:
        log.write(output)
    if check and proc.returncode != 0:
        hint = f" (log: {log.path})" if log and log.path else ""
        raise error(f"{what}: {summarize(output) or 'exit status ' + str(proc.returncode)}{hint}")
    return proc
