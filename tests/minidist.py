"""Local signed apt "mini distributions" for tests, and readers for what vztt builds.

A mini distribution is a flat apt repository (tests/aptrepo.py) holding the
real Debian packages a real build locked and fetched, plus synthetic
packages (aptrepo.FakePackage) for what that set lacks. A recipe pointed at
it installs for real, offline, in a few seconds' worth of apt work.

Plain module, no pytest fixtures; the tests wrap these in fixtures of their own.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame
from debian import deb822

from aptrepo import GpgKey, Repo, make_repo


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_package(package_cache: Path, sha256: str) -> Path:
    """Where vztt's content-addressed package cache keeps the file with this sha256."""
    return Path(package_cache) / "sha256" / sha256[:2] / sha256


def deb_file_name(name: str, version: str, arch: str) -> str:
    """A package's proper pool file name: the epoch is never part of it."""
    return f"{name}_{version.split(':', 1)[-1]}_{arch}.deb"


def stage_locked_debs(lock: dict, package_cache: Path, dest: Path) -> list[Path]:
    """The packages of a lock (as JSON), from a package cache, under their proper names in dest.

    Hard links where possible (the package cache is never written through them:
    make_repo copies into the pool), copies across file systems.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in lock["packages"]:
        src = cached_package(package_cache, p["sha256"])
        if not src.is_file():
            raise FileNotFoundError(f"{p['name']} {p['version']}: not in the package cache ({src})")
        target = dest / deb_file_name(p["name"], p["version"], p["arch"])
        target.unlink(missing_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
        out.append(target)
    return out


def fetch_locked(lock_file: Path, package_cache: Path) -> None:
    """Every package of a lock into a package cache, with vztt's own fetcher (each file's
    sha256 checked against the lock; the mirror variables as vztt reads them)."""
    from vztt.builder.fetch import Fetcher
    from vztt.recipe import variables
    from vztt.recipe.lock import Lock
    from vztt.store.packages import Download, PackageCache
    lock = Lock.read(lock_file)
    mirrors = variables.load(environ={k: v for k, v in os.environ.items() if k.startswith("VZTT_MIRROR_")})
    downloads = []
    for p in lock.packages:
        base = mirrors.expand(lock.repository(p.repository).url, f"{lock_file}: {p.repository}")
        downloads.append(Download(label=f"{p.name} {p.version}", url=f"{base.rstrip('/')}/{p.filename}",
                                  sha256=p.sha256, size=p.size))
    Fetcher(PackageCache(Path(package_cache))).fetch_all(downloads)


def publish_suites(root: Path, debs: dict[str, list[Path]], suites: list[str], key: GpgKey,
                   components: tuple[str, ...] = ("main",),
                   date: str = "Sat, 01 Jun 2024 00:00:00 UTC", arch: str = "amd64") -> dict[str, Repo]:
    """One pool, several signed suites (noble, noble-updates, ...) each listing every component.

    make_repo indexes the whole pool/<component> for the suite it publishes, so
    every suite lists the same packages; apt does not mind, and a component
    with no package gets an empty (but present and signed) index.
    """
    root = Path(root)
    for c in components:
        (root / "pool" / c).mkdir(parents=True, exist_ok=True)
    repos = {}
    for i, suite in enumerate(suites):
        by_comp = {c: (list(debs.get(c, [])) if i == 0 else []) for c in components}
        repos[suite] = make_repo(root, by_comp, suite=suite, codename=suite, key=key, date=date, arch=arch)
    return repos


def fixture_leaf(extends: str, what: str) -> str:
    """A leaf recipe: the shipped `extends`, its three repositories signed by the tests'
    throwaway key (recipes/keys/fixture.gpg)."""
    repos = "".join(f'\n[[repositories]]\nname = "{r}"\nkeyring = "fixture.gpg"\n' for r in ("main", "updates", "security"))
    return f"# The shipped {what} recipe, its repositories signed by the tests' throwaway key.\nextends = \"{extends}\"\n{repos}"


# --------------------------------------------------------------------------
# reading what vztt built


@dataclass
class Archive:
    """The members of a template archive (tar in an LZ4 frame), and the contents of a few."""

    path: Path
    members: dict[str, tarfile.TarInfo]
    contents: dict[str, bytes] = field(default_factory=dict)

    def text(self, name: str) -> str:
        return self.contents[name].decode()


def read_archive(path: Path, want: tuple[str, ...] = ()) -> Archive:
    """One streaming pass over the archive: every member's header, the data of `want` (./-names)."""
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with lz4.frame.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            members[info.name] = info
            if info.name in want and info.isfile():
                fh = tar.extractfile(info)
                assert fh is not None
                contents[info.name] = fh.read()
    return Archive(path=Path(path), members=members, contents=contents)


def dpkg_status(text: str) -> dict[str, dict[str, str]]:
    """Package name -> its paragraph in a dpkg status file."""
    return {p["Package"]: dict(p) for p in deb822.Deb822.iter_paragraphs(io.StringIO(text), use_apt_pkg=False)}
