"""The checks a boot test runs in a booted container (or VM), each giving
(ok, one-line detail, output): failed units, hostname, osrelease, loopback,
the network (the address, ping from inside, ssh from the host side), the
package database, the recipe's smoke checks. A check runs its commands
through the box's exec(), with CHECK_TIMEOUT for each."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
import time
from pathlib import Path
from typing import Callable

from vztt.base.errors import BootError
from vztt.base.inroot import stat_in_root
from vztt.base.proc import Popen, kill_tree, tool_env
from vztt.boot.report import FAILED_RESULT, PASSED, Check
from vztt.boot.runtime import OSRELEASE_SYSCTL, Container
from vztt.boot.runtime.hostnet import HostNet, wait_for
from vztt.netconfig import NetSettings

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


# The host kernel's filesystems mounted at a package's directory: their roots belong to
# the host's root, which a container's user namespace shows as nobody.
KERNEL_MOUNTS = ("/proc", "/sys")


def rpm_verify_problem(line: str) -> bool:
    """Whether a line of `rpm -Va` is a defect: anything about a file that is not a %config
    file (changed by a build's hooks and the boot, as meant to be) or a %ghost (made at run
    time), and every error or dependency problem rpm reports. Only the owner and group of
    /proc and /sys (KERNEL_MOUNTS) differing is not one."""
    m = _RPM_VERIFY_LINE.match(line)
    if m is None:
        return bool(line.strip()) and not line.startswith("rpm-exit=")
    if m["path"] in KERNEL_MOUNTS and set(m["flags"]) <= {".", "U", "G"}:
        return False
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


# -- the network (boot/network.py gives the template a link and the host side) ----------------

NETWORK_WAIT = 15.0              # seconds for an address to show, ping to answer, sshd to let us in
# ping from inside, a few tries: the first ARP (or neighbour discovery) may take a moment.
PING_SCRIPT = r"""
command -v ping >/dev/null || { echo "FAIL: ping is missing in the template (iputils-ping, iputils)"; exit 1; }
i=0
while [ $i -lt $2 ]; do
  ping -n -c 1 -W 1 "$1" && exit 0
  i=$((i + 1)); sleep 0.3
done
exit 1
"""


def check_network_address(box: Container, settings: NetSettings, slowdown: float = 1.0) -> Outcome:
    """The interface holds every address it was given (the distribution's own network
    configuration put them there at boot; some do it just after boot ends)."""
    wanted = [a.with_prefixlen for a in settings.addresses]
    deadline = time.monotonic() + NETWORK_WAIT * slowdown
    while True:
        status, out = box.exec(["ip", "-o", "addr", "show", "dev", settings.interface], timeout=CHECK_TIMEOUT)
        found = set(re.findall(r"\binet6? (\S+)", out)) if status == 0 else set()
        missing = [a for a in wanted if a not in found]
        if not missing:
            return True, f"{settings.interface} has {', '.join(wanted)}", out
        if time.monotonic() >= deadline:
            where = f"{settings.interface}: exit status {status}" if status else f"{settings.interface} lacks"
            return False, f"{where} {', '.join(missing)} after {NETWORK_WAIT * slowdown:g} s", out
        time.sleep(0.2)


def check_network_ping(box: Container, targets: list[str], slowdown: float = 1.0) -> Outcome:
    """Each of the host side's addresses answers ping from inside."""
    outputs, answered = [], []
    tries = str(max(3, int(NETWORK_WAIT * slowdown / 1.3)))
    for target in targets:
        status, out, took = _script_args(box, PING_SCRIPT, [target, tries])
        outputs.append(out)
        if status != 0:
            fails = [line[6:] for line in out.splitlines() if line.startswith("FAIL: ")]
            why = fails[0] if fails else (_status_problem(status, 0, took, CHECK_TIMEOUT) or "no answer")
            return False, f"ping {target}: {why}", "\n".join(outputs)
        rtt = re.search(r"time=([\d.]+ ms)", out)
        answered.append(target + (f" ({rtt.group(1)})" if rtt else ""))
    return True, "answers: " + ", ".join(answered), "\n".join(outputs)


def _script_args(box: Container, script: str, args: list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    status, out = box.exec(["/bin/sh", "-c", script, "sh", *args], timeout=CHECK_TIMEOUT)
    return status, out, time.monotonic() - started


def ssh_command(key: Path, target: str, known_hosts: Path, connect_timeout: int, argv: list[str]) -> list[str]:
    """ssh as root@target with only `key`, no configuration of the host's, no DNS, the host
    key recorded in `known_hosts` (for the check to compare with the container's)."""
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={connect_timeout}", "-o", "LogLevel=ERROR", f"root@{target}", "--", *argv]


class SshLogin:
    """`ssh -i <key> root@<target> uname -n` from the host side, started at once and
    judged later (check_network_ssh): it runs while the checks inside go on. Retried
    while sshd is not listening yet (refused, no route), up to NETWORK_WAIT. cancel()
    kills it (the boot test registers it for every way out)."""

    def __init__(self, link: HostNet, key: Path, target: str, slowdown: float = 1.0):
        self.link, self.target = link, target
        self.known_hosts = key.with_name("known_hosts")
        self.known_hosts.unlink(missing_ok=True)
        self.command = ssh_command(key, target, self.known_hosts, max(5, int(5 * slowdown)), ["uname", "-n"])
        self.env = tool_env(HOME=str(key.parent))            # nothing of the host's ~/.ssh
        self.wait = NETWORK_WAIT * slowdown
        self.started = time.monotonic()
        self.seconds = 0.0
        self._proc: Popen[bytes] | None = link.start(self.command, self.env)

    def result(self) -> tuple[int, str]:
        assert self._proc is not None
        status, out = wait_for(self._proc, self.wait)
        self._proc = None
        deadline = self.started + self.wait
        # sshd still starting: refused, or no route yet; anything else is an answer
        while (status == 255 and re.search(r"Connection refused|No route to host|timed out|reset by peer", out)
               and time.monotonic() < deadline):
            time.sleep(0.3)
            status, out = self.link.exec(self.command, timeout=self.wait, env=self.env)
        self.seconds = time.monotonic() - self.started
        return status, out

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            kill_tree(self._proc)


HOST_KEY_TYPES = ("rsa", "ecdsa", "ed25519", "dsa")


def shipped_host_keys(tree: Path) -> list[str]:
    """The SSH host keys a template ships (it must ship none: every container would share
    them). Read from the unpacked tree before boot, never through one of its links."""
    return [f"/etc/ssh/ssh_host_{t}_key" for t in HOST_KEY_TYPES
            if stat_in_root(tree, f"etc/ssh/ssh_host_{t}_key") is not None]


def check_network_ssh(box: Container, login: SshLogin, hostname: str, shipped: list[str]) -> Outcome:
    """From the host side: `ssh -i <throwaway key> root@<container> uname -n` printed the
    container's hostname, and the host key sshd showed is one the container made at first
    boot: it is in the container's /etc/ssh, and the template shipped none (`shipped`)."""
    status, out = login.result()
    shown = f"ssh root@{login.target} uname -n"
    if shipped:
        return False, f"the template ships SSH host keys ({', '.join(shipped)}): every container shares them", out
    if status != 0:
        lines = [line for line in out.strip().splitlines() if line.strip()]
        return False, f"{shown}: exit status {status}" + (f": {lines[-1]}" if lines else ""), out
    if out.strip() != hostname:
        return False, f"{shown} printed {out.strip()!r}, not the hostname {hostname!r}", out
    seen = _host_keys(login.known_hosts.read_text() if login.known_hosts.exists() else "")
    _, made = box.exec(["/bin/sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"], timeout=CHECK_TIMEOUT)
    ours = [k for k in _host_keys(made) if k in seen]
    if not ours:
        return False, f"{shown}: sshd showed a host key that is not in the container's /etc/ssh", out + made
    kind, blob = ours[0]
    fingerprint = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")
    return True, f"{shown}: {hostname}; host key {kind} SHA256:{fingerprint}, made at first boot", out


def _host_keys(text: str) -> list[tuple[str, str]]:
    """(type, base64 key) of each public key line of a known_hosts or .pub text."""
    keys = []
    for line in text.splitlines():
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word.startswith(("ssh-", "ecdsa-", "sk-")):
                keys.append((word, words[i + 1]))
                break
    return keys


def network_diagnostics(box: Container, ssh_unit: str, network_units: tuple[str, ...]) -> str:
    """What a failed network check's report keeps from inside: the journal of sshd and of
    what brings the network up, the routes, and `ip addr` (last: reports keep the end)."""
    units = " ".join(f"-u {u}" for u in (ssh_unit, *network_units))
    # --sync first: what sshd logged a moment ago may not be in the journal yet.
    script = (f"journalctl --sync 2>/dev/null; echo '## journalctl {units}'; "
              f"journalctl --no-pager -q -n 30 {units} 2>&1; "
              "echo '## ip route'; ip route 2>&1; ip -6 route 2>&1; echo '## ip addr'; ip addr 2>&1")
    try:
        _, out = box.exec(["/bin/sh", "-c", script], timeout=CHECK_TIMEOUT)
    except BootError as e:                   # the container went down meanwhile
        return f"(no diagnostics: {e})"
    return out
