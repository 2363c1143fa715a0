"""Containers on the network (issue #17): `vztt create --ip ... --ssh-key ...`
writes each distribution's own network files (vztt/netconfig), and the boot
test's network rows (address, ping from inside, ssh from a namespace of the
test's own) pass.

No root, no network: every bad value refused, the files each family gets.
Root: `vztt create` through the real command line (a small template for the
refusals and the EL family's files; the session's real debian-12 for the
rest), then the created container booted with vztt's runtime and reached
with ssh from a network namespace the test made; `vztt test` and `vztt run`
with the same options; a template whose sshd refuses root keeps its
diagnostics in the report.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import lz4.frame
import pytest
import yaml

from conftest import BuiltTemplate, leftovers, one_line_error, run_vztt
from mirrorkit import Member, install_template, small_tree, tar_bytes, temp_files
from vztt import netconfig
from vztt.base.errors import RecipeError, BadUsage
from vztt.boot.runtime import Container
from vztt.boot.runtime.hostnet import HostNet
from vztt.netconfig import RawSettings, render

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
EXIT_USAGE, EXIT_RECIPE, EXIT_ARCHIVE = 2, 3, 6
TINY = "tiny-1-x86_64"
EL = "tiny-el-9-x86_64"
# sha512crypt of "vztt" (openssl passwd -6 -salt vzttsalt vztt)
HASH = "$6$vzttsalt$VfXQ5VzOLjG/oE/1yEQx2fURS44pjdEq44tt8TmRbEMZkD1GG8Yc6XFdRdaBzRyaUkPfCndADWp2HZzMy3fV/."


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real OpenSSH key pair (ssh-keygen); the path of the private key."""
    d = tmp_path_factory.mktemp("key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@vztt", "-f", str(d / "id")], check=True)
    return d / "id"


def pub(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


# -- settings: what is accepted, what is refused (no root) --------------------------------

def test_good_settings(key: Path) -> None:
    s = netconfig.check(RawSettings(ip=["192.0.2.10/24", "2001:db8::10/64"], gateway=["192.0.2.1", "fe80::1"],
                                    nameserver=["192.0.2.53", "2001:db8::53"], search_domain=["example.test"],
                                    ssh_key=[str(pub(key))], root_password_hash=HASH), BadUsage)
    assert [a.with_prefixlen for a in s.addresses] == ["192.0.2.10/24", "2001:db8::10/64"]
    assert str(s.gateway(4)) == "192.0.2.1" and str(s.gateway(6)) == "fe80::1"   # link-local: on the link
    assert s.ssh_keys == (pub(key).read_text().strip(),) and s.interface == "eth0"
    for good in ("$y$j9T$abcdefghijklmnopqrstu.$" + "A" * 43, "$2b$10$" + "a" * 53, "$5$salt$" + "b" * 43,
                 "$1$salt$" + "c" * 22):
        netconfig.check(RawSettings(root_password_hash=good), BadUsage)


BAD = [
    (["--ip", "192.0.2.300/24"], "--ip '192.0.2.300/24': not an IPv4 or IPv6 address"),
    (["--ip", "192.0.2.10"], "--ip '192.0.2.10': needs a prefix length"),
    (["--ip", "192.0.2.10/33"], "--ip '192.0.2.10/33': prefix length '33' is out of range for IPv4 (0 to 32)"),
    (["--ip", "2001:db8::10/129"], "prefix length '129' is out of range for IPv6 (0 to 128)"),
    (["--ip", "192.0.2.0/24"], "--ip '192.0.2.0/24': is the network address of 192.0.2.0/24"),
    (["--ip", "192.0.2.10/24", "--ip", "192.0.2.10/25"], "given twice"),
    (["--ip", "192.0.2.10/24", "--gateway", "198.51.100.1"],
     "--gateway '198.51.100.1': outside every subnet given with --ip (192.0.2.0/24)"),
    (["--ip", "192.0.2.10/24", "--gateway", "192.0.2.10"], "is the container's own address"),
    (["--gateway", "192.0.2.1"], "--gateway '192.0.2.1': no IPv4 address is given with --ip"),
    (["--ip", "192.0.2.10/24", "--gateway", "192.0.2.1", "--gateway", "192.0.2.2"], "a second IPv4 gateway"),
    (["--nameserver", "dns.example"], "--nameserver 'dns.example': not an IPv4 or IPv6 address"),
    (["--search-domain", "bad_domain!"], "--search-domain 'bad_domain!': not a domain name"),
    (["--root-password-hash", "hunter2"], "--root-password-hash 'hun...': not a crypt(3) hash"),
    (["--root-password-hash", "abcdefghijklm"], "not a crypt(3) hash"),            # DES: refused
    (["--root-password-hash", "$6$salt$short"], "not a crypt(3) hash"),
    (["--interface", "eth0/x"], "--interface 'eth0/x': not an interface name"),
]


def _raw(args: list[str]) -> RawSettings:
    raw = RawSettings()
    for option, value in zip(args[::2], args[1::2]):
        name = option[2:].replace("-", "_")
        if isinstance(getattr(raw, name), list):
            getattr(raw, name).append(value)
        else:
            setattr(raw, name, value)
    return raw


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(BadUsage) as e:
        netconfig.check(_raw(args), BadUsage)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_key_files(key: Path, tmp_path: Path) -> None:
    good = pub(key).read_text().split()
    cases = {
        "private": (key.read_bytes(), "is a private key: give the public one"),
        "garbage": (b"hello world\n", "line 1 is not an OpenSSH public key: unknown key type 'hello'"),
        "base64": (b"ssh-ed25519 !!notbase64!! x\n", "the key is not base64"),
        "mismatch": (f"ssh-rsa {good[1]} x\n".encode(), "the key's data is not a ssh-rsa key"),
        "empty": (b"# nothing\n\n", "holds no public key"),
        "binary": (b"\xff\xfe\x00", "not text"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadUsage, match=re.escape(f"--ssh-key '{path}': ") + ".*" + re.escape(message)):
            netconfig.check(RawSettings(ssh_key=[str(path)]), BadUsage)
    with pytest.raises(BadUsage, match="cannot read it: No such file"):
        netconfig.check(RawSettings(ssh_key=[str(tmp_path / "missing.pub")]), BadUsage)


def test_a_recipe_value_is_blamed_on_the_recipe(tmp_path: Path) -> None:
    from conftest import RECIPES
    from vztt.recipe.recipe import RecipeStore
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    leaf = recipes / "leaf.toml"
    leaf.write_text('extends = "debian-12-x86_64-minimal"\n[boot]\nip = ["192.0.2.2/24"]\ngateway = ["10.0.0.1"]\n')
    with pytest.raises(RecipeError, match=re.escape(f"{leaf}: boot.gateway '10.0.0.1': outside every subnet")):
        RecipeStore(recipes).load("leaf")
    r = run_vztt("show", "leaf", recipes=recipes)
    assert r.returncode == EXIT_RECIPE and "boot.gateway" in one_line_error(r)


# -- the files each family gets (no root) --------------------------------------------------

class DictTree:
    """render.Tree over a dict: path -> bytes, or ("link", target)."""

    def __init__(self, files: dict[str, object]):
        self.files = files

    def read(self, rel: str) -> bytes | None:
        v = self.files.get(rel)
        return v if isinstance(v, bytes) else None

    def link(self, rel: str) -> str | None:
        v = self.files.get(rel)
        return v[1] if isinstance(v, tuple) else None

    def exists(self, rel: str) -> bool:
        return rel in self.files

    def owner(self, rel: str) -> tuple[int, int, int] | None:
        return (0o640, 0, 42) if isinstance(self.files.get(rel), bytes) else None


SETTINGS = RawSettings(ip=["192.0.2.10/24", "2001:db8::10/64", "192.0.2.11/24"], gateway=["192.0.2.1", "2001:db8::1"],
                       nameserver=["192.0.2.53", "2001:db8::53"], search_domain=["example.test", "corp.test"])


def _plan(distro: str, tree: dict[str, object], raw: RawSettings = SETTINGS) -> dict[str, render.FileOut]:
    files = netconfig.plan(DictTree(tree), distro, netconfig.check(raw, BadUsage))
    return {f.path: f for f in files}


def test_every_distro_has_a_row() -> None:
    from vztt.recipe.settings import DISTROS
    assert sorted(netconfig.FAMILIES) == sorted(DISTROS)
    with pytest.raises(RecipeError, match="does not know how 'gentoo' configures its network"):
        netconfig.family_for("gentoo")


def test_debian_ifupdown() -> None:
    files = _plan("debian", {"etc/network/interfaces": b"auto lo\niface lo inet loopback\n"})
    assert set(files) == {"etc/network/interfaces.d/vztt", "etc/network/interfaces", "etc/resolv.conf"}
    stanzas = files["etc/network/interfaces.d/vztt"].data.decode()
    assert stanzas.splitlines()[1:] == [
        "auto eth0", "", "iface eth0 inet static", "\taddress 192.0.2.10/24", "\tgateway 192.0.2.1",
        "", "iface eth0 inet static", "\taddress 192.0.2.11/24",
        "", "iface eth0 inet6 static", "\taddress 2001:db8::10/64", "\tgateway 2001:db8::1"]
    assert files["etc/network/interfaces"].data.endswith(b"\nsource /etc/network/interfaces.d/*\n")
    assert files["etc/resolv.conf"].data.decode().splitlines()[1:] == [
        "nameserver 192.0.2.53", "nameserver 2001:db8::53", "search example.test corp.test"]
    # A main file that reads interfaces.d already (the shipped recipes' since this issue) is left alone.
    files = _plan("debian", {"etc/network/interfaces": b"auto lo\nsource /etc/network/interfaces.d/*\n"})
    assert "etc/network/interfaces" not in files


def test_ubuntu_netplan_and_resolved() -> None:
    stub = ("link", "../run/systemd/resolve/stub-resolv.conf")
    files = _plan("ubuntu", {"etc/resolv.conf": stub, "usr/lib/systemd/systemd-resolved": b""})
    assert set(files) == {"etc/netplan/60-vztt.yaml"}           # DNS goes to resolved through netplan
    f = files["etc/netplan/60-vztt.yaml"]
    assert f.mode == 0o600
    assert yaml.safe_load(f.data) == {"network": {"version": 2, "ethernets": {"eth0": {
        "dhcp4": False, "dhcp6": False, "addresses": ["192.0.2.10/24", "2001:db8::10/64", "192.0.2.11/24"],
        "routes": [{"to": "default", "via": "192.0.2.1"}, {"to": "default", "via": "2001:db8::1"}],
        "nameservers": {"addresses": ["192.0.2.53", "2001:db8::53"], "search": ["example.test", "corp.test"]}}}}}
    # DNS without an address: a resolved drop-in; without resolved: a plain resolv.conf.
    dns = RawSettings(nameserver=["192.0.2.53"])
    files = _plan("ubuntu", {"etc/resolv.conf": stub, "usr/lib/systemd/systemd-resolved": b""}, dns)
    assert list(files) == ["etc/systemd/resolved.conf.d/60-vztt.conf"]
    assert files["etc/systemd/resolved.conf.d/60-vztt.conf"].data.decode().splitlines()[1:] == ["[Resolve]", "DNS=192.0.2.53"]
    files = _plan("ubuntu", {"etc/resolv.conf": stub}, dns)        # the symlink, but no resolved installed
    assert list(files) == ["etc/resolv.conf"] and files["etc/resolv.conf"].link is None
    # resolved installed, no resolv.conf (Ubuntu 22.04's template): the stub; a file of its own is kept to.
    files = _plan("ubuntu", {"usr/lib/systemd/systemd-resolved": b""})
    assert files["etc/resolv.conf"].link == "../run/systemd/resolve/stub-resolv.conf"
    assert set(files) == {"etc/netplan/60-vztt.yaml", "etc/resolv.conf"}
    files = _plan("ubuntu", {"usr/lib/systemd/systemd-resolved": b"", "etc/resolv.conf": b"nameserver 10.0.0.1\n"})
    assert files["etc/resolv.conf"].link is None and b"nameserver 192.0.2.53" in files["etc/resolv.conf"].data


def test_el_networkmanager_keyfile() -> None:
    files = _plan("rockylinux", {})
    f = files["etc/NetworkManager/system-connections/vztt-eth0.nmconnection"]
    assert f.mode == 0o600 and (f.uid, f.gid) == (0, 0)
    keyfile = configparser.ConfigParser(interpolation=None)
    keyfile.read_string(f.data.decode())
    assert dict(keyfile["connection"]) == {"id": "vztt-eth0", "uuid": "2eea91d4-8de5-5431-b35a-9c522043e11a",
                                           "type": "ethernet", "interface-name": "eth0", "autoconnect": "true"}
    assert dict(keyfile["ipv4"]) == {"method": "manual", "address1": "192.0.2.10/24", "address2": "192.0.2.11/24",
                                     "gateway": "192.0.2.1", "dns": "192.0.2.53;", "dns-search": "example.test;corp.test;"}
    assert dict(keyfile["ipv6"]) == {"method": "manual", "address1": "2001:db8::10/64", "gateway": "2001:db8::1",
                                     "dns": "2001:db8::53;"}
    assert "etc/resolv.conf" in files
    only4 = _plan("almalinux", {}, RawSettings(ip=["192.0.2.10/24"]))
    keyfile = configparser.ConfigParser(interpolation=None)
    keyfile.read_string(only4["etc/NetworkManager/system-connections/vztt-eth0.nmconnection"].data.decode())
    assert keyfile["ipv6"]["method"] == "disabled" and "gateway" not in keyfile["ipv4"]


def test_root_access_files(key: Path) -> None:
    shadow = b"root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    raw = RawSettings(ssh_key=[str(pub(key))], root_password_hash=HASH)
    files = _plan("debian", {"etc/shadow": shadow, "root/.ssh/authorized_keys": b"ssh-ed25519 AAAAold old@host\n"}, raw)
    keys = files["root/.ssh/authorized_keys"]
    assert keys.mode == 0o600 and keys.private_dir
    assert keys.data.decode().splitlines() == ["ssh-ed25519 AAAAold old@host", pub(key).read_text().strip()]
    s = files["etc/shadow"]
    assert (s.mode, s.uid, s.gid) == (0o640, 0, 42)                 # root:shadow 0640 kept
    root, daemon = s.data.decode().splitlines()
    assert root.split(":")[:2] == ["root", HASH] and int(root.split(":")[2]) == int(time.time() // 86400)
    assert daemon == "daemon:*:19000:0:99999:7:::"
    with pytest.raises(netconfig.ConfigureError, match="no entry for root"):
        _plan("debian", {"etc/shadow": b"daemon:*:1:0:99999:7:::\n"}, RawSettings(root_password_hash=HASH))


# -- vztt create through the command line: refusals, the EL family's files (root) ----------

def _el_tree(victim: Path) -> list[Member]:
    """Enough of an EL 9 root for create: /etc/shadow (mode 0), /root (0550), NetworkManager's directory."""
    return [Member("./", tarfile.DIRTYPE), Member("etc", tarfile.DIRTYPE),
            Member("etc/hosts", data=b"127.0.0.1 localhost\n"), Member("etc/machine-id", data=b"", mode=0o444),
            Member("etc/os-release", data=b'ID="rocky"\nVERSION_ID="9.5"\n'),
            Member("etc/shadow", data=b"root:!!:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n", mode=0),
            Member("etc/NetworkManager", tarfile.DIRTYPE), Member("etc/NetworkManager/system-connections", tarfile.DIRTYPE),
            Member("etc/resolv.conf", tarfile.SYMTYPE, link=str(victim)),      # absolute: a trap
            Member("root", tarfile.DIRTYPE)]


def _install(cache: Path, name: str, members: list[Member], distro: str) -> None:
    raw = tar_bytes(members)
    install_template(cache, name, lz4.frame.compress(raw), tar_size=len(raw))
    manifest = cache / f"{name}.manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "distro": distro}))


@pytest.fixture
def small_cache(tmp_path: Path) -> Path:
    from mirrorkit import tiny_template
    cache = tmp_path / "cache"
    tiny_template(cache)
    _install(cache, EL, _el_tree(tmp_path / "victim-resolv.conf"), "rockylinux")
    return cache


def _nothing_made(dest: Path, cache: Path) -> None:
    assert not dest.exists() and temp_files(dest.parent) == [] and leftovers(cache) == []


@ROOT
@pytest.mark.parametrize("args,message", [BAD[0], BAD[2], BAD[6], BAD[12]], ids=["address", "prefix", "gateway", "hash"])
def test_create_refuses_bad_values_before_anything_is_made(small_cache: Path, tmp_path: Path, args: list[str],
                                                           message: str) -> None:
    dest = tmp_path / "ct"
    r = run_vztt("create", TINY, dest, "--layout", "dir", "--offline", *args, cache=small_cache)
    assert r.returncode == EXIT_USAGE, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: usage error: ") and message in line, line
    _nothing_made(dest, small_cache)


@ROOT
def test_create_refuses_a_key_that_is_not_public_and_an_unknown_distro(small_cache: Path, key: Path,
                                                                     tmp_path: Path) -> None:
    dest = tmp_path / "ct"
    r = run_vztt("create", TINY, dest, "--layout", "dir", "--offline", "--ssh-key", key, cache=small_cache)
    assert r.returncode == EXIT_USAGE and f"--ssh-key '{key}': is a private key" in one_line_error(r)
    _nothing_made(dest, small_cache)
    _install(small_cache, "tiny-gentoo", small_tree(), "gentoo")
    r = run_vztt("create", "tiny-gentoo", dest, "--layout", "dir", "--offline", "--ip", "192.0.2.10/24",
                 cache=small_cache)
    assert r.returncode == EXIT_RECIPE and "does not know how 'gentoo' configures its network" in one_line_error(r)
    _nothing_made(dest, small_cache)


@ROOT
def test_create_writes_the_el_family_files(small_cache: Path, key: Path, tmp_path: Path) -> None:
    dest, victim = tmp_path / "ct", tmp_path / "victim-resolv.conf"
    assert not victim.exists()
    r = run_vztt("create", EL, dest, "--layout", "dir", "--offline", "--hostname", "el1", "--ip", "192.0.2.20/24",
                 "--gateway", "192.0.2.1", "--nameserver", "192.0.2.53", "--ssh-key", pub(key),
                 "--root-password-hash", HASH, "--json", cache=small_cache)
    assert r.returncode == 0, r.stderr
    doc = r.json()
    keyfile = "/etc/NetworkManager/system-connections/vztt-eth0.nmconnection"
    assert doc["configured"] == [keyfile, "/etc/resolv.conf", "/root/.ssh/authorized_keys", "/etc/shadow"]
    assert doc["network"]["addresses"] == ["192.0.2.20/24"] and doc["network"]["ssh_keys"] == 1
    nm = dest / keyfile.lstrip("/")
    st = nm.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)   # NetworkManager's rule
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(nm.read_text())
    assert parsed["ipv4"]["address1"] == "192.0.2.20/24" and parsed["ipv4"]["gateway"] == "192.0.2.1"
    # The template's resolv.conf was an absolute symlink: replaced, never written through.
    resolv = dest / "etc/resolv.conf"
    assert not resolv.is_symlink() and "nameserver 192.0.2.53" in resolv.read_text() and not victim.exists()
    ssh_dir = dest / "root/.ssh"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert (ssh_dir / "authorized_keys").read_text() == pub(key).read_text()
    shadow = dest / "etc/shadow"
    assert stat.S_IMODE(shadow.stat().st_mode) == 0                 # EL's mode kept
    assert shadow.read_text().splitlines()[0].startswith(f"root:{HASH}:")
    assert (dest / "etc/hostname").read_text() == "el1\n"


@ROOT
def test_create_never_writes_through_a_link_of_the_template(small_cache: Path, key: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = small_tree() + [Member("root", tarfile.SYMTYPE, link=str(outside))]
    _install(small_cache, "tiny-evil", evil, "debian")
    dest = tmp_path / "ct"
    r = run_vztt("create", "tiny-evil", dest, "--layout", "dir", "--offline", "--ssh-key", pub(key), cache=small_cache)
    assert r.returncode == 0, r.stderr
    # /root -> <outside> resolves inside the tree, as the container sees it (base/inroot.py: RESOLVE_IN_ROOT)
    assert list(outside.iterdir()) == []
    inside = dest / str(outside).lstrip("/") / ".ssh"
    assert (inside / "authorized_keys").read_text() == pub(key).read_text()
    assert stat.S_IMODE(inside.stat().st_mode) == 0o700 and not inside.is_symlink()


# -- the real template: create, boot, ssh in (root, network) ------------------------------

def _ssh(net: HostNet, key: Path, address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """ssh from the host side's namespace, as a user would (no vztt code in the loop)."""
    cmd = ["nsenter", f"--net={net.file}", "ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
           "-o", "LogLevel=ERROR", f"root@{address}", *argv]
    deadline = time.monotonic() + 20
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 255 or "refused" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(0.3)


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_created_container_answers_ssh_with_the_key(debian12: BuiltTemplate, key: Path, tmp_path: Path) -> None:
    """The issue's own example: create with --ip, --gateway, --ssh-key; boot the created
    directory; ssh root@192.0.2.10 with that key from a network namespace of the test's."""
    dest = tmp_path / "srv" / "ct" / "1"
    r = run_vztt("create", debian12.name, dest, "--layout", "dir", "--offline", "--hostname", "ct1",
                 "--ip", "192.0.2.10/24", "--ip", "2001:db8::10/64", "--gateway", "192.0.2.1",
                 "--ssh-key", pub(key), cache=debian12.cache)
    assert r.returncode == 0, r.stderr
    assert "address 192.0.2.10/24" in (dest / "etc/network/interfaces.d/vztt").read_text()
    with HostNet(tmp_path / "hostside", ["192.0.2.1/24", "2001:db8::1/64"]) as net:
        with Container(dest, tmp_path / "state", name="vztt-net-test", hostname="ct1", overlay=True,
                       console_log=tmp_path / "console.log", link=net) as box:
            state, failed = box.wait_running(timeout=60)
            assert state == "running" and not failed, (state, failed)
            for address in ("192.0.2.10", "2001:db8::10"):
                proc = _ssh(net, key, address, "uname", "-n")
                assert (proc.returncode, proc.stdout) == (0, "ct1\n"), proc.stderr
            status, route = box.exec(["ip", "route", "show", "default"])
            assert route.startswith("default via 192.0.2.1 dev eth0"), route
            assert box.poweroff(timeout=30)
    assert not (tmp_path / "hostside" / "hostnet").exists()
    assert not list((tmp_path / "state").iterdir())


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_boot_test_and_run_take_the_same_options(debian12: BuiltTemplate) -> None:
    r = run_vztt("test", debian12.name, "--json", "--hostname", "ct50", "--ip", "192.0.2.50/24", "--ip",
                 "2001:db8::50/64", "--gateway", "192.0.2.49", "--gateway", "2001:db8::49",
                 "--nameserver", "192.0.2.53", cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = {c["name"]: c for c in r.json()["checks"]}
    assert rows["network:address"]["detail"] == "eth0 has 192.0.2.50/24, 2001:db8::50/64"
    assert re.match(r"answers: 192\.0\.2\.49 \([\d.]+ ms\), 2001:db8::49 \([\d.]+ ms\)$", rows["network:ping"]["detail"])
    assert rows["network:ssh"]["detail"].startswith("ssh root@192.0.2.50 uname -n: ct50; host key ")
    r = run_vztt("run", debian12.name, "--ip", "192.0.2.7/24", "--gateway", "192.0.2.1", "--nameserver", "192.0.2.53",
                 "--", "sh", "-c", "ip -o -4 addr show dev eth0; ip route show default; cat /etc/resolv.conf",
                 cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "inet 192.0.2.7/24" in r.stdout and "default via 192.0.2.1 dev eth0" in r.stdout
    assert "nameserver 192.0.2.53" in r.stdout
    r = run_vztt("test", debian12.name, "--ip", "192.0.2.300/24", cache=debian12.cache)
    assert r.returncode == EXIT_USAGE and "--ip '192.0.2.300/24'" in one_line_error(r)


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_a_failed_network_check_keeps_its_diagnostics(debian12: BuiltTemplate, tmp_path: Path) -> None:
    """A template whose sshd refuses root: the ssh row fails (the others pass), and the
    report keeps sshd's journal and `ip addr` from inside; the console log is kept."""
    from vztt.formats.plain import pack_tree
    name = "debian-12-noroot"
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "--use-compress-program=lz4", "-f", str(debian12.archive), "-C", str(tree),
                    "--numeric-owner", "--xattrs", "--xattrs-include=*"], check=True)
    (tree / "etc/ssh/sshd_config.d/noroot.conf").write_text("PermitRootLogin no\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    packed = pack_tree(tree, cache / f"{name}.plain.tar.lz4", 0)
    shutil.rmtree(tree)
    entry = {"file": f"{name}.plain.tar.lz4", "format": "plain", "sha256": packed.sha256, "size": packed.size}
    (cache / f"{name}.manifest.json").write_text(json.dumps({**debian12.manifest, "name": name, "archive": entry,
                                                             "archives": {"plain": entry}}))
    recipes = tmp_path / "recipes"
    from conftest import RECIPES
    shutil.copytree(RECIPES, recipes)
    (recipes / f"{name}.toml").write_text('extends = "debian-12-x86_64-minimal"\n')
    r = run_vztt("test", name, "--json", cache=cache, recipes=recipes, timeout=300)
    assert r.returncode == 9, r.stderr
    assert "network:ssh" in one_line_error(r)
    doc = r.json()
    rows = {c["name"]: c for c in doc["checks"]}
    assert {n: c["result"] for n, c in rows.items() if c["result"] != "passed"} == {"network:ssh": "failed"}
    ssh = rows["network:ssh"]
    assert ssh["detail"].startswith("ssh root@192.0.2.2 uname -n: exit status 255: ") and "Permission denied" in ssh["detail"]
    assert "## journalctl -u ssh.service -u networking.service" in ssh["output"]
    journal = ssh["output"].split("## journalctl", 1)[1].split("## ip route")[0]
    assert re.search(r"sshd\[\d+\]: Server listening on", journal), journal     # sshd's own journal
    assert re.search(r"## ip addr\n(.*\n)*?\d+: eth0@.*\n.*\n\s+inet 192\.0\.2\.2/24", ssh["output"]), ssh["output"][-1500:]
    assert Path(doc["console_log"]).read_text(errors="replace").strip()
    assert leftovers(cache) == []


def test_shipped_host_keys_are_found_without_following_links(tmp_path: Path) -> None:
    from vztt.boot.checks import shipped_host_keys
    tree = tmp_path / "tree"
    (tree / "etc/ssh").mkdir(parents=True)
    assert shipped_host_keys(tree) == []
    (tree / "etc/ssh/ssh_host_ed25519_key").write_text("secret\n")
    assert shipped_host_keys(tree) == ["/etc/ssh/ssh_host_ed25519_key"]
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ssh").mkdir(parents=True)
    (elsewhere / "ssh/ssh_host_rsa_key").write_text("not the template's\n")
    shutil.rmtree(tree / "etc")
    (tree / "etc").symlink_to(elsewhere)
    assert shipped_host_keys(tree) == []
