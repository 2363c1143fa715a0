"""Boot tests: boot a packed template in the container runtime and check it.

    archive -> scratch tree -> container (overlay) -> checks -> poweroff -> gone

The archive is unpacked once, with GNU tar, into a tmpfs at
`<cache>/.work/<name>.boot.<pid>/tree` and booted through overlayfs
(vztt.runtime), so the tree stays as shipped; the runtime's scratch and state
live in `<cache>/.containers/`, the console log in
`<cache>/logs/<name>.console.log` (kept: BootError names it). Callers enter a
private mount namespace first, so no mount outlives a killed vztt; the
runtime's cleanup_stale (clean_stale here) removes the rest at the next start.

Checks, in order, each reported by name:

  boot           systemd reaches running or degraded within `boot.timeout`
  failed-units   no failed units beyond the recipe's `boot.allowed_failed`
  hostname       the kernel's hostname is the recipe's `hostname`
  osrelease      uname -r is the recipe's `osrelease`, if it sets one (kernel.virt_osrelease;
                 a kernel without it: "not applied", not a failure)
  loopback       lo has 127.0.0.1, `localhost` resolves, a TCP echo over 127.0.0.1 works
  package-db     the package database is consistent (per family: PACKAGE_DB_CHECKS)
  smoke:<name>   each recipe smoke check, run with /bin/sh -c inside
  poweroff       a clean poweroff within POWEROFF_TIMEOUT

A boot that fails is BootError (exit 8), a check that fails CheckFailed (9),
a host that cannot run containers RuntimeUnavailable (10). `vztt build` calls
`gate()` between pack and promote: only a template that passes is promoted.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from vztt.store.templates import TemplateCache
from vztt.base.errors import RecipeError
from vztt.base.mounts import mounted_below
from vztt.base.progress import Progress
from vztt.recipe.recipe import Recipe
from vztt.boot.runtime import BootError, CheckFailed, Container, RuntimeUnavailable, cleanup_stale
from vztt.boot.runtime._linux import OSRELEASE_SYSCTL

CONTAINERS = ".containers"       # the runtime's state dir, under the cache root
CHECK_TIMEOUT = 60.0             # seconds per check command
POWEROFF_TIMEOUT = 30.0
UNPACK_TIMEOUT = 600.0
MEMORY_MAX = 2 << 30             # a runaway check cannot take the host down
PIDS_MAX = 4096
OUTPUT_LIMIT = 4000              # characters of a failed check's output kept in reports
FAILED = "-failed"               # suffix of a template that failed its boot test
TIMED_OUT = 124                  # the runtime's exec status at a timeout

PASSED, FAILED_RESULT, SKIPPED = "passed", "failed", "skipped"


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    result: str = SKIPPED          # passed, failed, skipped (not run)
    seconds: float = 0.0
    detail: str = ""               # one line: what was found, or what was wrong
    output: str = ""               # what the command printed (reported for failures)

    @property
    def ok(self) -> bool:
        return self.result == PASSED

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "result": self.result, "seconds": round(self.seconds, 3)}
        if self.detail:
            d["detail"] = self.detail
        if self.result == FAILED_RESULT and self.output:
            d["output"] = self.output[-OUTPUT_LIMIT:]
        return d


@dataclass
class Report:
    name: str
    archive: str
    hostname: str
    checks: list[Check] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0                 # the whole test: unpack to scratch removed
    unpack_seconds: float = 0.0
    boot_seconds: float | None = None    # container start to running/degraded
    ready_seconds: float | None = None   # container start to the last check passed (before poweroff)
    console_log: str = ""
    error: str = ""                      # one line, when the test failed
    error_kind: str = ""                 # "boot" or "check"

    @property
    def result(self) -> str:
        return PASSED if not self.error_kind and all(c.ok for c in self.checks) else FAILED_RESULT

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.result == FAILED_RESULT]

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "result": self.result, "archive": self.archive, "hostname": self.hostname,
            "started": self.started, "seconds": round(self.seconds, 3),
            "unpack_seconds": round(self.unpack_seconds, 3),
            "boot_seconds": None if self.boot_seconds is None else round(self.boot_seconds, 3),
            "ready_seconds": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            "console_log": self.console_log,
            "checks": [c.as_dict() for c in self.checks],
        }
        if self.error:
            d["error"] = {"kind": self.error_kind, "message": self.error}
        return d

    def exception(self) -> BootError | CheckFailed | None:
        """The error this report stands for (exit 8 or 9), or None if it passed."""
        if self.result == PASSED:
            return None
        cls = BootError if self.error_kind == "boot" else CheckFailed
        return cls(f"{self.name}: {self.error}")


# --------------------------------------------------------------------------
# Host side: stale runs, the scratch tree
# --------------------------------------------------------------------------

def containers_dir(cache: TemplateCache) -> Path:
    return cache.root / CONTAINERS


def console_log_path(cache: TemplateCache, name: str, purpose: str = "test") -> Path:
    logs = cache.root / "logs"
    logs.mkdir(exist_ok=True)
    return logs / (f"{name}.console.log" if purpose == "test" else f"{name}.{purpose}.console.log")


def clean_stale(cache: TemplateCache) -> list[str]:
    """What killed runs left of their containers: processes, mounts, cgroups,
    scratch (the runtime's cleanup_stale). Needs root."""
    return cleanup_stale(containers_dir(cache))


def prepare_host(cache: TemplateCache, what: str) -> list[str]:
    """Root check, then what killed runs left: containers through the
    runtime, scratch trees through the cache. Call at the start of test and
    run (build does the same after its own root check)."""
    if os.geteuid() != 0:
        raise RuntimeUnavailable(f"{what} needs root (namespaces, overlayfs, cgroups); run it with sudo")
    cleaned = clean_stale(cache)
    cache.clean_stale_work()
    return cleaned


def cached_archive(cache: TemplateCache, name: str) -> Path:
    """The cached plain archive of NAME, the one a boot test boots."""
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; run `vztt build {name}` first")
    archives = entry.data.get("archives") or {entry.data["archive"].get("format", "plain"): entry.data["archive"]}
    plain = archives.get("plain")
    if plain is None:
        raise RecipeError(f"{name}: the cache holds no plain archive to boot (formats: {', '.join(archives)}); "
                          f"build it with --format all")
    return cache.root / plain["file"]


def container_name(template: str, purpose: str) -> str:
    """A runtime container name (letters, digits, '.', '-'), unique per process."""
    slug = re.sub(r"[^A-Za-z0-9.-]", "-", template).strip(".-") or "template"
    suffix = f"-{purpose}-{os.getpid()}"
    return slug[:63 - len(suffix)] + suffix


def unpack(archive: Path, dest: Path, timeout: float = UNPACK_TIMEOUT) -> None:
    """Extract our own .tar.lz4 with GNU tar, owners, modes, xattrs, ACLs kept.
    GNU tar refuses members with `..` and delays symlinks that could redirect
    later members; dest is an empty directory."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["tar", "--extract", "--use-compress-program=lz4", f"--file={archive}", f"--directory={dest}", "--numeric-owner",
           "--same-permissions", "--xattrs", "--xattrs-include=*", "--acls", "--no-overwrite-dir"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException as e:   # timeout, Ctrl-C: tar and its lz4 go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeUnavailable(f"unpacking {archive} took more than {timeout:g} s") from None
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise RuntimeUnavailable(f"cannot unpack {archive}: {lines[-1] if lines else f'tar exit status {proc.returncode}'}")


@contextlib.contextmanager
def scratch_tree(cache: TemplateCache, name: str) -> Iterator[Path]:
    """An empty tmpfs at <cache>/.work/<name>.boot.<pid>/tree to unpack the
    archive into: faster than the disk both ways, and it goes with one umount.
    Removed on the way out, whatever happens; in a private mount namespace
    (test, run, build) the kernel drops it even after SIGKILL, and
    clean_stale_work removes the directory."""
    scratch = cache.root / ".work" / f"{name}.boot.{os.getpid()}"
    tree = scratch / "tree"
    _remove_scratch(scratch)
    tree.mkdir(parents=True)

    def remove() -> None:
        _remove_scratch(scratch)
        if scratch.exists():
            raise RuntimeUnavailable(f"cannot remove the scratch tree {scratch}")

    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid", "vztt-boottest", str(tree)],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if mount.returncode != 0:
            raise RuntimeUnavailable(f"cannot mount a tmpfs on {tree}: {mount.stderr.strip()}")
        yield tree
    except BaseException:
        with contextlib.suppress(RuntimeUnavailable):
            remove()
        raise
    remove()


def _remove_scratch(scratch: Path) -> None:
    if not scratch.exists():
        return
    for point in mounted_below(scratch):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def booted(recipe: Recipe, cache: TemplateCache, tree: Path, purpose: str, vm: bool = False) -> Iterator[Container]:
    """A started container of `tree`, with the recipe's hostname; closed on the way out.
    vm=True: a qemu VM with vztt's kernel instead (vztt.runtime.vm, the same interface);
    `tree` is then a scratch copy that the VM's disk is made from."""
    if vm:
        from vztt.kernel.build import KVM_PROBE, vm_kernel
        from vztt.boot.runtime.vm import VM
        box = VM(tree, cache.root / ".work" / f"{recipe.name}.vm.{os.getpid()}", vm_kernel(cache).bzimage,
                 name=container_name(recipe.name, purpose), hostname=recipe.hostname, osrelease=osrelease(recipe),
                 console_log=console_log_path(cache, recipe.name, vm_purpose(purpose)),
                 probe_cache=cache.kernel_dir / KVM_PROBE)
    else:
        box = Container(tree, containers_dir(cache), name=container_name(recipe.name, purpose),
                        hostname=recipe.hostname, overlay=True, memory_max=MEMORY_MAX, pids_max=PIDS_MAX,
                        console_log=console_log_path(cache, recipe.name, purpose), osrelease=osrelease(recipe))
    with box:
        yield box  # type: ignore[misc]


def vm_purpose(purpose: str) -> str:
    """A VM run's console log is <name>.vm.console.log (test) or <name>.vm-<purpose>.console.log."""
    return "vm" if purpose == "test" else f"vm-{purpose}"


def osrelease(recipe: Recipe) -> str | None:
    """The recipe's `osrelease` (what uname -r says inside), or None; checked
    against the settings table's pattern when the recipe was loaded."""
    return recipe.merged.get("osrelease") or None


def boot_timeout(recipe: Recipe) -> int:
    timeout = recipe.merged.get("boot.timeout", 60)
    if timeout <= 0:
        raise RecipeError(f"{recipe.origins.get('boot.timeout', recipe.path)}: boot.timeout: {timeout} is not "
                          "a positive number of seconds")
    return timeout


def allowed_failed(recipe: Recipe) -> list[str]:
    return list(recipe.merged.get("boot.allowed_failed") or [])


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------

Outcome = tuple[bool, str, str]       # (ok, detail, output)


def _timed(check: Check, fn: Callable[[], Outcome]) -> Check:
    started = time.monotonic()
    ok, check.detail, check.output = fn()
    check.seconds = time.monotonic() - started
    check.result = PASSED if ok else FAILED_RESULT
    return check


def _run(box: Container, script: str, timeout: float = CHECK_TIMEOUT) -> tuple[int, str, float]:
    started = time.monotonic()
    status, out = box.exec(["/bin/sh", "-c", script], timeout=timeout)
    return status, out, time.monotonic() - started


def _status_problem(status: int, expected: int, took: float, timeout: float) -> str | None:
    if status == TIMED_OUT and took >= timeout - 0.5:
        return f"timed out after {timeout:g} s"
    if status != expected:
        return f"exit status {status}, expected {expected}"
    return None


def check_failed_units(box: Container, failed: list[str], allowed: list[str]) -> Outcome:
    unexpected = [u for u in failed if not any(fnmatch.fnmatchcase(u, p) for p in allowed)]
    tolerated = [u for u in failed if u not in unexpected]
    if not unexpected:
        return True, f"allowed to fail: {', '.join(tolerated)}" if tolerated else "none", ""
    _, status = box.exec(["systemctl", "status", "--no-pager", "--lines=15", "--full", *unexpected],
                         timeout=CHECK_TIMEOUT)
    return False, "failed: " + ", ".join(unexpected), status


def check_hostname(box: Container, expected: str) -> Outcome:
    status, out, _ = _run(box, "uname -n")
    found = out.strip()
    if status != 0:
        return False, f"uname -n: exit status {status}", out
    if found != expected:
        return False, f"hostname is {found!r}, the recipe says {expected!r}", out
    return True, found, out


# One shell script, so that the check costs one exec. It can fail three ways:
# lo without 127.0.0.1, `localhost` not resolving (no /etc/hosts entry), no TCP
# round trip over 127.0.0.1 (a listener made with systemd's own
# systemd-socket-activate, a client with bash's /dev/tcp: both in every
# systemd-based minimal image; dash has no /dev/tcp).
LOOPBACK_PORT = 47007
LOOPBACK_SCRIPT = r"""
fail() { echo "FAIL: $*"; exit 1; }
addrs=$(ip -o addr show dev lo 2>&1) || fail "ip -o addr show dev lo: $addrs"
echo "$addrs" | sed 's/\\ .*//'
case "$addrs" in *"inet 127.0.0.1/"*) ;; *) fail "lo has no address 127.0.0.1";; esac
hosts=$(getent hosts localhost) || fail "localhost does not resolve (getent hosts localhost: no entry in /etc/hosts?)"
echo "$hosts"
for tool in systemd-socket-activate bash; do
  command -v $tool >/dev/null || fail "$tool is missing: cannot test TCP over 127.0.0.1"
done
systemd-socket-activate --listen=127.0.0.1:PORT --accept --inetd /bin/cat </dev/null >/dev/null 2>&1 &
server=$!
i=0
while [ $i -lt 100 ]; do
  reply=$(bash -c 'exec 3<>/dev/tcp/127.0.0.1/PORT && echo vztt-loopback-$$ >&3 && read -r line <&3 && echo "$line"' 2>&1) && break
  i=$((i + 1)); sleep 0.02
done
kill $server 2>/dev/null
case "$reply" in
  vztt-loopback-*) echo "TCP echo over 127.0.0.1:PORT: $reply" ;;
  *) fail "no TCP echo over 127.0.0.1:PORT: $reply" ;;
esac
""".replace("PORT", str(LOOPBACK_PORT))


def check_loopback(box: Container) -> Outcome:
    status, out, took = _run(box, LOOPBACK_SCRIPT)
    fails = [line[6:] for line in out.splitlines() if line.startswith("FAIL: ")]
    if status == 0 and not fails:
        return True, "127.0.0.1 up, localhost resolves, TCP echo ok", out
    return False, fails[0] if fails else (_status_problem(status, 0, took, CHECK_TIMEOUT) or "failed"), out


def _dpkg_audit(box: Container) -> Outcome:
    status, out, took = _run(box, "dpkg --audit")
    if status != 0 or out.strip():
        problem = _status_problem(status, 0, took, CHECK_TIMEOUT)
        return False, "dpkg --audit: " + (problem or "reports packages in a bad state"), out
    return True, "dpkg --audit: clean", out


def _rpm_verify(box: Container) -> Outcome:
    # Every file of every package against the database. Changed config files, sizes and
    # times are what a build and a boot legitimately do; a missing file is not.
    status, out, took = _run(box, "rpm -Va --nomtime; echo rpm-exit=$?")
    if "rpm-exit=" not in out:
        return False, "rpm -Va: " + (_status_problem(status, 0, took, CHECK_TIMEOUT) or "did not run"), out
    missing = [l for l in out.splitlines() if l.startswith("missing")]
    broken = [l for l in out.splitlines() if l.startswith("error:")]
    if missing or broken:
        return False, f"rpm -Va: {len(missing)} missing files, {len(broken)} errors", out
    return True, "rpm -Va: no missing files", out


# Package database consistency, by recipe.family.
PACKAGE_DB_CHECKS: dict[str, Callable[[Container], Outcome]] = {
    "apt": _dpkg_audit,
    "dnf": _rpm_verify,
}


def check_package_db(box: Container, family: str) -> Outcome:
    fn = PACKAGE_DB_CHECKS.get(family)
    if fn is None:
        return False, f"no package database check for the {family} family (vztt.boottest.PACKAGE_DB_CHECKS)", ""
    return fn(box)


def check_osrelease(box: Container, expected: str) -> Outcome:
    """uname -r is the recipe's osrelease. A kernel without vztt's
    kernel.virt_osrelease (a host's, for containers) cannot show it: the
    runtime noted that on the console and went on; so does this check."""
    status, out, _ = _run(box, f"uname -r; test -e {OSRELEASE_SYSCTL} || echo no-virt-osrelease")
    lines = out.strip().splitlines()
    found = lines[0] if lines else ""
    if status != 0:
        return False, f"uname -r: exit status {status}", out
    if found == expected:
        return True, found, out
    if "no-virt-osrelease" in lines:
        return True, f"not applied: this kernel ({found}) has no kernel.virt_osrelease", out
    return False, f"uname -r is {found!r}, the recipe's osrelease is {expected!r}", out


def check_smoke(box: Container, command: str, exit_status: int, output: str | None) -> Outcome:
    status, out, took = _run(box, command)
    problems = []
    if p := _status_problem(status, exit_status, took, CHECK_TIMEOUT):
        problems.append(p)
    if output is not None and not re.search(output, out, re.MULTILINE):
        problems.append(f"output does not match /{output}/")
    if problems:
        return False, "; ".join(problems), out
    return True, f"exit status {status}" + (f", output matches /{output}/" if output is not None else ""), out


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------

def check_names(recipe: Recipe) -> list[str]:
    return (["boot", "failed-units", "hostname"] + (["osrelease"] if osrelease(recipe) else [])
            + ["loopback", "package-db"] + [f"smoke:{s.name}" for s in recipe.smoke] + ["poweroff"])


def boot_test(recipe: Recipe, cache: TemplateCache, archive: Path, progress: Progress | None = None,
              vm: bool = False) -> Report:
    """Unpack, boot, check, power off, clean up. Returns the report: a failed
    boot or check is in it (Report.exception()); RuntimeUnavailable and
    KeyboardInterrupt propagate, after everything was cleaned up.
    vm=True boots it in qemu with vztt's kernel instead of a container."""
    progress = progress or Progress(quiet=True)
    report = Report(name=recipe.name, archive=str(archive), hostname=recipe.hostname,
                    checks=[Check(n) for n in check_names(recipe)],
                    started=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    console_log=str(console_log_path(cache, recipe.name, vm_purpose("test") if vm else "test")))
    checks = {c.name: c for c in report.checks}
    started = time.monotonic()
    with scratch_tree(cache, recipe.name) as tree:
        with progress.step("unpack") as st:
            unpack(archive, tree)
            report.unpack_seconds = time.monotonic() - started
            st.note(f"{archive.name} in {report.unpack_seconds:.1f} s")
        current = checks["boot"]
        booting = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                with progress.step("boot") as st:
                    booting = time.monotonic()
                    box = stack.enter_context(booted(recipe, cache, tree, "test", vm=vm))
                    state, failed = box.wait_running(timeout=boot_timeout(recipe))
                    report.boot_seconds = box.boot_seconds
                    current.result, current.seconds = PASSED, time.monotonic() - booting
                    current.detail = f"{state} in {current.seconds:.2f} s" + (f" ({box.note})" if vm else "")
                    st.note(current.detail)

                steps: list[tuple[str, Callable[[], Outcome]]] = [
                    ("failed-units", lambda: check_failed_units(box, failed, allowed_failed(recipe))),
                    ("hostname", lambda: check_hostname(box, recipe.hostname)),
                ]
                if release := osrelease(recipe):
                    steps.append(("osrelease", lambda: check_osrelease(box, release)))
                steps += [
                    ("loopback", lambda: check_loopback(box)),
                    ("package-db", lambda: check_package_db(box, recipe.family)),
                ]
                steps += [(f"smoke:{s.name}", lambda s=s: check_smoke(box, s.command, s.exit_status, s.output))
                          for s in recipe.smoke]
                with progress.step("checks") as st:
                    for name, fn in steps:
                        current = checks[name]
                        _timed(current, fn)
                    report.ready_seconds = time.monotonic() - booting
                    bad = [c.name for c in report.failed]
                    st.note(f"{len(steps) - len(bad)} of {len(steps)} passed"
                            + (f"; FAILED: {', '.join(bad)}" if bad else ""))

                current = checks["poweroff"]
                with progress.step("poweroff") as st:
                    clean = box.poweroff(timeout=POWEROFF_TIMEOUT)
                    current.seconds = time.monotonic() - booting - report.ready_seconds
                    current.result = PASSED if clean else FAILED_RESULT
                    current.detail = (f"in {current.seconds:.2f} s" if clean else
                                      f"did not power off within {POWEROFF_TIMEOUT:g} s: killed")
                    st.note(current.detail)
        except BootError as e:
            # Before `boot` passed: the template does not boot. After: the
            # container went down under a check, which is that check's failure.
            current.result = FAILED_RESULT
            if current.name == "boot":
                current.seconds = time.monotonic() - booting
            current.detail = str(e)
            current.output = _tail(Path(report.console_log))
            report.error_kind = "boot" if current.name == "boot" else "check"
    report.seconds = time.monotonic() - started
    if report.error_kind == "boot":
        report.error = f"the template did not boot: {checks['boot'].detail}"
    elif report.failed:
        report.error_kind = "check"
        report.error = (f"{len(report.failed)} of {len(report.checks)} checks failed: "
                        + "; ".join(f"{c.name} ({c.detail})" for c in report.failed)
                        + f"; console log: {report.console_log}")
    return report


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# A throwaway container for a maintainer (`vztt run`)
# --------------------------------------------------------------------------

def run_command(recipe: Recipe, cache: TemplateCache, archive: Path, argv: list[str], timeout: float,
                progress: Progress | None = None, vm: bool = False) -> tuple[int, str]:
    """Boot the template, run argv inside once it is up, power off, clean up.
    Returns (exit status, output); BootError if it does not boot."""
    progress = progress or Progress(quiet=True)
    with scratch_tree(cache, recipe.name) as tree:
        with progress.step("unpack") as st:
            started = time.monotonic()
            unpack(archive, tree)
            st.note(f"{archive.name} in {time.monotonic() - started:.1f} s")
        with contextlib.ExitStack() as stack:
            with progress.step("boot") as st:
                box = stack.enter_context(booted(recipe, cache, tree, "run", vm=vm))
                state, failed = box.wait_running(timeout=boot_timeout(recipe))
                st.note(f"{state} in {box.boot_seconds:.2f} s" + (f" (failed: {', '.join(failed)})" if failed else ""))
            status, out = box.exec(list(argv), timeout=timeout)
            box.poweroff(timeout=POWEROFF_TIMEOUT)
    return status, out


# --------------------------------------------------------------------------
# Output: the terminal table, JUnit XML
# --------------------------------------------------------------------------

def format_table(report: Report) -> str:
    width = max([len(c.name) for c in report.checks] + [5])
    lines = [f"{'CHECK':<{width}}  {'RESULT':<6}  {'SECONDS':>7}  DETAIL"]
    for c in report.checks:
        mark = {PASSED: "ok", FAILED_RESULT: "FAIL", SKIPPED: "-"}[c.result]
        seconds = f"{c.seconds:7.2f}" if c.result != SKIPPED else f"{'-':>7}"
        lines.append(f"{c.name:<{width}}  {mark:<6}  {seconds}  {c.detail}".rstrip())
        if c.result == FAILED_RESULT and c.output.strip():
            lines += ["    | " + line for line in c.output[-OUTPUT_LIMIT:].rstrip().splitlines()]
    passed = sum(c.ok for c in report.checks)
    summary = f"{report.name}: {report.result.upper()}, {passed} of {len(report.checks)} checks passed"
    if report.ready_seconds is not None:
        summary += f"; boot to checks done {report.ready_seconds:.2f} s"
    summary += f"; {report.seconds:.1f} s in all"
    lines.append(summary)
    if report.result != PASSED:
        lines.append(f"console log: {report.console_log}")
    return "\n".join(lines) + "\n"


_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 cannot carry most control characters (a console's escapes): show them."""
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def junit_xml(report: Report) -> str:
    failures = len(report.failed)
    skipped = sum(c.result == SKIPPED for c in report.checks)
    attrs = {"name": f"vztt boot test {report.name}", "tests": str(len(report.checks)),
             "failures": str(failures), "errors": "0", "skipped": str(skipped),
             "time": f"{report.seconds:.3f}"}
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(suites, "testsuite", {**attrs, "name": report.name, "timestamp": report.started,
                                                "hostname": socket.gethostname()})
    props = ET.SubElement(suite, "properties")
    for key in ("archive", "console_log", "boot_seconds", "ready_seconds"):
        value = getattr(report, key)
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", {"classname": f"vztt.boottest.{report.name}", "name": c.name,
                                                 "time": f"{c.seconds:.3f}"})
        if c.result == FAILED_RESULT:
            failure = ET.SubElement(case, "failure", {"message": _xml_text(c.detail), "type": "boot" if c.name == "boot" else "check"})
            failure.text = _xml_text(c.output[-OUTPUT_LIMIT:])
        elif c.result == SKIPPED:
            ET.SubElement(case, "skipped", {"message": "not run: " + (report.error or "an earlier step failed")})
        elif c.detail:
            ET.SubElement(case, "system-out").text = _xml_text(c.detail)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: Report, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(junit_xml(report))
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The build's gate: test the packed archive, promote only if it passes
# --------------------------------------------------------------------------

def manifest_record(report: Report) -> dict[str, Any]:
    """What the manifest keeps of a boot test."""
    d = {"result": report.result, "seconds": round(report.seconds, 2),
         "boot_seconds": None if report.boot_seconds is None else round(report.boot_seconds, 2),
         "ready_seconds": None if report.ready_seconds is None else round(report.ready_seconds, 2),
         "checks": [c.as_dict() for c in report.checks]}
    if report.error:
        d["error"] = {"kind": report.error_kind, "message": report.error}
        d["console_log"] = report.console_log
    return d


def failed_path(final: Path) -> Path:
    return final.with_name(final.name + FAILED)


def gate(recipe: Recipe, cache: TemplateCache, outputs: list[tuple[Path, Path]], manifest_path: Path,
         manifest: dict[str, Any], test: bool, progress: Progress) -> dict[str, Any]:
    """Boot-test the packed plain archive among `outputs` ((temporary, final)
    pairs) before promote. Passed or skipped: returns the manifest's
    `boot_test` record. Failed: every output is renamed to `<final>-failed`,
    the manifest (with the report) written as `<manifest>-failed`, nothing is
    promoted, and BootError or CheckFailed is raised."""
    if not test:
        remove_failed(cache, manifest_path)   # superseded by what is promoted now
        return {"result": SKIPPED}
    plain = cache.archive(recipe.name, "plain")
    tested = next((tmp for tmp, final in outputs if final == plain), None)
    if tested is None:
        # A ploop-only build: the runtime boots a root tree, and the ploop
        # image's ext4 is not unpacked here (yet).
        progress.say("  test       skipped: no plain archive to boot (build with --format all to test)")
        return {"result": SKIPPED, "reason": "no plain archive to boot"}
    with progress.step("test") as st:
        try:
            report = boot_test(recipe, cache, tested)
        except RuntimeUnavailable as e:
            e.message += " (`vztt build --no-test` builds without the boot test)"
            raise
        record = manifest_record(report)
        error = report.exception()
        if error is None:
            st.note(f"{len(report.checks)} checks passed, boot {report.boot_seconds:.2f} s, "
                    f"checks done {report.ready_seconds:.2f} s after start")
            remove_failed(cache, manifest_path)
            return record
        st.note("did not boot" if report.error_kind == "boot" else
                "FAILED: " + ", ".join(c.name for c in report.failed))
        progress.say(format_table(report).rstrip())
        remove_failed(cache, manifest_path)
        kept = []
        for tmp, final in outputs:
            if tmp.exists():
                os.replace(tmp, failed_path(final))
                kept.append(failed_path(final).name)
        doc = {**manifest, "boot_test": record, "failed_files": kept}
        failed_manifest = failed_path(manifest_path)
        failed_manifest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        error.message = (f"{error.message}; nothing promoted: kept as {failed_path(plain)} "
                         f"with its report in {failed_manifest}")
        raise error


def remove_failed(cache: TemplateCache, manifest_path: Path) -> None:
    """Drop the files an earlier failed boot test left (listed in its -failed manifest)."""
    failed_manifest = failed_path(manifest_path)
    try:
        doc = json.loads(failed_manifest.read_text())
    except (OSError, ValueError):
        return
    for name in doc.get("failed_files", []):
        if "/" not in name and name.endswith(FAILED):
            (cache.root / name).unlink(missing_ok=True)
    failed_manifest.unlink(missing_ok=True)


def report_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=1, sort_keys=True)


