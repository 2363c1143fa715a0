"""A container's identity: its hostname (/etc/hostname, the 127.0.1.1 line of
/etc/hosts) and an empty machine-id (systemd makes one at first boot), written
without following any symlink of the tree (base/inroot.py)."""

from __future__ import annotations

import re
from pathlib import Path

from vztt.base.errors import BadUsage
from vztt.base.inroot import read_in_root, remove_in_root, write_in_root

HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def validate_hostname(hostname: str | None) -> None:
    if hostname is not None and not HOSTNAME_RE.fullmatch(hostname):
        raise BadUsage(f"--hostname {hostname!r}: not a valid host name (letters, digits, '-', dots between labels)")


def personalize(root: Path, hostname: str | None) -> None:
    """Empty machine-id (first boot makes one), the host name; never through a symlink of the tree."""
    write_in_root(root, "etc/machine-id", b"", 0o444)
    data = read_in_root(root, "var/lib/dbus/machine-id")
    if data is not None:                       # a real file (a symlink to /etc/machine-id is fine)
        remove_in_root(root, "var/lib/dbus/machine-id")
    if hostname:
        write_in_root(root, "etc/hostname", f"{hostname}\n".encode())
        hosts = read_in_root(root, "etc/hosts")
        if hosts is not None:
            short = hostname.split(".")[0]
            line = f"127.0.1.1\t{hostname}" + (f" {short}" if short != hostname else "")
            lines = [l for l in hosts.decode(errors="replace").splitlines() if not l.startswith("127.0.1.1")]
            write_in_root(root, "etc/hosts", ("\n".join(lines + [line]) + "\n").encode())
