"""The host side of a booted container's (or VM's) network: a network
namespace of the caller's own, never the host's.

    with HostNet(scratch, ["192.0.2.1/24"]) as net:
        Container(..., link=net)         # a veth pair: `eth0` inside, `vztt-host` here
        VM(..., link=net)                # a tap device here, qemu's virtio-net inside
        status, out = net.exec(["ssh", ...], timeout=10)

The namespace is kept alive by an nsfs bind mount on SCRATCH/hostnet (what
`unshare --net=FILE` makes). Nothing in it is routed anywhere: its only
interfaces are lo and the link, so whatever the tests send stays between the
namespaces they made (addresses from 192.0.2.0/24, TEST-NET-1). Unmounting the
file ends the namespace, and with it the veth pair or the tap. In the private
mount namespace every vztt command boots in, a killed vztt takes the mount
(and so the namespace) with it; Container's teardown also unmounts everything
under its scratch directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from vztt.base.errors import RuntimeUnavailable
from vztt.base.proc import DEVNULL, PIPE, STDOUT, Popen, TimeoutExpired, kill_tree, run, spawn, tool_env
from . import _linux
from .accel import die_with_parent
from .host import require

HOST_IFACE = "vztt-host"      # the host side's end of the veth pair, or its tap device
TIMED_OUT = 124
SETUP_TIMEOUT = 30.0


class HostNet:
    """A network namespace for the host side of a link, with `addresses` on the link."""

    def __init__(self, where: str | os.PathLike, addresses: Sequence[str]):
        self.file = Path(where) / "hostnet"
        self.addresses = [ipaddress.ip_interface(a) for a in addresses]
        self.iface = HOST_IFACE
        self._open = False

    def __enter__(self) -> HostNet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> HostNet:
        self._nsenter = require("nsenter")
        unshare = require("unshare")
        require("ip", "iproute2")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.touch()
        self._open = True
        try:
            run([unshare, f"--net={self.file}", "true"], what="cannot make the host side's network namespace",
                error=RuntimeUnavailable, env=tool_env(), timeout=SETUP_TIMEOUT)
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """End the namespace (and the link with it). Idempotent."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(OSError):
            _linux.umount2(self.file, _linux.MNT_DETACH)
        with contextlib.suppress(OSError):
            self.file.unlink()

    # -- the link ----------------------------------------------------------------------

    def veth_into(self, pid: int, inside: str) -> None:
        """A veth pair: `inside` in the network namespace of process `pid` (a container's
        init before it runs), HOST_IFACE here, up, with our addresses."""
        self.ip("link", "add", self.iface, "type", "veth", "peer", "name", inside, "netns", str(pid))
        self._configure()

    def tap(self) -> str:
        """A persistent tap device here (qemu attaches to it by name from inside this
        namespace), up, with our addresses. Returns its name."""
        self.ip("tuntap", "add", "dev", self.iface, "mode", "tap")
        self._configure()
        return self.iface

    def _configure(self) -> None:
        for a in self.addresses:
            # nodad: an IPv6 address answers at once (duplicate detection would hold it
            # back a second or two, and nothing else is on this link).
            self.ip("addr", "add", a.with_prefixlen, "dev", self.iface, *(["nodad"] if a.version == 6 else []))
        self.ip("link", "set", self.iface, "up")

    def ip(self, *args: str) -> None:
        run(self.command(["ip", *args]), what=f"ip {' '.join(args)} (host side)", error=RuntimeUnavailable,
            env=tool_env(), timeout=SETUP_TIMEOUT)

    # -- running things on the host side -------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv, run in this namespace (and nothing else of the host changed)."""
        return [self._nsenter, f"--net={self.file}", "--", *argv]

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None) -> Popen[bytes]:
        """Start argv here, stdout and stderr into one pipe; the caller waits for it
        (wait_for) or kill_tree()s it on every way out, and it dies with us if we are killed."""
        return spawn(self.command(argv), what=f"{argv[0]} (host side)", error=RuntimeUnavailable,
                     env=env or tool_env(), stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, preexec_fn=die_with_parent)

    def exec(self, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run argv here; (exit status, stdout and stderr merged); 124 at the timeout."""
        return wait_for(self.start(argv, env), timeout)


def wait_for(proc: Popen[bytes], timeout: float) -> tuple[int, str]:
    """(exit status, output) of a process started by HostNet.start; killed, 124, at the timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode("utf-8", "replace")
    except TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        return TIMED_OUT, out.decode("utf-8", "replace")
    except BaseException:
        kill_tree(proc)
        raise
