"""Build signed local apt repositories for tests, with the real Debian tools.

Everything here shells out to the same programs a real archive uses
(dpkg-deb, apt-ftparchive, gpg), so what apt sees in tests is what it would
see from a real mirror: genuine .deb files, genuine Packages/Release indexes
and genuine OpenPGP signatures.  Plain module, no pytest fixtures: tests wrap
these helpers in fixtures of their own (key generation is slow, so generate
keys once per module).

Needs the Debian packages: dpkg (dpkg-deb), apt-utils (apt-ftparchive),
gpg, gpg-agent (and gpgv for callers that verify), python3-debian.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from debian import deb822
from debian.debian_support import Version

__all__ = [
    "FakePackage",
    "GpgKey",
    "Repo",
    "build_deb",
    "build_debs",
    "make_gpg_key",
    "make_repo",
    "resign",
    "tamper_deb",
    "tamper_release",
]

# Fixed timestamp so that two builds of the same FakePackage are byte-identical
# (dpkg-deb uses it for the ar member headers; we also clamp file mtimes).
SOURCE_DATE_EPOCH = 1717200000  # 2024-06-01 00:00:00 UTC

MAINTAINER = "vztt fixture <fixture@example.invalid>"

# Debian's own archive publishes only MD5sum + SHA256 (in Packages and
# Release); apt-ftparchive would add SHA1 and SHA512.  Match the real archive,
# because apt output depends on it: `apt-get install --print-uris` prints
# MD5Sum:<hex> when present (SHA256 only with -o Acquire::ForceHash=SHA256),
# `apt-get download --print-uris` prints the strongest hash.
_DEBIAN_HASHES = ["-o", "APT::FTPArchive::SHA1=false", "-o", "APT::FTPArchive::SHA512=false"]

# sun_path is 108 bytes; gpg-agent puts its sockets (longest name
# "S.gpg-agent.browser") in GNUPGHOME when /run/user/<uid> does not exist.
_MAX_GNUPGHOME_LEN = 80


# --------------------------------------------------------------------------
# packages


@dataclass
class FakePackage:
    """Description of a binary package to build with build_deb()."""

    name: str
    version: str = "1.0"
    arch: str = "all"  # or "amd64"
    depends: str = ""  # raw Depends: field
    pre_depends: str = ""
    provides: str = ""
    conflicts: str = ""
    essential: bool = False
    priority: str = "optional"  # "required" etc.
    # absolute path inside the package -> content
    files: dict[str, str | bytes] = field(default_factory=dict)
    postinst: str | None = None  # shell script body; "#!/bin/sh" is prepended
    description: str = "fixture package"

    @property
    def filename(self) -> str:
        """Canonical Debian file name (the epoch is never part of it)."""
        return f"{self.name}_{_strip_epoch(self.version)}_{self.arch}.deb"


def _strip_epoch(version: str) -> str:
    return version.split(":", 1)[1] if ":" in version else version


def _control_text(pkg: FakePackage, installed_size_kib: int) -> str:
    fields: list[tuple[str, str]] = [
        ("Package", pkg.name),
        ("Version", pkg.version),
        ("Architecture", pkg.arch),
        ("Maintainer", MAINTAINER),
        ("Installed-Size", str(installed_size_kib)),
    ]
    if pkg.essential:
        fields.append(("Essential", "yes"))
    fields += [("Priority", pkg.priority), ("Section", "misc")]
    for key, value in (
        ("Pre-Depends", pkg.pre_depends),
        ("Depends", pkg.depends),
        ("Conflicts", pkg.conflicts),
        ("Provides", pkg.provides),
    ):
        if value.strip():
            fields.append((key, value.strip()))
    # Multi-line descriptions need the deb822 continuation syntax
    # (leading space, "." for an empty line) or dpkg-deb rejects the control file.
    lines = pkg.description.strip().splitlines() or ["fixture package"]
    desc = lines[0]
    for line in lines[1:]:
        desc += "\n " + (line if line.strip() else ".")
    fields.append(("Description", desc))
    return "".join(f"{k}: {v}\n" for k, v in fields)


def build_deb(pkg: FakePackage, outdir: Path) -> Path:
    """Build pkg with dpkg-deb into outdir and return the .deb path.

    Deterministic: root:root ownership, fixed modes (files 0644, dirs 0755)
    and fixed mtimes, so the same FakePackage always yields the same bytes.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / pkg.filename
    with tempfile.TemporaryDirectory(prefix="vztt-deb-") as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        size = 0
        for path, content in sorted(pkg.files.items()):
            if not path.startswith("/"):
                raise ValueError(f"{pkg.name}: file path must be absolute: {path!r}")
            data = content.encode() if isinstance(content, str) else content
            target = stage / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            size += len(data)
        debian_dir = stage / "DEBIAN"
        debian_dir.mkdir()
        # dpkg counts Installed-Size in KiB, rounded up; 1 KiB minimum is
        # harmless and avoids a "0" that looks like a bug in test output.
        (debian_dir / "control").write_text(_control_text(pkg, max(1, -(-size // 1024))))
        if pkg.postinst is not None:
            script = pkg.postinst
            if not script.startswith("#!"):
                script = "#!/bin/sh\nset -e\n" + script
            if not script.endswith("\n"):
                script += "\n"
            (debian_dir / "postinst").write_text(script)
        # Normalise modes and mtimes ourselves: the caller's umask and the
        # wall clock must not leak into the archive.
        for dirpath, dirnames, filenames in os.walk(stage):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                p = os.path.join(dirpath, f)
                executable = dirpath == str(debian_dir) and f != "control"
                os.chmod(p, 0o755 if executable else 0o644)
        os.chmod(stage, 0o755)
        for dirpath, dirnames, filenames in os.walk(stage, topdown=False):
            for name in filenames + dirnames:
                os.utime(os.path.join(dirpath, name), (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        os.utime(stage, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
        _run(["dpkg-deb", "--build", "--root-owner-group", "-Zgzip", str(stage), str(out)], env=env)
    return out


def build_debs(pkgs: list[FakePackage], outdir: Path) -> list[Path]:
    """build_deb() for each package, in order."""
    return [build_deb(p, outdir) for p in pkgs]


# --------------------------------------------------------------------------
# keys


@dataclass
class GpgKey:
    """A throwaway signing key."""

    home: Path  # GNUPGHOME holding the secret key
    fingerprint: str
    keyring: Path  # binary public keyring: apt's signed-by= and gpgv --keyring


def _gpg(home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return _run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", "--no-tty",
         "--pinentry-mode", "loopback", "--passphrase", "", *args],
        env=_gpg_env(home),
        **kw,
    )


def _gpg_env(home: Path) -> dict[str, str]:
    return dict(os.environ, GNUPGHOME=str(home), LC_ALL="C")


def _kill_agent(home: Path) -> None:
    # Secret-key operations start a gpg-agent; stop it so no daemon outlives
    # the helper call (and none keeps the test directory busy).
    subprocess.run(["gpgconf", "--kill", "all"], env=_gpg_env(home),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def make_gpg_key(directory: Path, uid: str = "vztt fixture <fixture@example.invalid>") -> GpgKey:
    """Generate an unprotected RSA-2048 signing key in a new GNUPGHOME under directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="gpg-", dir=directory))
    if len(str(home)) > _MAX_GNUPGHOME_LEN:
        raise ValueError(f"GNUPGHOME path too long for gpg-agent sockets: {home}")
    os.chmod(home, 0o700)
    try:
        _gpg(home, "--quick-gen-key", uid, "rsa2048", "sign", "never")
        out = _gpg(home, "--with-colons", "--list-secret-keys", uid).stdout
    finally:
        _kill_agent(home)
    fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
    if not fprs:
        raise RuntimeError(f"no fingerprint in gpg output:\n{out}")
    keyring = home / "keyring.gpg"
    # Plain --export is binary (not armored): what gpgv --keyring and apt's
    # signed-by= accept for a *.gpg file.
    keyring.write_bytes(_gpg(home, "--export", fprs[0], text=False).stdout)
    return GpgKey(home=home, fingerprint=fprs[0], keyring=keyring)


# --------------------------------------------------------------------------
# repositories


@dataclass
class Repo:
    """A published flat-file apt repository (dists/ + pool/)."""

    root: Path
    suite: str
    codename: str
    components: list[str]
    arch: str
    key: GpgKey | None

    @property
    def url(self) -> str:
        return "file://" + str(self.root)

    @property
    def dist_dir(self) -> Path:
        return self.root / "dists" / self.suite

    def packages_file(self, component: str = "main") -> Path:
        return self.dist_dir / component / f"binary-{self.arch}" / "Packages"

    def sources_line(self, keyring: Path | None = None) -> str:
        """One-line sources.list entry; signed-by defaults to the repo's key."""
        keyring = keyring or (self.key.keyring if self.key else None)
        opts = f"[signed-by={keyring}] " if keyring else ""
        return f"deb {opts}{self.url} {self.suite} {' '.join(self.components)}"


def _pool_prefix(source: str) -> str:
    # Debian's pool layout: lib* sources get a 4-letter bucket.
    return source[:4] if source.startswith("lib") and len(source) > 3 else source[:1]


def _deb_fields(deb: Path) -> deb822.Deb822:
    out = _run(["dpkg-deb", "-f", str(deb)]).stdout
    return deb822.Deb822(out)


def make_repo(
    root: Path,
    debs: dict[str, list[Path]] | list[Path],
    suite: str = "stable",
    codename: str | None = None,
    arch: str = "amd64",
    key: GpgKey | None = None,
    origin: str = "Fixture",
    label: str = "Fixture",
    date: str = "Sat, 01 Jun 2024 00:00:00 UTC",
) -> Repo:
    """Copy debs into root/pool and (re)generate indexes, Release and signatures.

    debs is {component: [paths]} or a list meaning component "main".  Calling
    again on the same root adds the new debs to what is already in the pool and
    republishes everything (old versions stay listed, like a real pool).
    """
    root = Path(root).resolve()
    by_comp = {"main": list(debs)} if isinstance(debs, list) else {c: list(p) for c, p in debs.items()}
    codename = codename or suite

    for component, paths in by_comp.items():
        for deb in paths:
            f = _deb_fields(Path(deb))
            source = f.get("Source", f["Package"]).split()[0]
            dest_dir = root / "pool" / component / _pool_prefix(source) / source
            dest_dir.mkdir(parents=True, exist_ok=True)
            # Canonical name: apt-ftparchive --arch selects by file name suffix.
            name = f"{f['Package']}_{_strip_epoch(f['Version'])}_{f['Architecture']}.deb"
            shutil.copyfile(deb, dest_dir / name)

    # Republishing must also list components published by earlier calls.
    pool = root / "pool"
    published = {p.name for p in pool.iterdir() if p.is_dir()} if pool.is_dir() else set()
    components = sorted(set(by_comp) | published)
    # Keep "main" first: it is what callers expect in sources lines.
    components.sort(key=lambda c: (c != "main", c))

    dist = root / "dists" / suite
    for component in components:
        bindir = dist / component / f"binary-{arch}"
        bindir.mkdir(parents=True, exist_ok=True)
        # Run from the root so Filename: is "pool/...", relative to the URL;
        # --arch keeps *_<arch>.deb and *_all.deb (arch:all belongs in every
        # binary-<arch> index).
        text = _run(["apt-ftparchive", *_DEBIAN_HASHES, "--arch", arch, "packages", f"pool/{component}"],
                    cwd=root).stdout
        data = text.encode()
        (bindir / "Packages").write_bytes(data)
        # mtime=0 / no filename in the gzip header: reproducible indexes.
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
            gz.write(data)
        (bindir / "Packages.gz").write_bytes(buf.getvalue())
        (bindir / "Packages.xz").write_bytes(
            lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64))

    # Stale files would be hashed into the new Release (apt-ftparchive picks
    # up "Release" itself) or leave old signatures next to a new Release.
    for stale in ("Release", "InRelease", "Release.gpg"):
        (dist / stale).unlink(missing_ok=True)
    opts = {
        "Origin": origin,
        "Label": label,
        "Suite": suite,
        "Codename": codename,
        "Architectures": arch,
        "Components": " ".join(components),
        "Date": date,
    }
    cmd = ["apt-ftparchive", *_DEBIAN_HASHES]
    for k, v in opts.items():
        cmd += ["-o", f"APT::FTPArchive::Release::{k}={v}"]
    release = _run(cmd + ["release", "."], cwd=dist).stdout
    (dist / "Release").write_text(release)

    repo = Repo(root=root, suite=suite, codename=codename, components=components, arch=arch, key=None)
    if key is not None:
        resign(repo, key)
    return repo


def resign(repo: Repo, key: GpgKey) -> None:
    """(Re)write InRelease and Release.gpg for the current Release with key."""
    dist = repo.dist_dir
    release = dist / "Release"
    try:
        _gpg(key.home, "--local-user", key.fingerprint, "--digest-algo", "SHA256",
             "--clearsign", "--output", str(dist / "InRelease"), str(release))
        _gpg(key.home, "--local-user", key.fingerprint, "--digest-algo", "SHA256",
             "--detach-sign", "--armor", "--output", str(dist / "Release.gpg"), str(release))
    finally:
        _kill_agent(key.home)
    repo.key = key


def _flip_char(c: str) -> str:
    if c.isdigit():
        return str((int(c) + 1) % 10)
    if c.isalpha():
        return c.swapcase()
    return "x" if c != "x" else "y"


def tamper_release(repo: Repo) -> None:
    """Change one character of the signed text, keeping the old signatures.

    The same change is made to InRelease and to Release, so both InRelease and
    the Release + Release.gpg pair fail verification (apt must not get a valid
    fallback).  The last character of the Origin: line is changed, so the
    file stays well-formed.
    """
    dist = repo.dist_dir
    if not (dist / "InRelease").exists():
        raise FileNotFoundError(f"{dist}/InRelease: repository is not signed")
    inrelease = (dist / "InRelease").read_text()
    release = (dist / "Release").read_text()
    lines = release.splitlines(keepends=True)
    # Prefer the Origin: line (harmless to alter); else the first non-empty line.
    candidates = [i for i, line in enumerate(lines)
                  if line.startswith("Origin: ") and line.strip() != "Origin:"]
    idx = candidates[0] if candidates else next(i for i, line in enumerate(lines) if line.rstrip("\n"))
    line = lines[idx].rstrip("\n")
    new_line = line[:-1] + _flip_char(line[-1])
    if line not in inrelease:
        raise RuntimeError("InRelease does not contain the Release text")
    # Replace only inside the signed body (first occurrence, after the header).
    (dist / "InRelease").write_text(inrelease.replace(line + "\n", new_line + "\n", 1))
    lines[idx] = new_line + "\n"
    (dist / "Release").write_text("".join(lines))


def tamper_deb(repo: Repo, name: str) -> Path:
    """Alter the newest indexed .deb of package name in place; return its path.

    One digit of the first ar member's mtime is changed: same size, still a
    valid .deb for dpkg-deb, but its SHA256 no longer matches Packages, so only
    apt's hash check can catch it.
    """
    best: tuple[Version, Path] | None = None
    for component in repo.components:
        index = repo.packages_file(component)
        if not index.exists():
            continue
        with open(index) as fh:
            for para in deb822.Packages.iter_paragraphs(fh, use_apt_pkg=False):
                if para["Package"] == name:
                    v = Version(para["Version"])
                    if best is None or v > best[0]:
                        best = (v, repo.root / para["Filename"])
    if best is None:
        raise KeyError(f"package {name!r} not in the indexes of {repo.root}")
    path = best[1]
    data = bytearray(path.read_bytes())
    # "!<arch>\n" (8 bytes) + ar header: name[16] mtime[12] ...
    pos = 8 + 16
    if data[:8] == b"!<arch>\n" and chr(data[pos]).isdigit():
        data[pos] = ord(_flip_char(chr(data[pos])))
    else:  # not an ar archive we recognise: flip the last byte instead
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         text: bool = True) -> subprocess.CompletedProcess:
    """Run cmd, raising with its stderr (not just the exit code) on failure."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=text, check=False)
    if proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{err}")
    return proc
