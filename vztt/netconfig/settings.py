"""The network and access settings of a container, checked before anything is made.

Values come from the command line (`vztt create`, `run`, `test`: --ip, ...) or
from a recipe's defaults for its boot test (boot.ip, ...). Each bad value is
refused with one line naming where it came from (`--ip`, or `<recipe file>:
boot.ip`) and the value: the caller picks the error class (a BadUsage, exit
2, for the command line; a RecipeError, exit 3, for a recipe).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from vztt.base.errors import VzttError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_INTERFACE = "eth0"
MAX_KEY_FILE = 64 << 10
# A domain name (search domains): labels of letters, digits and '-', dots between.
DOMAIN_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
# A network interface name: at most IFNAMSIZ-1 bytes, no '/', no whitespace, not '.' or '..'.
INTERFACE_RE = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,15}")
# What ssh-keygen writes as the first word of a public key (the key's type).
SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
# crypt(3) hashes in their "$id$" forms (libxcrypt's crypt(5)); the old 13-character DES
# form is refused: it cannot be told apart from a short clear password pasted by mistake.
_B64 = "[./0-9A-Za-z]"
CRYPT_FORMS: dict[str, re.Pattern[str]] = {
    "yescrypt": re.compile(rf"\$y\${_B64}+\${_B64}{{1,86}}\${_B64}{{43}}"),
    "gost-yescrypt": re.compile(rf"\$gy\${_B64}+\${_B64}{{1,86}}\${_B64}{{43}}"),
    "scrypt": re.compile(rf"\$7\${_B64}{{11,97}}\${_B64}{{43}}"),
    "bcrypt": re.compile(rf"\$2[abxy]\$\d\d\${_B64}{{53}}"),
    "sha512crypt": re.compile(rf"\$6\$(rounds=\d{{1,9}}\$)?[^$:\s]{{1,16}}\${_B64}{{86}}"),
    "sha256crypt": re.compile(rf"\$5\$(rounds=\d{{1,9}}\$)?[^$:\s]{{1,16}}\${_B64}{{43}}"),
    "md5crypt": re.compile(rf"\$1\$[^$:\s]{{1,8}}\${_B64}{{22}}"),
}


@dataclass(frozen=True)
class NetSettings:
    """What a container is given: addresses on one interface, default routes, DNS, and root's access."""

    addresses: tuple[Interface, ...] = ()
    gateways: tuple[Address, ...] = ()            # at most one per IP version
    nameservers: tuple[Address, ...] = ()
    search_domains: tuple[str, ...] = ()
    ssh_keys: tuple[str, ...] = ()                # authorized_keys lines
    root_password_hash: str | None = None
    interface: str = DEFAULT_INTERFACE

    @property
    def has_network(self) -> bool:
        return bool(self.addresses)

    @property
    def has_dns(self) -> bool:
        return bool(self.nameservers or self.search_domains)

    @property
    def empty(self) -> bool:
        return not (self.addresses or self.has_dns or self.ssh_keys or self.root_password_hash)

    def of_version(self, version: int) -> list[Interface]:
        return [a for a in self.addresses if a.version == version]

    def gateway(self, version: int) -> Address | None:
        return next((g for g in self.gateways if g.version == version), None)

    def with_ssh_keys(self, lines: Iterable[str]) -> NetSettings:
        return replace(self, ssh_keys=tuple(dict.fromkeys([*self.ssh_keys, *lines])))

    def as_dict(self) -> dict[str, Any]:
        return {"interface": self.interface, "addresses": [a.with_prefixlen for a in self.addresses],
                "gateways": [str(g) for g in self.gateways], "nameservers": [str(n) for n in self.nameservers],
                "search_domains": list(self.search_domains), "ssh_keys": len(self.ssh_keys),
                "root_password_hash": self.root_password_hash is not None}


@dataclass
class RawSettings:
    """The values as given (strings), before checking; `ssh_key` holds file paths."""

    ip: list[str] = field(default_factory=list)
    gateway: list[str] = field(default_factory=list)
    nameserver: list[str] = field(default_factory=list)
    search_domain: list[str] = field(default_factory=list)
    ssh_key: list[str] = field(default_factory=list)
    root_password_hash: str | None = None
    interface: str | None = None


# The RawSettings fields a recipe may give its boot test, as boot.<field> (rows of recipe/settings.py).
RECIPE_FIELDS = ("ip", "gateway", "nameserver", "search_domain", "interface")

Labeler = Callable[[str], str]        # a RawSettings field name -> how the user named it (--ip, FILE: boot.ip)


def option_label(field_name: str) -> str:
    """The command-line option of a RawSettings field."""
    return "--" + field_name.replace("_", "-")


def check(raw: RawSettings, error: type[VzttError], label: Labeler = option_label) -> NetSettings:
    """NetSettings from the values as given; `error` (one line: where, value, what is wrong) otherwise."""

    def bad(name: str, value: str, why: str) -> VzttError:
        return error(f"{label(name)} {value!r}: {why}")

    addresses = []
    for text in raw.ip:
        a = parse_interface(text, lambda why, t=text: bad("ip", t, why))
        if any(a.ip == b.ip for b in addresses):
            raise bad("ip", text, "given twice")
        addresses.append(a)
    gateways: list[Address] = []
    for text in raw.gateway:
        g = parse_address(text, lambda why, t=text: bad("gateway", t, why))
        same = [a for a in addresses if a.version == g.version]
        if not same:
            raise bad("gateway", text, f"no IPv{g.version} address is given with {label('ip')} for it to be reached through")
        if any(g == a.ip for a in same):
            raise bad("gateway", text, "is the container's own address")
        if not (g.version == 6 and g.is_link_local) and not any(g in a.network for a in same):
            nets = ", ".join(str(a.network) for a in same)
            raise bad("gateway", text, f"outside every subnet given with {label('ip')} ({nets})")
        if any(o.version == g.version for o in gateways):
            raise bad("gateway", text, f"a second IPv{g.version} gateway (one default route per IP version)")
        gateways.append(g)
    nameservers = []
    for text in raw.nameserver:
        nameservers.append(parse_address(text, lambda why, t=text: bad("nameserver", t, why)))
    for text in raw.search_domain:
        if not DOMAIN_RE.fullmatch(text):
            raise bad("search_domain", text, "not a domain name (letters, digits, '-', dots between labels)")
    keys: list[str] = []
    for path in raw.ssh_key:
        keys += read_ssh_keys(Path(path), lambda why, p=path: bad("ssh_key", p, why))
    password = raw.root_password_hash
    if password is not None:
        check_crypt_hash(password, lambda why: bad("root_password_hash", _masked(password), why))
    interface = raw.interface or DEFAULT_INTERFACE
    if not INTERFACE_RE.fullmatch(interface):
        raise bad("interface", interface, "not an interface name (1 to 15 letters, digits and _ . : -)")
    return NetSettings(addresses=tuple(addresses), gateways=tuple(gateways), nameservers=tuple(nameservers),
                       search_domains=tuple(dict.fromkeys(raw.search_domain)), ssh_keys=tuple(dict.fromkeys(keys)),
                       root_password_hash=password, interface=interface)


def parse_interface(text: str, bad: Callable[[str], VzttError]) -> Interface:
    """ADDR/PREFIX, IPv4 or IPv6, a usable host address of its subnet."""
    addr_text, slash, prefix_text = text.strip().partition("/")
    if not slash:
        raise bad("needs a prefix length: ADDR/PREFIX (e.g. 192.0.2.10/24, 2001:db8::10/64)")
    addr = parse_address(addr_text, bad)
    limit = addr.max_prefixlen
    if not prefix_text.isdigit() or not 0 <= int(prefix_text) <= limit:
        raise bad(f"prefix length {prefix_text!r} is out of range for IPv{addr.version} (0 to {limit})")
    iface = ipaddress.ip_interface(f"{addr}/{int(prefix_text)}")
    net = iface.network
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or (addr.version == 6 and addr.is_link_local):
        raise bad("not an address a container's interface can take (multicast, unspecified, loopback or link-local)")
    if addr.version == 4 and net.prefixlen <= 30 and addr in (net.network_address, net.broadcast_address):
        raise bad(f"is the {'network' if addr == net.network_address else 'broadcast'} address of {net}, not a host's")
    return iface


def parse_address(text: str, bad: Callable[[str], VzttError]) -> Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise bad("not an IPv4 or IPv6 address") from None


def read_ssh_keys(path: Path, bad: Callable[[str], VzttError]) -> list[str]:
    """The public keys of an OpenSSH public key file (one or more lines `TYPE BASE64 [COMMENT]`)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise bad(f"cannot read it: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise bad(f"larger than {MAX_KEY_FILE >> 10} KiB: not an OpenSSH public key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise bad("not an OpenSSH public key (not text)") from None
    if "PRIVATE KEY" in text:
        raise bad("is a private key: give the public one (the .pub file)")
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if problem := ssh_key_problem(line):
            raise bad(f"line {number} is not an OpenSSH public key: {problem}")
        keys.append(line)
    if not keys:
        raise bad("holds no public key")
    return keys


def ssh_key_problem(line: str) -> str | None:
    """Why `line` is not `TYPE BASE64 [COMMENT]` with a key blob of that type; None if it is."""
    words = line.split(None, 2)
    if len(words) < 2:
        return "expected TYPE BASE64 [COMMENT]"
    kind, blob_text = words[0], words[1]
    if kind not in SSH_KEY_TYPES:
        return f"unknown key type {kind[:40]!r}"
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        return "the key is not base64"
    # The blob starts with its own type as an SSH string (uint32 length, bytes).
    if len(blob) < 4:
        return "the key is truncated"
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4:4 + length] != kind.encode():
        return f"the key's data is not a {kind} key"
    return None


def check_crypt_hash(value: str, bad: Callable[[str], VzttError]) -> str:
    if any(form.fullmatch(value) for form in CRYPT_FORMS.values()):
        return value
    raise bad("not a crypt(3) hash (e.g. `mkpasswd -m yescrypt` or `openssl passwd -6`: "
              "$y$..., $6$..., $5$..., $2b$..., $1$...); a clear password is never taken")


def _masked(value: str) -> str:
    """A refused password hash is shown only by its start: it may be a clear password."""
    return value[:3] + "..." if len(value) > 3 else "..."
