"""vztt against local, signed apt repositories, through the real command line.

Two halves:

1. Synthetic repositories (tests/aptrepo.py, no network): every way a
   repository or a package set can be wrong ends in one error line, the
   documented exit status, a message that names the culprit, and no trace in
   the cache (no template, no manifest, no scratch, no lock when resolving
   failed).
2. A "mini distribution" made of the real Debian 12 packages the session's
   real build fetched (tests/minidist.py), republished under Ubuntu's suite
   names with a throwaway key: the shipped Ubuntu recipes build from it for
   real, offline. A few real installs there show that a failed build keeps
   the previous template, that a second build downloads nothing, and that a
   corrupted cached package is dropped and fetched again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aptrepo import (  # noqa: E402
    FakePackage,
    GpgKey,
    Repo,
    build_deb,
    build_debs,
    make_gpg_key,
    make_repo,
    resign,
    tamper_deb,
    tamper_release,
)
from conftest import PACKAGE_CACHE, RECIPES, BuiltTemplate, Result, leftovers, one_line_error, run_vztt  # noqa: E402
from minidist import (  # noqa: E402
    Archive,
    cached_package,
    dpkg_status,
    fixture_leaf,
    publish_suites,
    read_archive,
    sha256_file,
    stage_locked_debs,
)

REQUIRED_TOOLS = ["apt-get", "apt-ftparchive", "dpkg-deb", "gpg", "gpgv", "gpgconf"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="vztt build needs root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in REQUIRED_TOOLS),
                       reason="needs apt, apt-utils, dpkg, gpg, gpgv"),
]

EXIT_RESOLVE = 4
EXIT_FETCH = 5
EXIT_BUILD = 6


@dataclass
class Keys:
    good: GpgKey
    other: GpgKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    # RSA key generation is the slow part: once per module.
    d = tmp_path_factory.mktemp("keys")
    return Keys(good=make_gpg_key(d), other=make_gpg_key(d, "untrusted <untrusted@example.invalid>"))


def no_entry(cache: Path, name: str) -> list[str]:
    """What a failed command must not leave in the cache: a template, a manifest, scratch or temp files."""
    found = [str(p) for p in (cache / f"{name}.plain.tar.lz4", cache / f"{name}.manifest.json") if p.exists()]
    found += [str(p) for p in cache.glob("*-old")]
    return found + leftovers(cache)


# ==========================================================================
# 1. synthetic repositories: failures, before anything is installed
# ==========================================================================

FAKE = "fixture-mini"          # the recipe's name
FAKE_PACKAGES = [
    FakePackage("fixture-base", essential=True, priority="required", files={"/etc/fixture-base": "base\n"}),
    FakePackage("libfix1", version="1.0-1", arch="amd64", files={"/usr/lib/libfix.so.1": b"\x7fELF fake\n"}),
    FakePackage("fixapp", depends="libfix1 (>= 1.0)", files={"/usr/share/fixapp/data": "app\n"}),
    FakePackage("fixmta", provides="mail-transport-agent"),
    FakePackage("fixmailer", depends="mail-transport-agent"),
    FakePackage("apt", version="2.6.1", arch="amd64", depends="libfix1"),   # every request includes apt
    FakePackage("broken", depends="no-such-library (>= 2)"),
]


@dataclass
class FakeSetup:
    tmp: Path
    repo: Repo
    recipes: Path
    cache: Path
    packages: Path           # this test's own package cache
    keys: Keys

    @property
    def env(self) -> dict[str, str]:
        return {"VZTT_MIRROR_FIXTURE_MIRROR": self.repo.url, "VZTT_PACKAGE_CACHE": str(self.packages)}

    def vztt(self, *args: str) -> Result:
        return run_vztt(*args, cache=self.cache, recipes=self.recipes, env=self.env, timeout=300)

    def recipe(self, include: list[str], name: str = FAKE) -> str:
        text = f"""
distro = "debian"
release = "fixture"
version = "1"
summary = "synthetic fixture"

[packages]
include = {json.dumps(include)}

[[repositories]]
name = "fixture"
url = "$FIXTURE_MIRROR"
suite = "stable"
components = ["main"]
keyring = "fixture.gpg"
"""
        (self.recipes / f"{name}.toml").write_text(text)
        return name

    def lock(self, name: str = FAKE) -> Path:
        return self.cache / "locks" / f"{name}.lock.json"

    def assert_clean(self, name: str = FAKE, lock: bool = True) -> None:
        assert no_entry(self.cache, name) == []
        if not lock:
            assert not self.lock(name).exists()
        # nothing half-copied into the package cache either
        tmp = self.packages / "tmp"
        assert not tmp.is_dir() or list(tmp.iterdir()) == []


@pytest.fixture
def fake(tmp_path: Path, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> FakeSetup:
    debs = build_debs(FAKE_PACKAGES, tmp_path / "debs")
    # Not below tmp_path: its name holds the test's name, and a "_" in the mirror's path
    # trips a vztt bug (test_mirror_path_with_underscore).
    repo = make_repo(tmp_path_factory.mktemp("repo") / "repo", debs, key=keys.good)
    recipes = tmp_path / "recipes"
    (recipes / "keys").mkdir(parents=True)
    shutil.copyfile(keys.good.keyring, recipes / "keys" / "fixture.gpg")
    setup = FakeSetup(tmp=tmp_path, repo=repo, recipes=recipes, cache=tmp_path / "cache",
                      packages=tmp_path / "packages", keys=keys)
    setup.recipe(["fixapp", "fixmailer"])
    return setup


def fails(result: Result, code: int) -> str:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr}"
    return one_line_error(result)


def test_good_repository_resolves(fake: FakeSetup) -> None:
    """The control for every failure below: the same repository, untouched, resolves."""
    r = fake.vztt("resolve", FAKE, "--json")
    assert r.returncode == 0, r.stderr
    lock = json.loads(fake.lock().read_text())
    names = {p["name"] for p in lock["packages"]}
    # Essential, the library through fixapp, the virtual package's provider, apt
    assert names == {"fixture-base", "libfix1", "fixapp", "fixmta", "fixmailer", "apt"}
    # apt flags the native "apt" Essential itself, so it and its library are unpacked first too
    assert {p["name"] for p in lock["packages"] if p["essential"]} == {"fixture-base", "apt", "libfix1"}
    assert r.json()["packages"] == 6


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_bad_signature(fake: FakeSetup, command: str) -> None:
    tamper_release(fake.repo)
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert line.startswith("vztt: resolve error: ")
    assert "repository fixture" in line and str(fake.repo.root) in line, line
    assert "signature" in line, line
    fake.assert_clean(lock=False)


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_signed_by_untrusted_key(fake: FakeSetup, command: str) -> None:
    resign(fake.repo, fake.keys.other)
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert "repository fixture" in line and str(fake.repo.root) in line, line
    assert "signature" in line, line
    fake.assert_clean(lock=False)


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_unsigned_repository(fake: FakeSetup, command: str) -> None:
    make_repo(fake.repo.root, [])          # republished without a key: no InRelease, no Release.gpg
    assert not (fake.repo.dist_dir / "InRelease").exists()
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert "repository fixture" in line and str(fake.repo.root) in line, line
    # The reason, not any exit-4 error (a repository that merely fails to resolve is exit 4 too).
    assert "Release file is not signed (vztt accepts signed repositories only)" in line, line
    fake.assert_clean(lock=False)


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_changed_packages_under_a_valid_release(fake: FakeSetup, command: str) -> None:
    """Packages edited after Release was signed (a mirror serving a stale or forged index
    under a valid signature): its hash no longer matches the signed Release."""
    import gzip
    import lzma
    bindir = fake.repo.dist_dir / "main" / f"binary-{fake.repo.arch}"
    text = (bindir / "Packages").read_text()
    assert "\nVersion: 1.0-1\n" in text
    forged = text.replace("\nVersion: 1.0-1\n", "\nVersion: 9.0-1\n", 1).encode()      # libfix1, newer
    (bindir / "Packages").write_bytes(forged)
    (bindir / "Packages.gz").write_bytes(gzip.compress(forged))
    (bindir / "Packages.xz").write_bytes(lzma.compress(forged))
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert line.startswith("vztt: resolve error: ") and "repository fixture" in line, line
    assert "an index does not match the signed Release (Hash Sum mismatch)" in line, line
    fake.assert_clean(lock=False)


def test_bad_signature_after_a_good_resolve(fake: FakeSetup) -> None:
    """apt keeps the old lists and only warns, unless told otherwise: vztt must still refuse."""
    assert fake.vztt("resolve", FAKE).returncode == 0
    lock_before = fake.lock().read_bytes()
    tamper_release(fake.repo)
    line = fails(fake.vztt("resolve", FAKE), EXIT_RESOLVE)
    assert "repository fixture" in line and "signature" in line, line
    assert fake.lock().read_bytes() == lock_before
    fake.assert_clean()


def test_bad_signature_names_the_right_suite(fake: FakeSetup) -> None:
    """Two repositories on one mirror (as Debian's main and updates): the message names the bad one."""
    updates = publish_suites(fake.repo.root, {}, ["stable-updates"], fake.keys.good)["stable-updates"]
    text = (fake.recipes / f"{FAKE}.toml").read_text()
    text += '\n[[repositories]]\nname = "fixture-updates"\nurl = "$FIXTURE_MIRROR"\n' \
            'suite = "stable-updates"\ncomponents = ["main"]\nkeyring = "fixture.gpg"\n'
    (fake.recipes / f"{FAKE}.toml").write_text(text)
    assert fake.vztt("resolve", FAKE).returncode == 0
    tamper_release(updates)
    line = fails(fake.vztt("resolve", FAKE), EXIT_RESOLVE)
    assert "repository fixture-updates" in line and "stable-updates" in line, line


def test_mirror_path_with_underscore(fake: FakeSetup, tmp_path: Path) -> None:
    """A mirror at file:///srv/my_mirror (or http://host/~user/debian) is a mirror like any other."""
    moved = tmp_path / "my_mirror"
    shutil.copytree(fake.repo.root, moved)
    r = run_vztt("resolve", FAKE, cache=fake.cache, recipes=fake.recipes,
                 env={**fake.env, "VZTT_MIRROR_FIXTURE_MIRROR": "file://" + str(moved)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_missing_dependency(fake: FakeSetup, command: str) -> None:
    fake.recipe(["fixapp", "broken"])
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert line.startswith("vztt: resolve error: ")
    assert FAKE in line, line
    fake.assert_clean(lock=False)


def test_missing_dependency_is_named(fake: FakeSetup) -> None:
    fake.recipe(["fixapp", "broken"])
    line = fails(fake.vztt("resolve", FAKE), EXIT_RESOLVE)
    assert "broken" in line and "no-such-library" in line, line


@pytest.mark.parametrize("command", ["resolve", "build"])
def test_unknown_package(fake: FakeSetup, command: str) -> None:
    fake.recipe(["fixapp", "no-such-package-anywhere"])
    line = fails(fake.vztt(command, FAKE), EXIT_RESOLVE)
    assert "no-such-package-anywhere" in line, line
    fake.assert_clean(lock=False)


def test_wrong_sha256_fails_the_fetch(fake: FakeSetup) -> None:
    indexed = next(p for p in _packages_index(fake.repo) if p["Package"] == "libfix1")
    path = tamper_deb(fake.repo, "libfix1")
    tampered = sha256_file(path)
    assert tampered != indexed["SHA256"]
    line = fails(fake.vztt("build", FAKE), EXIT_FETCH)
    assert line.startswith("vztt: fetch error: ")
    assert "libfix1" in line and "sha256" in line, line
    assert str(path) in line or indexed["Filename"] in line, line
    fake.assert_clean()
    assert not cached_package(fake.packages, indexed["SHA256"]).exists()
    assert not cached_package(fake.packages, tampered).exists()


def test_locked_build_when_the_pinned_version_left_the_pool(fake: FakeSetup, tmp_path: Path) -> None:
    assert fake.vztt("resolve", FAKE).returncode == 0
    lock = json.loads(fake.lock().read_text())
    pinned = next(p for p in lock["packages"] if p["name"] == "libfix1")
    pool_file = fake.repo.root / pinned["filename"]
    assert pool_file.is_file()
    # The archive moves on: a newer libfix1 is published and the pinned one removed from the pool.
    newer = build_deb(FakePackage("libfix1", version="1.1-1", arch="amd64"), tmp_path / "newer")
    pool_file.unlink()
    make_repo(fake.repo.root, [newer], key=fake.keys.good)
    assert list(fake.packages.glob("sha256/*/*")) == []
    line = fails(fake.vztt("build", FAKE, "--locked"), EXIT_FETCH)
    assert line.startswith("vztt: fetch error: ")
    assert "libfix1" in line and pinned["version"] in line, line
    assert str(pool_file) in line, line          # the URL it was looked for at
    fake.assert_clean()
    assert json.loads(fake.lock().read_text()) == lock      # --locked never rewrites the lock


def test_resolve_reports_changes(fake: FakeSetup, tmp_path: Path) -> None:
    first = fake.vztt("resolve", FAKE)
    assert first.returncode == 0, first.stderr
    assert "(no previous lock)" in first.stdout
    old_lock = tmp_path / "old.lock.json"
    shutil.copyfile(fake.lock(), old_lock)

    again = fake.vztt("resolve", FAKE)
    assert again.returncode == 0, again.stderr
    assert "no changes" in again.stdout

    newer = build_deb(FakePackage("libfix1", version="1.1-1", arch="amd64"), tmp_path / "newer")
    make_repo(fake.repo.root, [newer], key=fake.keys.good)
    text = fake.vztt("resolve", FAKE)
    assert text.returncode == 0, text.stderr
    assert "~ libfix1 1.0-1 -> 1.1-1" in text.stdout.splitlines(), text.stdout
    assert not [l for l in text.stdout.splitlines() if l[:2] in ("+ ", "- ")], text.stdout

    # --json, against the first lock (kept aside): the same change, as data
    doc = fake.vztt("resolve", FAKE, "--json", "--lock", str(old_lock))
    assert doc.returncode == 0, doc.stderr
    changes = doc.json()["changes"]
    assert changes["changed"] == [{"name": "libfix1", "old": "1.0-1", "new": "1.1-1"}]
    assert changes["added"] == [] and changes["removed"] == []
    assert json.loads(old_lock.read_text())["packages"] == json.loads(fake.lock().read_text())["packages"]


def _packages_index(repo: Repo) -> list[dict[str, str]]:
    from debian import deb822
    with open(repo.packages_file()) as fh:
        return [dict(p) for p in deb822.Packages.iter_paragraphs(fh, use_apt_pkg=False)]


# ==========================================================================
# 2. real installs from a mini distribution of real Debian packages
# ==========================================================================

UBUNTU = "ubuntu-fixture"
UBUNTU_SUITES = ["noble", "noble-updates", "noble-security"]
NETPLAN = FakePackage(
    "netplan.io", version="1.0-0fixture1", arch="amd64", depends="iproute2", priority="optional",
    files={"/usr/share/doc/netplan.io/README.fixture": "synthetic netplan.io for vztt's tests\n",
           "/etc/netplan/README.fixture": "network configuration goes here\n"},
)
WANTED = ("./var/lib/dpkg/status", "./etc/apt/sources.list", "./etc/machine-id")
# The URL the template ships (the recipe's image_url): containers do not see the build's mirror.
PUBLIC_UBUNTU = "http://archive.example.invalid/ubuntu"


@dataclass
class MiniDist:
    root: Path
    repos: dict[str, Repo]
    key: GpgKey
    debian_lock: dict

    @property
    def url(self) -> str:
        return "file://" + str(self.root)


@pytest.fixture(scope="session")
def minidist(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> MiniDist:
    """The packages of the real Debian 12 build plus a synthetic netplan.io, as noble{,-updates,-security}."""
    tmp = tmp_path_factory.mktemp("minidist")
    key = make_gpg_key(tmp / "key", "minidist <minidist@example.invalid>")
    debs = stage_locked_debs(debian12.lock, PACKAGE_CACHE, tmp / "debs")
    debs.append(build_deb(NETPLAN, tmp / "debs"))
    repos = publish_suites(tmp / "repo", {"main": debs}, UBUNTU_SUITES, key, components=("main", "universe"))
    return MiniDist(root=(tmp / "repo").resolve(), repos=repos, key=key, debian_lock=debian12.lock)


@dataclass
class UbuntuBuild:
    recipes: Path
    cache: Path
    packages: Path
    dist: MiniDist
    first: Result                 # the first, successful `vztt build --json`
    archive_info: Archive | None  # what the first build's archive holds

    @property
    def env(self) -> dict[str, str]:
        return {"VZTT_MIRROR_UBUNTU_MIRROR": self.dist.url, "VZTT_PACKAGE_CACHE": str(self.packages),
                "VZTT_MIRROR_UBUNTU_MIRROR_PUBLIC": PUBLIC_UBUNTU}

    def vztt(self, *args: str) -> Result:
        return run_vztt(*args, cache=self.cache, recipes=self.recipes, env=self.env, timeout=900)

    def build(self, *args: str) -> Result:
        # --no-test: these Debian packages under Ubuntu's name would fail the recipe's os-release
        # smoke check, and booting is tests/test_boottest.py's subject; here it would only add time.
        return self.vztt("build", UBUNTU, "--no-test", *args)

    @property
    def archive(self) -> Path:
        return self.cache / f"{UBUNTU}.plain.tar.lz4"

    @property
    def manifest(self) -> Path:
        return self.cache / f"{UBUNTU}.manifest.json"

    @property
    def lock(self) -> dict:
        return json.loads((self.cache / "locks" / f"{UBUNTU}.lock.json").read_text())

    @property
    def leaf(self) -> Path:
        return self.recipes / f"{UBUNTU}.toml"


LEAF = fixture_leaf("ubuntu-24.04-x86_64-minimal", "Ubuntu 24.04")


@pytest.fixture(scope="module")
def ubuntu(minidist: MiniDist, tmp_path_factory: pytest.TempPathFactory) -> UbuntuBuild:
    tmp = tmp_path_factory.mktemp("ubuntu")
    recipes = tmp / "recipes"
    (recipes / "keys").mkdir(parents=True)
    for f in ("ubuntu.toml", "ubuntu-24.04-x86_64-minimal.toml"):
        shutil.copyfile(RECIPES / f, recipes / f)
    shutil.copytree(RECIPES / "files", recipes / "files")
    # ubuntu.toml names Ubuntu's keyring: it must exist for the parent to validate.
    shutil.copyfile(RECIPES / "keys" / "ubuntu-archive-keyring.gpg", recipes / "keys" / "ubuntu-archive-keyring.gpg")
    shutil.copyfile(minidist.key.keyring, recipes / "keys" / "fixture.gpg")
    (recipes / f"{UBUNTU}.toml").write_text(LEAF)
    b = UbuntuBuild(recipes=recipes, cache=tmp / "cache", packages=tmp / "packages", dist=minidist,
                    first=Result(0, "", ""), archive_info=None)
    b.first = b.build("--json")
    assert b.first.returncode == 0, b.first.stderr
    b.archive_info = read_archive(b.archive, WANTED)
    return b


def fetch_line(stderr: str) -> re.Match[str]:
    m = re.search(r"^\s*fetch\s.*\bok\s+(\d+) packages: (\d+) cached, (\d+) fetched", stderr, re.M)
    assert m, stderr
    return m


@pytest.mark.network
def test_ubuntu_recipe_builds_from_a_local_mirror(ubuntu: UbuntuBuild) -> None:
    doc = ubuntu.first.json()
    assert Path(doc["archive"]) == ubuntu.archive and ubuntu.archive.is_file()
    manifest = json.loads(ubuntu.manifest.read_text())
    assert manifest["distro"] == "ubuntu" and manifest["release"] == "noble" and manifest["version"] == "24.04"
    assert manifest["archive"]["sha256"] == sha256_file(ubuntu.archive)
    lock = ubuntu.lock
    assert {r["suite"] for r in lock["repositories"]} == set(UBUNTU_SUITES)
    locked = {p["name"]: p for p in lock["packages"]}
    assert locked["netplan.io"]["version"] == NETPLAN.version
    assert "ifupdown" not in locked           # Debian's choice, not Ubuntu's recipe's

    a = ubuntu.archive_info
    for path in ("./usr/bin/dpkg", "./usr/bin/apt"):
        assert path in a.members, path
    status = dpkg_status(a.text("./var/lib/dpkg/status"))
    assert status["netplan.io"]["Status"] == "install ok installed"
    not_installed = {n: status.get(n, {}).get("Status") for n, p in locked.items()
                     if status.get(n, {}).get("Status") != "install ok installed"
                     or status[n]["Version"] != p["version"]}
    assert not_installed == {}
    assert manifest["package_count"] == len(status)

    sources = a.text("./etc/apt/sources.list")
    assert "file:" not in sources and str(ubuntu.dist.root) not in sources, sources
    assert [n for n in a.members if n.startswith("./etc/ssh/ssh_host_")] == []
    assert "./etc/ssh/sshd_config" in a.members or "./etc/ssh/sshd_config.d" in a.members
    assert a.members["./etc/machine-id"].size == 0 and a.contents["./etc/machine-id"] == b""
    assert "./etc/systemd/system/vztt-ssh-keygen.service" in a.members
    assert leftovers(ubuntu.cache) == []


@pytest.mark.network
def test_second_build_downloads_nothing(ubuntu: UbuntuBuild) -> None:
    before = json.loads(ubuntu.manifest.read_text())
    r = ubuntu.build("--json")
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert "fetch" in doc, f"`vztt build --json` carries no fetch statistics: {sorted(doc)}"
    packages = len(ubuntu.lock["packages"])
    assert doc["fetch"]["cached"] == packages, doc["fetch"]
    assert doc["fetch"]["downloaded"] == 0 and doc["fetch"]["bytes_downloaded"] == 0, doc["fetch"]
    after = json.loads(ubuntu.manifest.read_text())
    assert after["lock_digest"] == before["lock_digest"]
    # One lock, one set of bytes (README: the archive is reproducible).
    assert after["archive"]["sha256"] == before["archive"]["sha256"]
    assert leftovers(ubuntu.cache) == []


@pytest.mark.network
def test_corrupted_cached_package_is_fetched_again(ubuntu: UbuntuBuild) -> None:
    victim = next(p for p in ubuntu.lock["packages"] if p["name"] == "less")
    path = cached_package(ubuntu.packages, victim["sha256"])
    assert sha256_file(path) == victim["sha256"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                     # same size, one bit off
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3_600_000_000_000))
    assert sha256_file(path) != victim["sha256"]

    r = ubuntu.build()
    assert r.returncode == 0, r.stderr
    total, cached, fetched = map(int, fetch_line(r.stderr).groups())
    assert (cached, fetched) == (total - 1, 1)
    assert path.is_file() and sha256_file(path) == victim["sha256"]
    assert leftovers(ubuntu.cache) == []


def _template_bytes(b: UbuntuBuild) -> tuple[bytes, bytes]:
    return b.archive.read_bytes(), b.manifest.read_bytes()


def _assert_previous_template_kept(b: UbuntuBuild, before: tuple[bytes, bytes]) -> None:
    assert _template_bytes(b) == before
    assert list(b.cache.glob("*-old")) == []
    assert leftovers(b.cache) == []
    listed = b.vztt("list", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in listed.json() if r["name"] == UBUNTU)
    assert row["cached"] and row["archive"] == str(b.archive)


@pytest.mark.network
def test_failed_fetch_keeps_the_previous_template(ubuntu: UbuntuBuild, tmp_path: Path) -> None:
    before = _template_bytes(ubuntu)
    dist = ubuntu.dist
    saved = tmp_path / "dists"
    shutil.copytree(dist.root / "dists", saved)
    newer = build_deb(FakePackage(NETPLAN.name, version="1.1-0fixture1", arch="amd64", depends="iproute2"),
                      tmp_path / "debs")
    published = publish_suites(dist.root, {"main": [newer]}, UBUNTU_SUITES, dist.key, components=("main", "universe"))
    pool_file = tamper_deb(published["noble"], NETPLAN.name)
    try:
        r = ubuntu.build()
        line = fails(r, EXIT_FETCH)
        assert "netplan.io 1.1-0fixture1" in line and "sha256" in line, line
        _assert_previous_template_kept(ubuntu, before)
    finally:
        pool_file.unlink()
        shutil.rmtree(dist.root / "dists")
        shutil.copytree(saved, dist.root / "dists")


@pytest.mark.network
def test_failed_hook_keeps_the_previous_template(ubuntu: UbuntuBuild) -> None:
    before = _template_bytes(ubuntu)
    leaf = ubuntu.leaf.read_text()
    ubuntu.leaf.write_text(leaf + '\n[[hooks]]\nname = "fails"\nrun = "exit 3"\n')
    try:
        r = ubuntu.build()
        line = fails(r, EXIT_BUILD)
        assert line.startswith("vztt: build error: ") and "hook fails" in line, line
        assert "customize" in r.stderr and "FAILED" in r.stderr
        _assert_previous_template_kept(ubuntu, before)
    finally:
        ubuntu.leaf.write_text(leaf)


# ==========================================================================
# 3. what a template ships, and what an image can make vztt write
# ==========================================================================

@pytest.mark.network
def test_the_template_ships_its_public_url_whatever_the_build_mirror(ubuntu: UbuntuBuild, tmp_path: Path) -> None:
    """The same lock built from two mirrors (file:// and a loopback nginx serving the same
    repository) with the same shipped URL: the same bytes, and sources.list names the shipped URL."""
    from nginx import Nginx
    first = tmp_path / "first.tar.lz4"              # built from file://<minidist> by the fixture
    shutil.copyfile(ubuntu.archive, first)
    (tmp_path / "www-mirror").symlink_to(ubuntu.dist.root)
    with Nginx(tmp_path) as web:
        r = run_vztt("build", UBUNTU, "--no-test", cache=ubuntu.cache, recipes=ubuntu.recipes, timeout=900,
                     env={**ubuntu.env, "VZTT_MIRROR_UBUNTU_MIRROR": web.url("mirror").rstrip("/")})
        assert r.returncode == 0, r.stderr
        assert any("/mirror/dists/noble/InRelease" in line for line in web.access_log())   # it was the mirror used
    assert {x["url"] for x in ubuntu.lock["repositories"]} == {"$UBUNTU_MIRROR"}
    assert ubuntu.archive.read_bytes() == first.read_bytes()
    sources = read_archive(first, ("./etc/apt/sources.list",)).text("./etc/apt/sources.list")
    assert f"deb {PUBLIC_UBUNTU} noble main universe" in sources.splitlines(), sources
    assert "127.0.0.1" not in sources and "file:" not in sources


EVIL_SOURCES = "evil-sources"       # in the host directory: what a planted /etc/apt/sources.list points at


@pytest.mark.network
def test_links_planted_in_the_image_do_not_reach_the_host(ubuntu: UbuntuBuild, tmp_path: Path) -> None:
    """A package's postinst plants /etc/apt/sources.list -> a host file and /etc/vztt-evil -> a host
    directory; a hook plants /tmp and /var/lib/dbus -> host directories. vztt then writes the
    sources, a setuid recipe file under /etc/vztt-evil, empties /tmp and removes
    /var/lib/dbus/machine-id: all of it in the image, none on the host."""
    host = tmp_path / "host"
    (host / "dir").mkdir(parents=True)
    # Where /etc/vztt-evil points: a host directory outside /tmp, because the hook below
    # replaces the image's /tmp (and with it whatever vztt wrote there, resolved inside).
    elsewhere = Path(tempfile.mkdtemp(prefix="vztt-evil-", dir="/var/tmp"))
    (host / EVIL_SOURCES).write_text("host file\n")
    (host / "dir" / "machine-id").write_text("host machine id\n")
    (host / "dir" / "keep-me").write_text("host file\n")
    def state() -> dict[str, tuple[int, bytes]]:
        return {str(p): (p.lstat().st_mode, p.read_bytes() if p.is_file() else b"")
                for top in (host, elsewhere) for p in top.rglob("*")}
    before = state()
    evil = FakePackage("fixture-evil", postinst=f"ln -sfn {host / EVIL_SOURCES} /etc/apt/sources.list\n"
                                               f"ln -sfn {elsewhere} /etc/vztt-evil\n")
    repo = make_repo(tmp_path / "evil-repo", [build_deb(evil, tmp_path / "debs")], key=ubuntu.dist.key)
    leaf = ubuntu.recipes / "ubuntu-evil.toml"
    leaf.write_text(f"""extends = "{UBUNTU}"
[packages]
include = ["fixture-evil"]
[[repositories]]
name = "evil"
url = "$EVIL_MIRROR"
suite = "stable"
keyring = "fixture.gpg"
image_sources = false
[[files]]
path = "/etc/vztt-evil/tool"
content = "#!/bin/sh\\n"
mode = "4755"
[[hooks]]
name = "plant"
run = "rm -rf /tmp /var/lib/dbus && ln -s {host / 'dir'} /tmp && ln -s {host / 'dir'} /var/lib/dbus"
""")
    try:
        r = run_vztt("build", "ubuntu-evil", "--no-test", "--json", cache=tmp_path / "cache", recipes=ubuntu.recipes,
                     env={**ubuntu.env, "VZTT_MIRROR_EVIL_MIRROR": repo.url}, timeout=900)
        assert r.returncode == 0, r.stderr
        assert state() == before
    finally:
        leaf.unlink()
        shutil.rmtree(elsewhere, ignore_errors=True)
    a = read_archive(Path(r.json()["archive"]), ("./etc/apt/sources.list",))
    assert a.members["./etc/apt/sources.list"].isfile()                  # the link was replaced, not written through
    assert f"deb {PUBLIC_UBUNTU} noble main universe" in a.text("./etc/apt/sources.list")
    tool = a.members["./" + str(elsewhere / "tool").lstrip("/")]        # /etc/vztt-evil resolved inside the image
    assert tool.isfile() and tool.mode == 0o4755
    assert a.members["./tmp"].issym() and a.members["./var/lib/dbus"].issym()


def test_status_all_goes_on_past_a_template_that_is_not_configured(fake: FakeSetup) -> None:
    """A recipe whose mirror variable has no value here is `not configured`; the others are checked."""
    text = (fake.recipes / f"{FAKE}.toml").read_text().replace("$FIXTURE_MIRROR", "$NOT_SET_ANYWHERE_MIRROR")
    (fake.recipes / "elsewhere.toml").write_text(text)
    r = fake.vztt("status", "--all", "--json")
    assert r.returncode == 2, r.stderr                         # fixture-mini is not built: an update is due
    states = {row["name"]: row for row in r.json()}
    assert states[FAKE]["state"] == "not built"
    assert states["elsewhere"]["state"] == "not configured"
    assert "$NOT_SET_ANYWHERE_MIRROR" in states["elsewhere"]["reasons"][0]
    text_out = fake.vztt("status", "--all")
    assert "elsewhere: not configured" in text_out.stdout and "Traceback" not in text_out.stderr
    # Named, it is the user's request that cannot be met: one line, exit 3.
    line = fails(fake.vztt("status", "elsewhere"), 3)
    assert "NOT_SET_ANYWHERE_MIRROR" in line


def test_an_unset_shipped_url_stops_the_build_before_any_work(fake: FakeSetup) -> None:
    path = fake.recipes / f"{FAKE}.toml"
    path.write_text(path.read_text().replace('url = "$FIXTURE_MIRROR"\n',
                                             'url = "$FIXTURE_MIRROR"\nimage_url = "$FIXTURE_PUBLIC_UNSET"\n'))
    line = fails(fake.vztt("build", FAKE), 3)
    assert "repositories[fixture].image_url" in line and "$FIXTURE_PUBLIC_UNSET is not set" in line, line
    fake.assert_clean(lock=False)
