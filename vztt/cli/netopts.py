"""The network and access options `vztt create`, `vztt run` and `vztt test` share
(--ip, --gateway, --nameserver, --search-domain, --ssh-key, --root-password-hash,
--interface). They are checked by vztt.netconfig before anything is unpacked:
a bad value is one line naming the option and the value, exit 2."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import click

from vztt.netconfig import RawSettings

F = TypeVar("F", bound=Callable[..., Any])

NETWORK_HELP = """\b
Network and access (written into the distribution's own files, no agent inside):
  Debian: ifupdown, /etc/network/interfaces.d/vztt
  Ubuntu: netplan, /etc/netplan/60-vztt.yaml (systemd-networkd)
  EL 9:   a NetworkManager keyfile, /etc/NetworkManager/system-connections/vztt-IFACE.nmconnection
  DNS:    /etc/resolv.conf (or systemd-resolved's, where the template uses its stub)
  --ssh-key: /root/.ssh/authorized_keys; --root-password-hash: root in /etc/shadow
A value that does not parse (an address, a prefix out of range, a gateway outside
every --ip subnet, a key file that is not an OpenSSH public key, a password that
is not a crypt(3) hash) is refused before anything is made: exit 2."""

_OPTIONS = [
    click.option("--ip", "net_ip", multiple=True, metavar="ADDR/PREFIX",
                 help="An address of the container's interface, IPv4 or IPv6 (repeatable), "
                      "e.g. --ip 192.0.2.10/24 --ip 2001:db8::10/64."),
    click.option("--gateway", "net_gateway", multiple=True, metavar="ADDR",
                 help="Default route: an address inside a subnet of --ip (one per IP version)."),
    click.option("--nameserver", "net_nameserver", multiple=True, metavar="ADDR", help="DNS server (repeatable)."),
    click.option("--search-domain", "net_search_domain", multiple=True, metavar="DOMAIN",
                 help="DNS search domain (repeatable)."),
    click.option("--ssh-key", "net_ssh_key", multiple=True, metavar="FILE",
                 help="An OpenSSH public key file (e.g. ~/.ssh/id_ed25519.pub) for root's authorized_keys "
                      "(repeatable)."),
    click.option("--root-password-hash", "net_root_password_hash", metavar="HASH",
                 help="root's password as a crypt(3) hash (`mkpasswd -m yescrypt`, `openssl passwd -6`); "
                      "never a clear password. Quote it: it holds '$'."),
    click.option("--interface", "net_interface", metavar="NAME",
                 help="The interface the files configure. [default: eth0, as vztt's runtime and Virtuozzo "
                      "name it; systemd-nspawn --network-veth calls it host0]"),
]


def network_options(fn: F) -> F:
    """Add the options; the command receives them as net_* keyword arguments."""
    for opt in reversed(_OPTIONS):
        fn = opt(fn)
    return fn


def raw_settings(kwargs: dict[str, Any]) -> RawSettings | None:
    """The net_* options (popped from kwargs) as RawSettings; None if none was given."""
    raw = RawSettings(ip=list(kwargs.pop("net_ip")), gateway=list(kwargs.pop("net_gateway")),
                      nameserver=list(kwargs.pop("net_nameserver")),
                      search_domain=list(kwargs.pop("net_search_domain")),
                      ssh_key=list(kwargs.pop("net_ssh_key")),
                      root_password_hash=kwargs.pop("net_root_password_hash"),
                      interface=kwargs.pop("net_interface"))
    given = (raw.ip or raw.gateway or raw.nameserver or raw.search_domain or raw.ssh_key
             or raw.root_password_hash is not None or raw.interface is not None)
    return raw if given else None
