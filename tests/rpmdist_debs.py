"""The Debian side of the fixture distribution: the host's own Debian mirror,
a private apt that fetches the .debs (never touching the host's apt state),
and unpacking each .deb into a usr-merged tree with what tar knew of its files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from rpmdist_files import DEB_ARCH, SUITE
from rpmrepo import run

# Debian's file ownerships that EL does not have: EL reads /etc/shadow as root (0000)
OWNER_MAP = {"shadow": "root"}


@dataclass(frozen=True)
class DebianSource:
    uri: str
    keyring: Path


def debian_source(suite: str = SUITE, etc: Path = Path("/etc/apt")) -> DebianSource:
    """The host's own Debian mirror for `suite` main, from its apt sources (deb822 or one-line)."""
    candidates: list[tuple[str, str | None]] = []
    files = sorted([etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list"))
                   + sorted((etc / "sources.list.d").glob("*.sources")), key=lambda p: (p.suffix == ".sources", p))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                if suite in fields.get("suites", "").split() and "main" in fields.get("components", "").split():
                    candidates += [(u, fields.get("signed-by")) for u in fields.get("uris", "").split()]
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
                if m and m.group(3) == suite and "main" in m.group(4).split():
                    opts = dict(o.split("=", 1) for o in (m.group(1) or "").strip("[] \n").split() if "=" in o)
                    candidates.append((m.group(2), opts.get("signed-by")))
    if not candidates:
        raise RuntimeError(f"no apt source for Debian {suite} main in {etc}: the fixture needs the host's mirror")
    uri, keyring = candidates[0]
    return DebianSource(uri=uri.rstrip("/"),
                        keyring=Path(keyring or "/usr/share/keyrings/debian-archive-keyring.gpg"))


def fetch_debs(names: list[str], work: Path, source: DebianSource, deb_cache: Path,
                log: Callable[[str], None]) -> dict[str, Path]:
    """The named .debs (the suite's candidate versions), through apt configured from
    nothing but work/apt: the host's apt lists, cache and dpkg status stay untouched.
    Files already in deb_cache with the sha256 of the signed index are not fetched again."""
    root = work / "apt"
    for d in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d", "etc/apt/trusted.gpg.d",
              "var/lib/apt/lists/partial", "var/cache/apt/archives/partial", "var/lib/dpkg", "var/log/apt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text("")
    conf = root / "apt.conf"
    conf.write_text(textwrap.dedent(f"""\
        Dir "{root}/";
        Dir::State::status "{root}/var/lib/dpkg/status";
        APT::Architecture "{DEB_ARCH}";
        APT::Architectures {{ "{DEB_ARCH}"; }};
        APT::Sandbox::User "root";
        Acquire::Languages "none";
        Acquire::Retries "3";
        Debug::NoLocking "true";
        """) + _host_apt_proxy())
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {source.uri}\nSuites: {SUITE}\nComponents: main\nSigned-By: {source.keyring}\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "APT_CONFIG": str(conf),
           "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    run(["apt-get", "-q", "update"], env=env)
    # 'URI' name_version_arch.deb size SHA256:hex, from the signed index apt just checked
    listing = run(["apt-get", "-q", "download", "--print-uris", *sorted(names)], env=env).stdout
    wanted: dict[str, str] = {}
    for line in listing.splitlines():
        m = re.match(r"^'[^']+' (\S+\.deb) \d+ SHA256:([0-9a-f]{64})$", line)
        if m:
            wanted[m.group(1)] = m.group(2)
    deb_cache.mkdir(parents=True, exist_ok=True)
    for stale in deb_cache.glob(".download-*"):          # a killed build's (an hour is long enough)
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    missing = sorted(f for f, digest in wanted.items()
                     if not (deb_cache / f).is_file() or sha256_file(deb_cache / f) != digest)
    if missing:
        dl = Path(tempfile.mkdtemp(prefix=".download-", dir=deb_cache))     # renames into the cache
        specs = [f"{n}={urllib.parse.unquote(v)}" for n, v, _ in (f[:-4].split("_") for f in missing)]
        run(["apt-get", "-q", "download", *specs], env=env, cwd=dl)
        for f in missing:
            if sha256_file(dl / f) != wanted[f]:
                raise RuntimeError(f"{f}: not the sha256 of {SUITE}'s index")
            os.replace(dl / f, deb_cache / f)
        shutil.rmtree(dl)
    log(f"apt: {len(wanted)} .debs ({len(missing)} fetched) from {source.uri} in {time.monotonic() - started:.1f} s")
    found = {f.split("_")[0]: deb_cache / f for f in wanted}
    absent = sorted(set(names) - set(found))
    if absent:
        raise RuntimeError(f"not in Debian {SUITE} main for {DEB_ARCH}: {', '.join(absent)}")
    return found


def _host_apt_proxy() -> str:
    """The host's apt proxy settings, if any (the private configuration reads none of the host's)."""
    out = subprocess.run(["apt-config", "dump", "Acquire"], capture_output=True, text=True, check=False).stdout
    return "".join(line + "\n" for line in out.splitlines()
                   if re.match(r'^Acquire::(https?|ftp)::Proxy(::\S+)? "', line))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def deb_version(deb: Path) -> str:
    """From apt's file name, name_version_arch.deb (the epoch's colon quoted)."""
    return urllib.parse.unquote(deb.name[:-4].split("_")[1])


# ==========================================================================
# Unpacking: every .deb into its own usr-merged tree, with what tar knew
# ==========================================================================

@dataclass
class Entry:
    kind: str            # "file", "dir", "link"
    mode: int
    user: str
    group: str
    target: str = ""     # symlink target


def usr_merged(path: str) -> str:
    """Debian's path as EL places it: /bin, /sbin, /lib, /lib64 are symlinks into /usr."""
    p = "/" + path.lstrip("./").rstrip("/") if path not in (".", "./") else "/"
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if p == top or p.startswith(top + "/"):
            return "/usr" + p
    return p


def unpack(deb: Path, dest: Path) -> dict[str, Entry]:
    """The data of one .deb below dest at usr-merged paths; the entries as tar lists them."""
    entries: dict[str, Entry] = {}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            path = usr_merged(m.name)
            if path == "/":
                continue
            target = dest / path.lstrip("/")
            user, group = OWNER_MAP.get(m.uname, m.uname), OWNER_MAP.get(m.gname, m.gname)
            if path in entries:
                if m.isdir() and entries[path].kind == "dir":
                    continue
                raise RuntimeError(f"{deb.name}: {path} twice after merging /usr")
            target.parent.mkdir(parents=True, exist_ok=True)
            if m.isdir():
                target.mkdir(exist_ok=True)
                entries[path] = Entry("dir", m.mode & 0o7777, user, group)
            elif m.issym():
                os.symlink(m.linkname, target)
                entries[path] = Entry("link", 0o777, user, group, m.linkname)
            elif m.islnk():
                os.link(dest / usr_merged(m.linkname).lstrip("/"), target)
                entries[path] = Entry("file", entries[usr_merged(m.linkname)].mode, user, group)
            elif m.isfile():
                src = tar.extractfile(m)
                assert src is not None
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                entries[path] = Entry("file", m.mode & 0o7777, user, group)
            else:
                raise RuntimeError(f"{deb.name}: {m.name}: unsupported member type {m.type!r}")
    if proc.wait() != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed")
    for path, e in entries.items():
        if e.kind != "link":
            os.chmod(dest / path.lstrip("/"), e.mode if e.kind == "file" else 0o755)
    return entries


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)

