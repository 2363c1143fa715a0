"""Running .gitlab-ci.yml with gitlab-ci-local (tests/tools: npm, pinned by the
Makefile's test set-up) on this machine, as GitLab's shell runners would.

    lab = GitLabLocal(clone_of=REPO, where=tmp, variables={...})
    run = lab.run()                       # the whole pipeline; run.jobs: job -> "PASS" / "FAIL"

The checkout's files (tracked, and untracked ones git does not ignore) are
copied into a git repository of their own, with a fake `origin`, so that
gitlab-ci-local finds the project it expects and never fetches. Jobs run on
the host's shell (no image), each in its own directory (`--shell-isolation`),
with caches and artifacts under the clone's .gitlab-ci-local/. CI/CD
variables go into a `--home` of the test's (`global:` variables, as a
project's CI/CD variables), never into the environment: gitlab-ci-local
hands its own environment to the jobs, so vztt's and gitlab-ci-local's
variables of the test process are removed from it.

gitlab-ci-local runs in a session of its own: a time bound or a cancel
(`cancel_when`) signals the whole session, jobs included (killing only
gitlab-ci-local leaves its jobs running), and nothing of it outlives a run.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

GCL = Path(__file__).resolve().parent / "tools" / "node_modules" / ".bin" / "gitlab-ci-local"
FAKE_ORIGIN = "https://gitlab.example.invalid/vztt/vztt.git"
SUMMARY = re.compile(r"^\s*(PASS|FAIL|WARN)\s+(?:\[\w+\] -> )?(.+?)\s*$")


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    jobs: dict[str, str] = field(default_factory=dict)      # job name -> PASS, FAIL or WARN (the summary)

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def _session_processes(session: int) -> list[int]:
    """Every process of a session (field 6 of /proc/PID/stat)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session:
            found.append(int(proc.name))
    return found


def end_session(session: int, grace: float = 60.0) -> None:
    """Wait for what is left of the session to end (it was signalled); SIGKILL it after `grace`."""
    deadline = time.monotonic() + grace
    while _session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class GitLabLocal:
    def __init__(self, clone_of: Path, where: Path, variables: dict[str, str]):
        self.clone = where / "clone"
        self.home = where / "home"
        self.logs = where / "logs"
        for d in (self.home / ".gitlab-ci-local", self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self._copy(clone_of)
        self.set_variables(variables)
        self.runs = 0

    def _git(self, *args: str) -> None:
        subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", *args], cwd=self.clone,
                       check=True, capture_output=True)

    def _copy(self, checkout: Path) -> None:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=checkout,
                               check=True, capture_output=True).stdout
        self.clone.mkdir(parents=True)
        subprocess.run(["rsync", "-a", "--from0", "--files-from=-", f"{checkout}/", f"{self.clone}/"], input=files,
                       check=True, capture_output=True)
        self._git("init", "-q", "-b", "main")
        self._git("add", "-A")
        self._git("commit", "-qm", "the checkout under test")
        self._git("remote", "add", "origin", FAKE_ORIGIN)
        self._git("update-ref", "refs/remotes/origin/main", "HEAD")
        self._git("symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")

    def set_variables(self, variables: dict[str, str]) -> None:
        """The project's CI/CD variables (gitlab-ci-local: `global:` in --home's variables.yml), all of
        type variable: gitlab-ci-local takes a bare value that starts with / for a File variable and
        copies the file to /tmp, where it stays. A path is passed as the value, as a File variable's
        value is its path in GitLab."""
        doc = {"global": {k: {"type": "variable", "values": {"*": v}} for k, v in variables.items()}}
        (self.home / ".gitlab-ci-local" / "variables.yml").write_text(yaml.safe_dump(doc))

    @property
    def state(self) -> Path:
        return self.clone / ".gitlab-ci-local"

    def artifacts(self, job: str) -> Path:
        """A job's artifacts (gitlab-ci-local's name for the directory: `:`, ` `, `/` and `[` mangled)."""
        found = [d for d in (self.state / "artifacts").iterdir() if d.name == _safe_name(job)]
        assert found, f"no artifacts of {job!r} in {self.state / 'artifacts'}"
        return found[0]

    def job_log(self, job: str) -> str:
        return (self.state / "output" / f"{_safe_name(job)}.log").read_text(errors="replace")

    def run(self, *args: str, file: str | None = None, timeout: float = 1800,
            cancel_when: Callable[[], bool] | None = None) -> Run:
        """gitlab-ci-local with the shell executor, two jobs at a time; `cancel_when` is polled
        and, once true, the run is cancelled as GitLab cancels a pipeline (SIGTERM to everything)."""
        self.runs += 1
        log = self.logs / f"run-{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VZTT_", "GCL_"))}
        argv = [str(GCL), "--shell-isolation", "--no-artifacts-to-source", "--home", str(self.home),
                "--concurrency", "2", "--no-color", "--variable", "CI_PIPELINE_SOURCE=schedule",
                "--ignore-predefined-vars", "CI_PIPELINE_SOURCE"]
        if file:
            argv += ["--file", file]
        started = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.Popen(argv + list(args), cwd=self.clone, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = started + timeout
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"gitlab-ci-local ran longer than {timeout} s; log {log}")
                    if cancel_when is not None and cancel_when():
                        os.killpg(proc.pid, signal.SIGTERM)
                        cancel_when = None
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
                end_session(proc.pid)
        output = log.read_text(errors="replace")
        jobs = {m.group(2): m.group(1) for line in output.splitlines() if (m := SUMMARY.match(line))}
        return Run(proc.returncode, output, time.monotonic() - started, jobs)


def _safe_name(job: str) -> str:
    """gitlab-ci-local's file-system name for a job (Utils.safeDockerString: every run of
    characters outside [A-Za-z0-9_-] base64url-encoded, unpadded): `update: fx-a` -> updateOiAfx-a."""
    return re.sub(r"[^\w-]+", lambda m: base64.urlsafe_b64encode(m.group().encode()).decode().rstrip("="), job,
                  flags=re.ASCII)
