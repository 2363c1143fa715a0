"""A bootable EL-shaped rpm distribution, built for tests from Debian 12's binaries.

Real EL mirrors are out of reach, so the bootable rpm fixture is made here
with the real tools: Debian's .debs (fetched with apt through a private
configuration, from the host's own mirror), unpacked, usr-merged, split and
renamed the way EL 9 packages them (glibc, glibc-common,
glibc-minimal-langpack, systemd, systemd-libs, openssh-server, shadow-utils,
procps-ng, ...), rebuilt by rpmbuild with its automatic ELF dependencies
(`libfoo.so.N()(64bit)`, `libc.so.6(GLIBC_2.34)(64bit)`), signed by rpmsign
with a throwaway key, indexed by createrepo_c, repomd.xml signed. dnf
resolves, verifies and installs it like an EL mirror; the result boots with
systemd.

What is EL about it: package names and splits, `system-release` from a
release package with os-release and presets, Requires between packages as
EL has them, `/bin/sh` a real Provides of bash, a filesystem package with
/bin -> usr/bin, scriptlets in EL's style (%pre creating system users with
getent/groupadd/useradd, %post `systemctl preset`, systemd's %posttrans
`preset-all`, glibc's ldconfig file triggers), rpm's database in /var/lib/rpm.
What stays Debian: the binaries, so libraries live in
/usr/lib/x86_64-linux-gnu (the filesystem package owns it) and programs keep
Debian's paths (/usr/lib/openssh, /usr/lib/systemd).

The EL 10 flavour (`el10_repo`): the same repository with EL 10's release
package and an rpm whose database is in /usr/lib/sysimage/rpm, /var/lib/rpm
a symlink to it, as EL 10 has it.

The modules: rpmdist_files.py (generated files, scriptlets), rpmdist_table.py
(the packages), rpmdist_debs.py (apt, unpacking), rpmdist_build.py (staging,
rpmbuild); this one builds, caches and makes variants.

The repository is built once per source: `<cache root>/rpmdist-<digest16>/`,
digest = sha256 of those modules and rpmrepo.py, made in a temporary
directory and renamed into place (a lock serialises concurrent builders);
older digests' builds are removed then. Its signing keys stay in it, so
variants for refusal tests (make_variant) are signed by the same key.

Needs the Debian packages: apt, dpkg (dpkg-deb), rpm (rpmbuild, rpmsign),
createrepo-c, gpg, gpg-agent; network access to the host's Debian mirror on
a cold build. Plain module, no pytest fixtures:
`python3 tests/rpmdist.py CACHE_ROOT` builds (or finds) it by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rpmdist_build import EL10_PACKAGES, Staged, assign, el10_staged, rpmbuild  # noqa: E402
from rpmdist_debs import DebianSource, deb_version, debian_source, fetch_debs, unpack  # noqa: E402
from rpmdist_files import SUITE  # noqa: E402
from rpmdist_table import BASE, PACKAGES  # noqa: E402
from rpmrepo import (RpmPackage, RpmRepo, build_rpm, export_armored, make_rpm_repo, run, sign_rpms,  # noqa: E402
                     tamper_repomd)

__all__ = [
    "BASE",
    "Distribution",
    "VARIANTS",
    "Variant",
    "build_distribution",
    "debian_source",
    "el10_repo",
    "make_mirror",
    "make_variant",
]

DEB_CACHE = "rpmdist-debs"        # under the cache root: .debs by file name, checked by sha256 on every build
SOURCES = ("rpmdist.py", "rpmdist_files.py", "rpmdist_table.py", "rpmdist_debs.py", "rpmdist_build.py", "rpmrepo.py")


# ==========================================================================
# Keys, the bad packages of the variants
# ==========================================================================

@dataclass(frozen=True)
class Key:
    home: Path
    fingerprint: str


def _make_key(home: Path, uid: str) -> Key:
    """A throwaway RSA signing key in a new GNUPGHOME at `home`."""
    with _gpg_home(None) as short:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GNUPGHOME": str(short), "LC_ALL": "C"}
        try:
            run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key", uid,
                  "rsa2048", "sign", "never"], env=env)
            out = run(["gpg", "--batch", "--with-colons", "--list-secret-keys", uid], env=env).stdout
        finally:
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.copytree(short, home, ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*"))
    fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
    if not fprs:
        raise RuntimeError(f"no fingerprint for {uid} in gpg's output:\n{out}")
    return Key(home, fprs[0])


@contextlib.contextmanager
def _gpg_home(home: Path | None) -> Iterator[Path]:
    """A copy of GNUPGHOME `home` (or an empty one) at a short path: gpg-agent puts its
    sockets in GNUPGHOME when /run/user/<uid> does not exist, and sun_path has 108 bytes."""
    short = Path(tempfile.mkdtemp(prefix="vztt-gpg-"))
    try:
        if home is not None:
            shutil.copytree(home, short, dirs_exist_ok=True, ignore=shutil.ignore_patterns("S.*", "*.lock"))
        os.chmod(short, 0o700)
        yield short
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={"PATH": "/usr/bin:/bin", "GNUPGHOME": str(short)},
                       capture_output=True, check=False)
        shutil.rmtree(short, ignore_errors=True)


# The refusal tests' packages: each one bad in one way, all small.
VARIANTS = {
    "unsigned": "fixture-unsigned: not signed at all",
    "wrong-key": "fixture-wrong-key: signed by a key the recipe does not trust",
    "bad-signature": "fixture-bad-signature: signed, then a byte of its header changed: the signature is BAD",
    "failing-pre": "fixture-failing-pre: signed, its %pre exits 4",
    "unresolvable": "fixture-unresolvable: signed, requires a library nobody provides",
    "bad-repomd-signature": "repomd.xml changed after it was signed (no extra package)",
}


def _bad_packages() -> dict[str, RpmPackage]:
    return {
        "unsigned": RpmPackage("fixture-unsigned", summary="an unsigned package",
                               files={"/usr/share/fixture-unsigned": "x\n"}),
        "wrong-key": RpmPackage("fixture-wrong-key", summary="signed by an untrusted key",
                                files={"/usr/share/fixture-wrong-key": "x\n"}),
        "bad-signature": RpmPackage("fixture-bad-signature", summary=f"signed, then {TAMPER_FROM.decode()}",
                                    files={"/usr/share/fixture-bad-signature": "x\n"}),
        "failing-pre": RpmPackage("fixture-failing-pre", summary="a %pre that fails",
                                  pre='echo "fixture-failing-pre: refusing" >&2; exit 4',
                                  files={"/usr/share/fixture-failing-pre": "x\n"}),
        "unresolvable": RpmPackage("fixture-unresolvable", summary="requires what nobody provides",
                                   requires=["libvztt-nowhere.so.1()(64bit)"],
                                   files={"/usr/share/fixture-unresolvable": "x\n"}),
    }


# The bad-signature package's Summary, changed in the file after signing: its header no longer
# matches the signature (nor its SHA256 header digest), while the repository's metadata, made
# from the changed file, is consistent: only the signature check can tell.
TAMPER_FROM, TAMPER_TO = b"tamper-me", b"tampered!"


def _tamper(rpm: Path) -> None:
    data = rpm.read_bytes()
    if TAMPER_FROM not in data:         # in Summary and %description, both in the signed header
        raise RuntimeError(f"{rpm}: no {TAMPER_FROM!r} in its header")
    rpm.write_bytes(data.replace(TAMPER_FROM, TAMPER_TO))


@dataclass(frozen=True)
class Distribution:
    """A built fixture distribution (a directory of the cache)."""

    root: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    @property
    def repo(self) -> RpmRepo:
        return RpmRepo(self.root / "repo", self.key_home)

    @property
    def url(self) -> str:
        return self.repo.url

    @property
    def key(self) -> Path:
        """The armored public key: dnf's gpgkey=, a recipe's keyring."""
        return self.root / "RPM-GPG-KEY-vztt-fixture"

    @property
    def key_home(self) -> Path:
        return self.root / "keys" / "good"

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


@dataclass(frozen=True)
class Variant:
    repo: RpmRepo
    package: str | None      # the bad package to ask for (None: the repository itself is bad)


def cache_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ==========================================================================
# The cache
# ==========================================================================

def build_distribution(cache_root: Path, *, source: DebianSource | None = None,
                       log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Distribution:
    """The fixture distribution for this source, from the cache or built (a few minutes cold)."""
    cache_root = Path(cache_root).resolve()
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / f"rpmdist-{cache_digest()}"
    if (final / "manifest.json").is_file():
        return Distribution(final)
    with open(cache_root / ".rpmdist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # another test process may be building it
        if (final / "manifest.json").is_file():
            return Distribution(final)
        for stale in cache_root.glob(".rpmdist-*.tmp-*"):      # a killed build's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_root))
        try:
            _build(tmp, source or debian_source(), cache_root / DEB_CACHE, log)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Builds of older sources are never used again (the .debs stay: they are checked by sha256).
        for old in cache_root.glob("rpmdist-*"):
            if old != final and old.name != DEB_CACHE and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return Distribution(final)


def _build(out: Path, source: DebianSource, deb_cache: Path, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    # Scratch (the unpacked .debs, the package trees: ~1 GB, 40000 files) in RAM when there is room
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30
    work = Path(tempfile.mkdtemp(prefix="vztt-rpmdist-", dir=shm if roomy else out))
    try:
        manifest = _build_in(out, work, source, deb_cache, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log(f"fixture distribution: {len(manifest['packages'])} packages, {manifest['repo_bytes'] >> 20} MiB, "
        f"built in {manifest['build_seconds']} s")


def _build_in(out: Path, work: Path, source: DebianSource, deb_cache: Path, log: Callable[[str], None]) -> dict:
    debs = fetch_debs(sorted({t.deb for p in PACKAGES for t in p.take}), work, source, deb_cache, log)

    t0 = time.monotonic()
    xdir = work / "x"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        unpacked = dict(zip(sorted(debs), pool.map(lambda n: unpack(debs[n], xdir / n), sorted(debs))))
    staged = assign(unpacked, xdir, work, debs)
    el10 = el10_staged({s.pkg.name: s for s in staged}, work)
    log(f"unpacked and split {len(debs)} .debs into {len(staged)} packages in {time.monotonic() - t0:.1f} s")

    t0 = time.monotonic()
    jobs: list[tuple[Staged, Path]] = [(s, work / "rpms") for s in staged] + [(s, work / "rpms-el10") for s in el10]
    for rpmdir in {d for _, d in jobs}:
        # made here, before the parallel rpmbuilds: two of them making it at once, the loser
        # fails ("failed to create directory %{_rpmdir}: File exists"; rpm 4.18)
        rpmdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        built = list(pool.map(lambda job: rpmbuild(job[0], work, job[1]), jobs))
    rpms, el10_rpms = built[:len(staged)], built[len(staged):]
    log(f"rpmbuild: {len(built)} packages in {time.monotonic() - t0:.1f} s")

    t0 = time.monotonic()
    keys = out / "keys"
    keys.mkdir()
    good = _make_key(keys / "good", "vztt EL fixture <el-fixture@example.invalid>")
    other = _make_key(keys / "other", "untrusted <untrusted@example.invalid>")
    bad_dir = out / "bad"
    bad = {kind: build_rpm(p, bad_dir) for kind, p in _bad_packages().items()}
    el10_dir = out / "el10"
    el10_dir.mkdir()
    for rpm in el10_rpms:
        shutil.copyfile(rpm, el10_dir / rpm.name)
    el10_signed = sorted(el10_dir.iterdir())
    with _gpg_home(good.home) as home:
        sign_rpms(rpms + el10_signed + [bad["failing-pre"], bad["unresolvable"], bad["bad-signature"]], home,
                  good.fingerprint)
        repo = make_rpm_repo(out / "repo", rpms, home, good.fingerprint)
        export_armored(home, good.fingerprint, out / "RPM-GPG-KEY-vztt-fixture")
    with _gpg_home(other.home) as home:
        sign_rpms([bad["wrong-key"]], home, other.fingerprint)
    _tamper(bad["bad-signature"])
    log(f"signed and indexed in {time.monotonic() - t0:.1f} s")

    packages = []
    for s, rpm in zip(staged, rpms):
        packages.append({"name": s.pkg.name, "evr": (f"{s.epoch}:" if s.epoch else "") + f"{s.version}-{s.release}",
                         "arch": s.pkg.arch, "file": f"Packages/{rpm.name[0].lower()}/{rpm.name}",
                         "size": rpm.stat().st_size, "debs": s.pkg.debs})
    return {
        "digest": cache_digest(), "suite": SUITE, "mirror": source.uri, "fingerprint": good.fingerprint,
        "other_fingerprint": other.fingerprint,
        "debian": {name: deb_version(path) for name, path in sorted(debs.items())},
        "packages": packages, "base": list(BASE),
        "bad": {kind: str(path.relative_to(out)) for kind, path in bad.items()},
        "el10": {s.pkg.name: f"el10/{p.name}" for s, p in zip(el10, el10_rpms)},
        "repo_bytes": sum(f.stat().st_size for f in repo.root.rglob("*") if f.is_file()),
    }


# ==========================================================================
# Repositories made from the built one
# ==========================================================================

def _repo_from(dist: Distribution, rpms: list[Path], dest: Path) -> RpmRepo:
    """A repository of `rpms` (hard-linked where the filesystem allows), signed by the fixture's key."""
    dest = Path(dest).resolve()
    if dest.exists():
        raise FileExistsError(dest)
    for rpm in rpms:
        target = dest / "Packages" / rpm.name[0].lower() / rpm.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(rpm, target)
        except OSError:                 # another filesystem
            shutil.copyfile(rpm, target)
    dest.mkdir(parents=True, exist_ok=True)
    with _gpg_home(dist.key_home) as home:
        repo = make_rpm_repo(dest, [], home, dist.fingerprint)
    repo.key_home = dist.key_home
    return repo


def make_variant(dist: Distribution, kind: str, dest: Path) -> Variant:
    """A copy of the fixture repository with one bad thing in it, signed by the
    fixture's key: see VARIANTS."""
    if kind not in VARIANTS:
        raise ValueError(f"no variant {kind!r}: {', '.join(VARIANTS)}")
    rpms = sorted(dist.repo.root.glob("Packages/*/*.rpm"))
    extra = [dist.root / dist.manifest["bad"][kind]] if kind in dist.manifest["bad"] else []
    repo = _repo_from(dist, rpms + extra, dest)
    if kind == "bad-repomd-signature":
        tamper_repomd(repo)
        return Variant(repo=repo, package=None)
    return Variant(repo=repo, package=_bad_packages()[kind].name)


def el10_repo(dist: Distribution, dest: Path) -> RpmRepo:
    """The EL 10 flavour: the repository with EL 10's release package and rpm (its
    database in /usr/lib/sysimage/rpm) in place of EL 9's."""
    el10 = {name: dist.root / path for name, path in dist.manifest["el10"].items()}
    assert sorted(el10) == sorted(EL10_PACKAGES), el10
    replaced = {p["file"] for p in dist.manifest["packages"] if p["name"] in el10}
    rpms = [p for p in sorted(dist.repo.root.glob("Packages/*/*.rpm"))
            if str(p.relative_to(dist.repo.root)) not in replaced]
    return _repo_from(dist, rpms + sorted(el10.values()), dest)


def make_mirror(dist: Distribution, dest: Path, packages_at: str, empty_at: tuple[str, ...] = (),
                repo: RpmRepo | None = None) -> Path:
    """A mirror tree as a distribution lays it out: `dest/packages_at` is the fixture
    repository (or `repo`), each of `empty_at` a signed repository without packages
    (an AppStream the minimal set does not need). Returns dest."""
    dest = Path(dest).resolve()
    target = dest / packages_at
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to((repo or dist.repo).root)
    for path in empty_at:
        _repo_from(dist, [], dest / path)
    return dest


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build (or find in the cache) the EL fixture distribution.")
    ap.add_argument("cache_root", type=Path)
    ap.add_argument("--variant", nargs=2, metavar=("KIND", "DEST"), help="also make a variant repository")
    args = ap.parse_args()
    t = time.monotonic()
    d = build_distribution(args.cache_root)
    print(f"{d.root} ({time.monotonic() - t:.1f} s)")
    if args.variant:
        print(make_variant(d, args.variant[0], Path(args.variant[1])))
