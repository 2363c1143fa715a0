"""Prove tests/aptrepo.py builds repositories that the real apt accepts or rejects.

apt runs against a throwaway state directory selected with APT_CONFIG, so the
host's sources, lists, keyrings and dpkg status are never read or touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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

REQUIRED_TOOLS = ["apt-get", "apt-ftparchive", "dpkg-deb", "dpkg", "gpg", "gpgv", "gpgconf"]
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in REQUIRED_TOOLS),
    reason="needs apt, apt-utils, dpkg, gpg, gpgv",
)


# --------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class Keys:
    good: GpgKey
    other: GpgKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    # RSA key generation dominates the run time: do it once per module.
    d = tmp_path_factory.mktemp("keys")
    return Keys(good=make_gpg_key(d), other=make_gpg_key(d, "other <other@example.invalid>"))


class Apt:
    """apt-get/apt-cache confined to a private state directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        for sub in ("state/lists/partial", "cache/archives/partial", "etc/sources.list.d",
                    "etc/apt.conf.d", "etc/preferences.d", "etc/trusted.gpg.d", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "status").touch()
        s = str(base)
        self.config = base / "apt.conf"
        self.config.write_text(
            f'Dir "/";\n'
            f'Dir::State "{s}/state/";\n'
            f'Dir::State::status "{s}/status";\n'
            f'Dir::Etc "{s}/etc/";\n'
            f'Dir::Etc::SourceList "{s}/etc/sources.list";\n'
            f'Dir::Etc::SourceParts "{s}/etc/sources.list.d/";\n'
            f'Dir::Etc::Parts "{s}/etc/apt.conf.d/";\n'
            f'Dir::Etc::Preferences "{s}/etc/preferences";\n'
            f'Dir::Etc::PreferencesParts "{s}/etc/preferences.d/";\n'
            f'Dir::Etc::TrustedParts "{s}/etc/trusted.gpg.d/";\n'
            f'Dir::Etc::Trusted "{s}/etc/trusted.gpg";\n'
            f'Dir::Cache "{s}/cache/";\n'
            f'Dir::Log "{s}/log/";\n'
            'APT::Architecture "amd64";\n'
            'APT::Architectures "amd64";\n'
            'Acquire::Languages "none";\n'
            'APT::Install-Recommends "false";\n'
            # pytest's tmp dirs are 0700 root: apt's _apt sandbox (which also
            # runs gpgv) could not read the signed-by keyring and would report
            # a misleading NO_PUBKEY.  Tests run as root anyway.
            'APT::Sandbox::User "root";\n'
        )

    def set_source(self, repo: Repo, keyring: Path | None = None) -> None:
        keyring = keyring or (repo.key.keyring if repo.key else None)
        opts = f"[signed-by={keyring}] " if keyring else ""
        (self.base / "etc/sources.list").write_text(
            f"deb {opts}{repo.url} {repo.suite} {' '.join(repo.components)}\n")

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, APT_CONFIG=str(self.config), LC_ALL="C")
        return subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True)

    def update(self) -> subprocess.CompletedProcess:
        return self.run("apt-get", "update", "-q")

    def print_uris(self, *pkgs: str, hash_type: str | None = "SHA256") -> list[tuple[str, str, int, str]]:
        """(uri, file name, size, "TYPE:hex") per .deb apt would fetch."""
        extra = ["-o", f"Acquire::ForceHash={hash_type}"] if hash_type else []
        proc = self.run("apt-get", "install", "--print-uris", "-qq", "-y", *extra, *pkgs)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = []
        for line in proc.stdout.splitlines():
            uri, name, size, digest = line.split()
            rows.append((uri.strip("'"), name, int(size), digest))
        return rows


@pytest.fixture
def apt(tmp_path: Path) -> Apt:
    return Apt(tmp_path / "apt")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def packages_entries(repo: Repo, component: str = "main") -> list[dict[str, str]]:
    from debian import deb822

    with open(repo.packages_file(component)) as fh:
        return [dict(p) for p in deb822.Packages.iter_paragraphs(fh, use_apt_pkg=False)]


BASE_PKGS = [
    FakePackage("foo", depends="bar (>= 1:2.0)", files={"/usr/share/foo/readme": "foo\n"}),
    FakePackage("bar", version="1:2.0", arch="amd64", provides="mta"),
    FakePackage("baz", depends="mta"),
    FakePackage("libqux1", version="0.5-1"),
    FakePackage("armonly", arch="arm64"),  # must not reach binary-amd64
]


@pytest.fixture
def signed_repo(tmp_path: Path, keys: Keys) -> Repo:
    debs = build_debs(BASE_PKGS, tmp_path / "debs")
    return make_repo(tmp_path / "repo", debs, key=keys.good)


# --------------------------------------------------------------------------
# build_deb


def test_build_deb_fields_and_contents(tmp_path: Path) -> None:
    pkg = FakePackage(
        "corepkg", version="2:1.2-3", arch="amd64", essential=True, priority="required",
        provides="virt1, virt2", depends="libc6", pre_depends="dpkg (>= 1.0)", conflicts="old",
        files={"/usr/bin/corepkg": b"\x7fELF...", "/etc/corepkg.conf": "a=1\n"},
        postinst='echo configured "$1"',
    )
    deb = build_deb(pkg, tmp_path / "out")
    assert deb.name == "corepkg_1.2-3_amd64.deb"  # no epoch in the file name

    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert field("Package") == "corepkg"
    assert field("Version") == "2:1.2-3"
    assert field("Architecture") == "amd64"
    assert field("Essential") == "yes"
    assert field("Priority") == "required"
    assert field("Provides") == "virt1, virt2"
    assert field("Depends") == "libc6"
    assert field("Pre-Depends") == "dpkg (>= 1.0)"
    assert field("Conflicts") == "old"

    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    entries = {line.split()[-1]: line.split()[:2] for line in listing.splitlines()}
    assert entries["./usr/bin/corepkg"] == ["-rw-r--r--", "root/root"]
    assert entries["./etc/corepkg.conf"] == ["-rw-r--r--", "root/root"]
    assert entries["./usr/bin/"] == ["drwxr-xr-x", "root/root"]

    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True,
                          check=True).stdout
    assert "postinst" in info
    postinst = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True,
                              check=True).stdout
    assert b"#!/bin/sh" in postinst


def test_build_deb_is_deterministic(tmp_path: Path) -> None:
    pkg = FakePackage("same", files={"/a/b": "x", "/c": b"\0\1"}, postinst="true")
    first = build_deb(pkg, tmp_path / "one")
    second = build_deb(pkg, tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()


def test_build_deb_installs_with_dpkg(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    debs = build_debs([
        FakePackage("dep"),
        FakePackage("app", depends="dep", files={"/usr/share/app/data": "payload"},
                    # chrootless: dpkg runs the script on the host with DPKG_ROOT set
                    postinst='touch "$DPKG_ROOT/postinst-ran"'),
    ], tmp_path / "debs")
    proc = subprocess.run(
        ["dpkg", f"--root={root}", "--force-not-root", "--force-script-chrootless",
         "--install", *map(str, debs)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "usr/share/app/data").read_text() == "payload"
    assert (root / "postinst-ran").exists()
    status = (root / "var/lib/dpkg/status").read_text()
    assert status.count("Status: install ok installed") == 2


# --------------------------------------------------------------------------
# repository layout and signatures


def test_repo_layout(signed_repo: Repo) -> None:
    dist = signed_repo.dist_dir
    for name in ("Release", "InRelease", "Release.gpg",
                 "main/binary-amd64/Packages", "main/binary-amd64/Packages.gz",
                 "main/binary-amd64/Packages.xz"):
        assert (dist / name).is_file(), name
    release = (dist / "Release").read_text()
    for line in ("Origin: Fixture", "Label: Fixture", "Suite: stable", "Codename: stable",
                 "Architectures: amd64", "Components: main",
                 "Date: Sat, 01 Jun 2024 00:00:00 UTC"):
        assert line in release.splitlines()
    entries = {e["Package"]: e for e in packages_entries(signed_repo)}
    # arch:all packages are listed in binary-amd64; arm64 ones are not
    assert set(entries) == {"foo", "bar", "baz", "libqux1"}
    assert entries["libqux1"]["Filename"] == "pool/main/libq/libqux1/libqux1_0.5-1_all.deb"
    for e in entries.values():
        pool_file = signed_repo.root / e["Filename"]
        assert e["SHA256"] == sha256(pool_file)
        assert int(e["Size"]) == pool_file.stat().st_size


def test_gpgv_accepts_good_repo(signed_repo: Repo, keys: Keys) -> None:
    dist = signed_repo.dist_dir
    ok = subprocess.run(["gpgv", "--keyring", str(keys.good.keyring), str(dist / "InRelease")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    detached = subprocess.run(["gpgv", "--keyring", str(keys.good.keyring),
                               str(dist / "Release.gpg"), str(dist / "Release")],
                              capture_output=True, text=True)
    assert detached.returncode == 0, detached.stderr
    wrong = subprocess.run(["gpgv", "--keyring", str(keys.other.keyring), str(dist / "InRelease")],
                           capture_output=True, text=True)
    assert wrong.returncode != 0


def test_apt_update_and_print_uris(signed_repo: Repo, apt: Apt) -> None:
    apt.set_source(signed_repo)
    proc = apt.update()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "W:" not in proc.stderr and "E:" not in proc.stderr, proc.stderr

    rows = apt.print_uris("foo")
    by_name = {r[1]: r for r in rows}
    # the epoch is URL-encoded (%3a) in apt's archive file name, absent from the pool name
    assert set(by_name) == {"foo_1.0_all.deb", "bar_1%3a2.0_amd64.deb"}
    pool = {
        "foo_1.0_all.deb": signed_repo.root / "pool/main/f/foo/foo_1.0_all.deb",
        "bar_1%3a2.0_amd64.deb": signed_repo.root / "pool/main/b/bar/bar_2.0_amd64.deb",
    }
    for name, path in pool.items():
        uri, _, size, digest = by_name[name]
        # file:// sources are printed as "file:/abs/path" (single slash)
        assert uri == "file:" + str(path)
        assert size == path.stat().st_size
        assert digest == "SHA256:" + sha256(path)

    # Without ForceHash, install --print-uris prints the MD5Sum of the index.
    plain = apt.print_uris("foo", hash_type=None)
    assert {r[3].split(":")[0] for r in plain} == {"MD5Sum"}

    # virtual package: baz depends on "mta", provided only by bar
    assert {r[1] for r in apt.print_uris("baz")} == {"baz_1.0_all.deb", "bar_1%3a2.0_amd64.deb"}
    # a lone virtual package with one provider is installable by its name
    assert {r[1] for r in apt.print_uris("mta")} == {"bar_1%3a2.0_amd64.deb"}


def test_apt_download_checks_hashes(signed_repo: Repo, apt: Apt, tmp_path: Path) -> None:
    apt.set_source(signed_repo)
    assert apt.update().returncode == 0
    dl = tmp_path / "dl"
    dl.mkdir()
    ok = apt.run("apt-get", "download", "-q", "foo", cwd=dl)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (dl / "foo_1.0_all.deb").is_file()

    entry = next(e for e in packages_entries(signed_repo) if e["Package"] == "libqux1")
    size_before = (signed_repo.root / entry["Filename"]).stat().st_size
    path = tamper_deb(signed_repo, "libqux1")
    assert path == signed_repo.root / entry["Filename"]
    assert path.stat().st_size == size_before
    assert sha256(path) != entry["SHA256"]
    # still a well-formed .deb: only the checksum gives it away
    subprocess.run(["dpkg-deb", "-f", str(path), "Package"], check=True, capture_output=True)

    bad = apt.run("apt-get", "download", "-q", "libqux1", cwd=dl)
    assert bad.returncode != 0
    assert "Hash Sum mismatch" in bad.stdout + bad.stderr
    assert not (dl / "libqux1_0.5-1_all.deb").exists()


def test_tampered_release_is_rejected(signed_repo: Repo, apt: Apt, keys: Keys) -> None:
    tamper_release(signed_repo)
    assert "Origin: FixturE" in (signed_repo.dist_dir / "InRelease").read_text()
    gpgv = subprocess.run(["gpgv", "--keyring", str(keys.good.keyring),
                           str(signed_repo.dist_dir / "InRelease")], capture_output=True, text=True)
    assert gpgv.returncode != 0
    apt.set_source(signed_repo)
    proc = apt.update()
    assert proc.returncode != 0
    assert "BADSIG" in proc.stderr
    assert "is not signed" in proc.stderr
    assert apt.run("apt-get", "install", "--print-uris", "-qq", "-y", "foo").returncode != 0


def test_tampered_release_after_good_update_only_warns(signed_repo: Repo, apt: Apt) -> None:
    # Documents an apt trap: once good lists exist, a bad signature is only a
    # warning (exit 0) and the previous indexes keep being used.
    apt.set_source(signed_repo)
    assert apt.update().returncode == 0
    tamper_release(signed_repo)
    proc = apt.update()
    assert proc.returncode == 0
    assert "BADSIG" in proc.stderr and "W:" in proc.stderr
    # ... unless the caller asks apt to turn warnings into errors.
    strict = apt.run("apt-get", "update", "-q", "--error-on=any")
    assert strict.returncode != 0


def test_signed_by_untrusted_key_is_rejected(signed_repo: Repo, apt: Apt, keys: Keys) -> None:
    resign(signed_repo, keys.other)
    assert signed_repo.key is keys.other
    apt.set_source(signed_repo, keyring=keys.good.keyring)
    proc = apt.update()
    assert proc.returncode != 0
    assert "NO_PUBKEY" in proc.stderr
    # ... and trusting the new key makes the same repo valid again
    apt.set_source(signed_repo, keyring=keys.other.keyring)
    ok = apt.update()
    assert ok.returncode == 0, ok.stderr


def test_unsigned_repo_is_rejected(tmp_path: Path, apt: Apt) -> None:
    repo = make_repo(tmp_path / "repo", build_debs(BASE_PKGS[:2], tmp_path / "debs"))
    assert not (repo.dist_dir / "InRelease").exists()
    assert not (repo.dist_dir / "Release.gpg").exists()
    apt.set_source(repo)
    proc = apt.update()
    assert proc.returncode != 0
    assert "is not signed" in proc.stderr


def test_republish_newer_version(signed_repo: Repo, apt: Apt, keys: Keys, tmp_path: Path) -> None:
    apt.set_source(signed_repo)
    assert apt.update().returncode == 0
    assert [r[1] for r in apt.print_uris("libqux1")] == ["libqux1_0.5-1_all.deb"]

    newer = build_deb(FakePackage("libqux1", version="0.6-1"), tmp_path / "debs2")
    repo = make_repo(signed_repo.root, [newer], key=keys.good)
    versions = sorted(e["Version"] for e in packages_entries(repo) if e["Package"] == "libqux1")
    assert versions == ["0.5-1", "0.6-1"]  # the pool keeps the old version
    # the other packages are still published
    assert {e["Package"] for e in packages_entries(repo)} >= {"foo", "bar", "baz"}

    proc = apt.update()
    assert proc.returncode == 0, proc.stderr
    assert "W:" not in proc.stderr, proc.stderr
    rows = apt.print_uris("libqux1")
    assert [r[1] for r in rows] == ["libqux1_0.6-1_all.deb"]
    assert rows[0][3] == "SHA256:" + sha256(repo.root / "pool/main/libq/libqux1/libqux1_0.6-1_all.deb")


def test_republish_unsigned_drops_old_signatures(signed_repo: Repo) -> None:
    repo = make_repo(signed_repo.root, [])
    assert repo.key is None
    assert not (repo.dist_dir / "InRelease").exists()
    assert not (repo.dist_dir / "Release.gpg").exists()


def test_multiple_components(tmp_path: Path, apt: Apt, keys: Keys) -> None:
    debs = {
        "main": build_debs([FakePackage("m1", depends="c1")], tmp_path / "m"),
        "contrib": build_debs([FakePackage("c1", arch="amd64")], tmp_path / "c"),
    }
    repo = make_repo(tmp_path / "repo", debs, suite="bookworm", codename="bookworm", key=keys.good)
    assert repo.components == ["main", "contrib"]
    assert "Components: main contrib" in (repo.dist_dir / "Release").read_text()
    assert repo.sources_line().endswith(f"{repo.url} bookworm main contrib")
    apt.set_source(repo)
    proc = apt.update()
    assert proc.returncode == 0, proc.stderr
    assert {r[1] for r in apt.print_uris("m1")} == {"m1_1.0_all.deb", "c1_1.0_amd64.deb"}
