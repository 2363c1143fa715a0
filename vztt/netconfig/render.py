"""The files each way of configuring a network reads, made from NetSettings.

Pure functions: settings (and what the tree already holds, through `Tree`) in,
files out. Writing them is netconfig.configure's job (through base/inroot.py).
Which distribution uses which renderer is the table in netconfig/__init__.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from .settings import NetSettings

MARK = "Written by vztt"


@dataclass(frozen=True)
class FileOut:
    """A file to put into the container's tree: path relative to its root."""

    path: str
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    private_dir: bool = False       # its directory must be 0700 (~/.ssh)
    link: str | None = None         # a symlink to this target instead of a file (data unused)


class Tree(Protocol):
    """What the renderers may read of the tree they write into (never following links)."""

    def read(self, rel: str) -> bytes | None: ...

    def link(self, rel: str) -> str | None: ...

    def exists(self, rel: str) -> bool: ...

    def owner(self, rel: str) -> tuple[int, int, int] | None: ...    # (mode, uid, gid)


def _text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# -- Debian: ifupdown ---------------------------------------------------------------------

IFUPDOWN_FILE = "etc/network/interfaces.d/vztt"
IFUPDOWN_MAIN = "etc/network/interfaces"
SOURCE_LINE = "source /etc/network/interfaces.d/*"
_SOURCES_DIR = re.compile(rb"^\s*source(-directory)?\s+/etc/network/interfaces\.d(/\*)?\s*$", re.M)


def ifupdown(s: NetSettings, tree: Tree) -> list[FileOut]:
    """An `iface` stanza per address in interfaces.d (ifupdown takes several per interface),
    the gateway on the first of its version; /etc/network/interfaces made to read interfaces.d."""
    lines = [f"# {MARK}: the container's network (ifupdown, interfaces(5)).", f"auto {s.interface}"]
    for version, method in ((4, "inet"), (6, "inet6")):
        gateway = s.gateway(version)
        for n, address in enumerate(s.of_version(version)):
            lines += ["", f"iface {s.interface} {method} static", f"\taddress {address.with_prefixlen}"]
            if n == 0 and gateway is not None:
                lines.append(f"\tgateway {gateway}")
    files = [FileOut(IFUPDOWN_FILE, _text(lines))]
    main = tree.read(IFUPDOWN_MAIN)
    if main is None:
        files.append(FileOut(IFUPDOWN_MAIN, _text(["auto lo", "iface lo inet loopback", "", SOURCE_LINE])))
    elif not _SOURCES_DIR.search(main):
        files.append(FileOut(IFUPDOWN_MAIN, main.rstrip(b"\n") + f"\n\n{SOURCE_LINE}\n".encode()))
    return files


# -- Ubuntu: netplan ----------------------------------------------------------------------

NETPLAN_FILE = "etc/netplan/60-vztt.yaml"


def netplan(s: NetSettings, tree: Tree) -> list[FileOut]:
    """A netplan(5) file for the interface (JSON-quoted scalars: valid YAML whatever the value).
    0600: netplan warns about (and newer versions refuse) files others can read."""
    q = json.dumps
    lines = [f"# {MARK}: the container's network (netplan).", "network:", "  version: 2", "  ethernets:",
             f"    {q(s.interface)}:", "      dhcp4: false", "      dhcp6: false", "      addresses:"]
    lines += [f"        - {q(a.with_prefixlen)}" for a in s.addresses]
    routes = [g for g in (s.gateway(4), s.gateway(6)) if g is not None]
    if routes:
        lines.append("      routes:")
        for g in routes:
            lines += [f"        - to: {q('default')}", f"          via: {q(str(g))}"]
    if s.has_dns:
        lines.append("      nameservers:")
        if s.nameservers:
            lines += ["        addresses:"] + [f"          - {q(str(n))}" for n in s.nameservers]
        if s.search_domains:
            lines += ["        search:"] + [f"          - {q(d)}" for d in s.search_domains]
    return [FileOut(NETPLAN_FILE, _text(lines), 0o600)]


# -- Enterprise Linux: NetworkManager ----------------------------------------------------

NM_DIR = "etc/NetworkManager/system-connections"


def nm_keyfile(s: NetSettings, tree: Tree) -> list[FileOut]:
    """A NetworkManager keyfile (nm-settings-keyfile(5)) bound to the interface. NetworkManager
    ignores keyfiles that are not root's and 0600. The uuid is derived from the interface name:
    the same settings give the same file."""
    name = f"vztt-{s.interface}"
    lines = [f"# {MARK}: the container's network (NetworkManager keyfile).", "[connection]", f"id={name}",
             f"uuid={uuid.uuid5(uuid.NAMESPACE_URL, 'vztt:netconfig:' + s.interface)}", "type=ethernet",
             f"interface-name={s.interface}", "autoconnect=true", "", "[ethernet]"]
    search_done = False
    for version in (4, 6):
        addresses = s.of_version(version)
        lines += ["", f"[ipv{version}]", f"method={'manual' if addresses else 'disabled'}"]
        lines += [f"address{n}={a.with_prefixlen}" for n, a in enumerate(addresses, 1)]
        if addresses and (gateway := s.gateway(version)) is not None:
            lines.append(f"gateway={gateway}")
        servers = [str(n) for n in s.nameservers if n.version == version]
        if addresses and servers:
            lines.append("dns=" + "".join(f"{n};" for n in servers))
        if addresses and s.search_domains and not search_done:
            lines.append("dns-search=" + "".join(f"{d};" for d in s.search_domains))
            search_done = True
    return [FileOut(f"{NM_DIR}/{name}.nmconnection", _text(lines), 0o600)]


# -- resolv.conf ---------------------------------------------------------------------------

RESOLV = "etc/resolv.conf"
RESOLVED_BINARIES = ("usr/lib/systemd/systemd-resolved", "lib/systemd/systemd-resolved")
RESOLVED_DROPIN = "etc/systemd/resolved.conf.d/60-vztt.conf"
RESOLVED_STUB = "../run/systemd/resolve/stub-resolv.conf"


def resolv_plain(s: NetSettings, tree: Tree) -> list[FileOut]:
    """A plain /etc/resolv.conf (a symlink there is replaced, not written through)."""
    lines = [f"# {MARK}: the container's DNS (resolv.conf(5))."]
    lines += [f"nameserver {n}" for n in s.nameservers]
    if s.search_domains:
        lines.append("search " + " ".join(s.search_domains))
    return [FileOut(RESOLV, _text(lines))]


def uses_resolved(tree: Tree) -> bool:
    """systemd-resolved is installed, and /etc/resolv.conf is missing or already points
    under /run/systemd/resolve (a regular file there is somebody's choice: kept to)."""
    if not any(tree.exists(p) for p in RESOLVED_BINARIES):
        return False
    target = tree.link(RESOLV)
    return (target is not None and "run/systemd/resolve/" in target) or not tree.exists(RESOLV)


def resolv_resolved(s: NetSettings, tree: Tree) -> list[FileOut]:
    """systemd-resolved's way where the tree has it (Ubuntu 22.04): /etc/resolv.conf is
    its stub, and the servers go through the network file (netplan's nameservers) or,
    without an address to hang them on, a resolved.conf drop-in. A tree without
    resolved (Ubuntu 24.04 minimal) gets the plain file."""
    if not uses_resolved(tree):
        return resolv_plain(s, tree)
    stub = [] if tree.link(RESOLV) is not None else [FileOut(RESOLV, b"", link=RESOLVED_STUB)]
    if s.has_network:
        return stub
    lines = [f"# {MARK}: the container's DNS (resolved.conf(5)).", "[Resolve]"]
    if s.nameservers:
        lines.append("DNS=" + " ".join(str(n) for n in s.nameservers))
    if s.search_domains:
        lines.append("Domains=" + " ".join(s.search_domains))
    return stub + [FileOut(RESOLVED_DROPIN, _text(lines))]


# -- root's access -----------------------------------------------------------------------

AUTHORIZED_KEYS = "root/.ssh/authorized_keys"
SHADOW = "etc/shadow"


class AccessProblem(Exception):
    """The tree cannot take the access settings (no root entry in /etc/shadow)."""


def authorized_keys(s: NetSettings, tree: Tree) -> list[FileOut]:
    """root's authorized_keys: the keys there already, then the new ones (no duplicates)."""
    old = (tree.read(AUTHORIZED_KEYS) or b"").decode(errors="replace").splitlines()
    lines = list(dict.fromkeys([*(line for line in old if line.strip()), *s.ssh_keys]))
    return [FileOut(AUTHORIZED_KEYS, _text(lines), 0o600, private_dir=True)]


def root_password(s: NetSettings, tree: Tree, now: float | None = None) -> list[FileOut]:
    """root's hash in /etc/shadow, its owner, group and mode kept (Debian: root:shadow 0640).
    The last-change day becomes today's (0 there would force a change at the first login)."""
    data = tree.read(SHADOW)
    owner = tree.owner(SHADOW)
    if data is None or owner is None:
        raise AccessProblem(f"/{SHADOW} is missing or not a regular file")
    lines = data.decode(errors="surrogateescape").splitlines()
    for n, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 3:
            fields[1] = s.root_password_hash or ""
            fields[2] = str(int((time.time() if now is None else now) // 86400))
            lines[n] = ":".join(fields)
            break
    else:
        raise AccessProblem(f"/{SHADOW} has no entry for root")
    mode, uid, gid = owner
    return [FileOut(SHADOW, ("\n".join(lines) + "\n").encode(errors="surrogateescape"), mode, uid, gid)]
