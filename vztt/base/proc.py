"""Running external tools: the one place vztt starts a program.

`run()` runs a command to its end: its command line and output go to the
build's log, so a failure message can stay one line (the tool's telling
lines) while the whole story is kept for the maintainer. `spawn()` starts one
whose streams the caller drives (a pipeline such as `tar | lz4`, qemu, the
container stage). Both start it in a session of its own (so Ctrl-C, SIGTERM
or an error can stop the whole tree before a mount under it goes), with the
one tool environment (`tool_env()`), and turn a missing program into one
line naming it. `require_tool()` checks for a program up front and names the
Debian package to install.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from vztt.base.errors import BuildError, EnvironmentProblem, VzttError

# Lines that say what went wrong, in the formats of the tools we drive.
_ERROR_LINE = re.compile(r"^(E:|W: GPG error|dpkg: error|dpkg: dependency problems|error:|Error:|.*: error:|ERROR)|"
                         r"(Depends|Pre-Depends|Conflicts|Breaks): |(not installable|is not signed|NO_PUBKEY|BADSIG)")

# The streams and exceptions of the processes started here, for callers that drive them.
PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
Popen = subprocess.Popen
CompletedProcess = subprocess.CompletedProcess
TimeoutExpired = subprocess.TimeoutExpired

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The environment every tool runs with: a fixed PATH (sbin included: vztt runs as root and
# needs mkfs, losetup, sfdisk whatever the caller's PATH) and one UTF-8 locale, so that
# messages can be parsed and file names pass through. Callers add what a tool needs
# (APT_CONFIG, DEBIAN_FRONTEND, ...) with tool_env(**extra); GNU tar's --sort=name is
# bytewise only with LC_ALL=C, which formats/plain.py asks for that way.
TOOL_ENV: dict[str, str] = {
    "PATH": SYSTEM_PATH,
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


def tool_env(**extra: str) -> dict[str, str]:
    """TOOL_ENV plus `extra` (and the build mark, added at start)."""
    return {**TOOL_ENV, **extra}


def which(name: str) -> str | None:
    """The program's path on the tool PATH, or None."""
    return shutil.which(name, path=SYSTEM_PATH)


def require_tool(name: str, package: str, error: type[VzttError] = EnvironmentProblem, why: str = "") -> str:
    """The program's path; `error` naming the Debian package that has it if it is missing."""
    path = which(name)
    if path is None:
        raise error(f"{name} is missing{' (' + why + ')' if why else ''}: apt-get install {package}")
    return path


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


def _environment(env: dict[str, str] | None, inherit: bool, mark: bool = True) -> dict[str, str]:
    if env is not None:
        full = dict(env)
    elif inherit:
        full = {**os.environ, **TOOL_ENV}
    else:
        full = dict(TOOL_ENV)
    if _mark and mark:
        full[MARK_VARIABLE] = _mark
    return full


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def spawn(cmd: Sequence[str | os.PathLike[str]], *, what: str, error: type[VzttError] = BuildError,
          env: dict[str, str] | None = None, inherit_env: bool = False, cwd: Path | None = None,
          stdin: int | IO[Any] | None = DEVNULL, stdout: int | IO[Any] | None = PIPE,
          stderr: int | IO[Any] | None = PIPE, text: bool = False, pass_fds: Sequence[int] = (),
          new_session: bool = True, preexec_fn: Callable[[], None] | None = None,
          mark: bool = True) -> subprocess.Popen[Any]:
    """Start a program whose streams the caller drives; `error` if it is not installed.
    The caller waits for it (or kill_tree()s it) on every path out. `preexec_fn` runs in
    the child before exec (the VM runtime's parent-death signal); mark=False leaves out
    the build mark, for a process whose environment must be exactly `env` (what runs
    inside a container: boot.runtime's EXEC_ENV)."""
    argv = [str(c) for c in cmd]
    try:
        return subprocess.Popen(argv, env=_environment(env, inherit_env, mark), cwd=cwd, stdin=stdin, stdout=stdout,
                                stderr=stderr, text=text, errors="replace" if text else None,
                                pass_fds=tuple(pass_fds), start_new_session=new_session, preexec_fn=preexec_fn)
    except FileNotFoundError:
        raise error(f"{what}: {argv[0]} is not installed") from None


def run(cmd: Sequence[str | os.PathLike[str]], *, log: Log | None = None, what: str,
        error: type[VzttError] = BuildError, env: dict[str, str] | None = None, inherit_env: bool = True,
        cwd: Path | None = None, input: bytes | str | None = None, stdin: IO[Any] | None = None,
        check: bool = True, timeout: float | None = None, ok: Sequence[int] = (0,),
        binary: bool = False, timeout_hint: str = "") -> subprocess.CompletedProcess[Any]:
    """Run a command to its end, output captured (text; bytes with `binary`); with
    `check`, an exit status not in `ok` raises `error` with `what` and the telling
    lines. A timeout kills the whole tree and raises `error`. env=None: the caller's
    environment with TOOL_ENV over it (inherit_env=False: TOOL_ENV alone). Its input:
    `input`, or the stream `stdin` (another process's output, for a pipeline), else
    nothing."""
    argv = [str(c) for c in cmd]
    if log:
        log.write("$ " + shlex.join(argv))
    # A session of its own, so that on Ctrl-C, SIGTERM or an error we can stop the whole
    # tree (apt -> dpkg -> maintainer scripts) before unmounting the image under it.
    child = spawn(argv, what=what, error=error, env=env, inherit_env=inherit_env, cwd=cwd,
                  stdin=PIPE if input is not None else (stdin if stdin is not None else DEVNULL), text=not binary)
    if isinstance(input, bytes) and not binary:
        input = input.decode()
    elif isinstance(input, str) and binary:
        input = input.encode()
    try:
        stdout, stderr = child.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(child)
        raise error(f"{what}: {Path(argv[0]).name} did not finish within {timeout:.0f} s{timeout_hint}") from None
    except BaseException:
        kill_tree(child)
        raise
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    output = (_text(proc.stdout) if not binary else "") + _text(proc.stderr)
    if log and output:
        log.write(output)
    if check and proc.returncode not in ok:
        hint = f" (log: {log.path})" if log and log.path else ""
        raise error(f"{what}: {summarize(output) or 'exit status ' + str(proc.returncode)}{hint}")
    return proc
