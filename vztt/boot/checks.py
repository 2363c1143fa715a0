"""The checks a boot test runs in a booted container (or VM), each giving
(ok, one-line detail, output): failed units, hostname, osrelease, loopback,
the package database, the recipe's smoke checks. A check runs its commands
through the box's exec(), with CHECK_TIMEOUT for each."""

from __future__ import annotations

import fnmatch
import re
import time
from typing import Callable

from vztt.boot.report import FAILED_RESULT, PASSED, Check
from vztt.boot.runtime import OSRELEASE_SYSCTL, Container

CHECK_TIMEOUT = 60.0             # seconds per check command
TIMED_OUT = 124                  # the runtime's exec status at a timeout

Outcome = tuple[bool, str, str]       # (ok, detail, output)


def timed(check: Check, fn: Callable[[], Outcome]) -> Check:
    """Run one check, recording its result, detail, output and time in `check`."""
    started = time.monotonic()
    ok, check.detail, check.output = fn()
    check.seconds = time.monotonic() - started
    check.result = PASSED if ok else FAILED_RESULT
    return check


def _script(box: Container, script: str, timeout: float = CHECK_TIMEOUT) -> tuple[int, str, float]:
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
    status, out, _ = _script(box, "uname -n")
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
    status, out, took = _script(box, LOOPBACK_SCRIPT)
    fails = [line[6:] for line in out.splitlines() if line.startswith("FAIL: ")]
    if status == 0 and not fails:
        return True, "127.0.0.1 up, localhost resolves, TCP echo ok", out
    return False, fails[0] if fails else (_status_problem(status, 0, took, CHECK_TIMEOUT) or "failed"), out


def _dpkg_audit(box: Container) -> Outcome:
    status, out, took = _script(box, "dpkg --audit")
    if status != 0 or out.strip():
        problem = _status_problem(status, 0, took, CHECK_TIMEOUT)
        return False, "dpkg --audit: " + (problem or "reports packages in a bad state"), out
    return True, "dpkg --audit: clean", out


# One line of `rpm -V`: nine result flags (or "missing"), the file's attribute (c: %config,
# g: %ghost, d: %doc, l: %license, r: %readme), its path.
_RPM_VERIFY_LINE = re.compile(r"^(?P<flags>[SM5DLUGTP.?]{9}|missing) +(?:(?P<attr>[cdglr]) )?(?P<path>/.*)$")


def rpm_verify_problem(line: str) -> bool:
    """Whether a line of `rpm -Va` is a defect: anything about a file that is not a %config
    file (changed by a build's hooks and the boot, as meant to be) or a %ghost (made at run
    time), and every error or dependency problem rpm reports."""
    m = _RPM_VERIFY_LINE.match(line)
    if m is None:
        return bool(line.strip()) and not line.startswith("rpm-exit=")
    return m["attr"] not in ("c", "g")


def _rpm_verify(box: Container) -> Outcome:
    # Every file of every package against the database, owners, modes and digests included
    # (mtimes change when a build writes a file; --nomtime).
    status, out, took = _script(box, "rpm -Va --nomtime 2>&1; echo rpm-exit=$?")
    if "rpm-exit=" not in out:
        return False, "rpm -Va: " + (_status_problem(status, 0, took, CHECK_TIMEOUT) or "did not run"), out
    problems = [line for line in out.splitlines() if rpm_verify_problem(line)]
    if problems:
        return False, f"rpm -Va: {len(problems)} problems, the first: {problems[0].strip()}", out
    changed = sum(1 for line in out.splitlines() if _RPM_VERIFY_LINE.match(line))
    return True, "rpm -Va: clean" + (f" (besides {changed} changed %config or %ghost files)" if changed else ""), out


# Package database consistency, by recipe.family.
PACKAGE_DB_CHECKS: dict[str, Callable[[Container], Outcome]] = {
    "apt": _dpkg_audit,
    "dnf": _rpm_verify,
}


def check_package_db(box: Container, family: str) -> Outcome:
    fn = PACKAGE_DB_CHECKS.get(family)
    if fn is None:
        return False, f"no package database check for the {family} family (vztt.boot.checks.PACKAGE_DB_CHECKS)", ""
    return fn(box)


def check_osrelease(box: Container, expected: str) -> Outcome:
    """uname -r is the recipe's osrelease. A kernel without vztt's
    kernel.virt_osrelease (a host's, for containers) cannot show it: the
    runtime noted that on the console and went on; so does this check."""
    status, out, _ = _script(box, f"uname -r; test -e {OSRELEASE_SYSCTL} || echo no-virt-osrelease")
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
    status, out, took = _script(box, command)
    problems = []
    if p := _status_problem(status, exit_status, took, CHECK_TIMEOUT):
        problems.append(p)
    if output is not None and not re.search(output, out, re.MULTILINE):
        problems.append(f"output does not match /{output}/")
    if problems:
        return False, "; ".join(problems), out
    return True, f"exit status {status}" + (f", output matches /{output}/" if output is not None else ""), out
