"""An EZ template tree, imported and built for real: the OS template and an
application layer on it, from a local signed repository of the real Debian 12
packages (the session's build fetched them) plus two synthetic ones, with the
real apt, dpkg, boot test and ploop app cache. Then what a layer owes its
base: the same bytes from the same base build and lock, a lock refused on
another base build, an outdated layer after its base was rebuilt, and
`vztt update` rebuilding them in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from aptrepo import FakePackage, GpgKey, build_deb, make_gpg_key, make_repo
from conftest import PACKAGE_CACHE, BuiltTemplate, Result, leftovers, one_line_error, run_vztt
from eztree import installed_tree
from minidist import dpkg_status, read_archive, sha256_file, stage_locked_debs

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="vztt build needs root"), pytest.mark.network]

OS = "debian-12-x86_64"
APP = f"{OS}-hello"
MARKER_1 = FakePackage("ez-marker", version="1.0", files={"/usr/share/ez-marker/VERSION": "1.0\n"})
MARKER_2 = FakePackage("ez-marker", version="2.0", files={"/usr/share/ez-marker/VERSION": "2.0\n"})
HELLO = FakePackage("ez-hello", version="1.0", depends="ez-marker", files={"/usr/share/ez-hello/VERSION": "1.0\n"})
APP_CACHE = f"{OS}_app_{hashlib.md5(b'     hello' + bytes([10])).hexdigest()}.plain.ploopv2.tar.lz4"
WANTED = ("./etc/ez-pre-cache", "./etc/ez-mid-pre-install", "./etc/ez-post-install", "./etc/hosts",
          "./etc/ez-hello-post-install", "./var/lib/dpkg/status", "./usr/share/ez-marker/VERSION")


@dataclass
class EzBuild:
    root: Path
    recipes: Path
    cache: Path
    packages: Path
    repo: Path
    key: GpgKey
    debs: list[Path]
    first: Result                # `vztt build <app> --build-base --format all --json`

    def vztt(self, *args: str | os.PathLike[str], cache: Path | None = None) -> Result:
        return run_vztt(*args, cache=cache or self.cache, recipes=self.recipes, timeout=900,
                        env={"VZTT_MIRROR_DEBIAN_MIRROR": f"file://{self.repo}",
                             "VZTT_PACKAGE_CACHE": str(self.packages)})

    def manifest(self, name: str) -> dict:
        return json.loads((self.cache / f"{name}.manifest.json").read_text())

    def lock(self, name: str) -> dict:
        return json.loads((self.cache / "locks" / f"{name}.lock.json").read_text())

    def archive(self, name: str) -> Path:
        return self.cache / f"{name}.plain.tar.lz4"


@pytest.fixture(scope="module")
def ez(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> EzBuild:
    root = tmp_path_factory.mktemp("ezbuild")
    key = make_gpg_key(root / "key")
    debs = stage_locked_debs(debian12.lock, PACKAGE_CACHE, root / "debs")
    debs += [build_deb(MARKER_1, root / "m1"), build_deb(HELLO, root / "hello")]
    make_repo(root / "repo", debs, suite="bookworm", key=key)
    recipes = root / "recipes"
    (recipes / "keys").mkdir(parents=True)
    # The fixture's key stands in for Debian's: the recipe names the distribution's keyring file.
    shutil.copyfile(key.keyring, recipes / "keys" / "debian-archive-keyring.gpg")
    r = run_vztt("import-ez", installed_tree(root / "ez"), "--to", recipes, cache=root / "cache")
    assert r.returncode == 0, r.stderr
    # The EZ tree's OS template is systemd and iproute2 (no ifupdown, ping or sshd): like its
    # maintainer would, the imported recipe turns the boot test's network rows off (its layers
    # inherit that). tests/test_network.py proves the rows on templates that have them.
    # Compression level 0 for the other hosts' formats of `--format all` (the fastest; the
    # level is not what this test is about: test_hosts.py checks the formats' bytes).
    with (recipes / f"{OS}.toml").open("a") as f:
        f.write("\n[boot]\nnetwork = false\n\n[compression]\nlevel = 0\n")
    b = EzBuild(root=root, recipes=recipes, cache=root / "cache", packages=root / "packages", repo=root / "repo",
                key=key, debs=debs, first=Result(0, "", ""))
    # The layer, and its base first (--build-base): both boot-tested, the layer as a ploop app cache too.
    b.first = b.vztt("build", APP, "--build-base", "--format", "all", "--json")
    assert b.first.returncode == 0, b.first.stderr
    return b


def test_the_imported_os_template_builds_and_its_scripts_ran_in_order(ez: EzBuild) -> None:
    m = ez.manifest(OS)
    assert m["boot_test"]["result"] == "passed" and "base" not in m
    a = read_archive(ez.archive(OS), WANTED)
    # post-install, inside, with the template's environment
    assert a.text("./etc/ez-post-install") == "hello from the EZ environment\n"
    assert a.text("./etc/hosts").startswith("127.0.0.1 localhost")
    # pre-cache on the host with VE_ROOT CTID, before any package was there
    ctid, state = a.text("./etc/ez-pre-cache").split()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", ctid) and state == "empty-root"
    # mid-pre-install inside, after apt's Essential stage (dpkg) and before the rest (systemd)
    assert a.text("./etc/ez-mid-pre-install").split() == ["dpkg", "no-systemd"]
    # the scripts' scratch directories (/vzttXXXXXX) are gone
    assert [n for n in a.members if re.fullmatch(r"\./vztt\w+", n)] == []
    status = dpkg_status(a.text("./var/lib/dpkg/status"))
    assert {"systemd-sysv", "iproute2", "ez-marker"} <= {n for n, p in status.items()
                                                          if p["Status"] == "install ok installed"}
    assert "less" not in status                 # the tools application's package: not in the OS template


def test_the_app_layer_is_built_on_its_base(ez: EzBuild) -> None:
    base, m, lock = ez.manifest(OS), ez.manifest(APP), ez.lock(APP)
    assert m["boot_test"]["result"] == "passed"
    record = {"name": OS, "build_id": base["build_id"], "lock_digest": base["lock_digest"],
              "archive_sha256": base["archive"]["sha256"]}
    assert lock["base"] == record and m["base"] == record
    # the lock holds what the layer adds, nothing of the base
    assert [p["name"] for p in lock["packages"]] == ["ez-hello"]
    a = read_archive(ez.archive(APP), WANTED)
    assert a.text("./etc/ez-hello-post-install") == "APP_CACHE=1 1.0\n"        # as vzpkg create appcache
    assert a.text("./etc/ez-post-install") == "hello from the EZ environment\n"  # the base's, as it was
    installed = {n for n, p in dpkg_status(a.text("./var/lib/dpkg/status")).items()}
    assert installed == {p["name"] for p in base["packages"]} | {"ez-hello"}
    assert m["package_count"] == len(installed)
    # the ploop cache, named as vztt names app caches, lists the base's and the layer's packages
    assert [f for f in ez.first.json()["archives"].values() if f.endswith(APP_CACHE)]
    listing = subprocess.run(f"lz4 -dc {ez.cache / APP_CACHE} | tar -xO ./templates/vzpackages", shell=True,
                             capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in listing.splitlines()]
    assert sorted(names) == sorted(installed) and "systemd" in names and "ez-hello" in names
    members = subprocess.run(f"lz4 -dc {ez.cache / APP_CACHE} | tar -t", shell=True, capture_output=True,
                             text=True, check=True).stdout.split()
    assert {f"./templates/{OS}/timestamp", "./templates/hello/timestamp"} <= set(members)
    assert leftovers(ez.cache) == []


def test_same_base_and_lock_give_the_same_bytes(ez: EzBuild) -> None:
    before = {f: sha256_file(ez.cache / f) for f in (f"{APP}.plain.tar.lz4", APP_CACHE)}
    r = ez.vztt("build", APP, "--locked", "--format", "all", "--no-test")
    assert r.returncode == 0, r.stderr
    assert {f: sha256_file(ez.cache / f) for f in before} == before


def test_a_base_that_is_not_built_or_fails_its_sha256(ez: EzBuild, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    r = ez.vztt("build", APP, cache=empty)
    assert r.returncode == 3
    line = one_line_error(r)
    assert f"base {OS} is not built" in line and "--build-base" in line, line
    assert list(empty.glob("*.json")) == [] and not (empty / "locks" / f"{APP}.lock.json").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (f"{OS}.manifest.json", f"{OS}.plain.tar.lz4"):
        shutil.copyfile(ez.cache / f, bad / f)
    with open(bad / f"{OS}.plain.tar.lz4", "r+b") as fh:      # one byte of the copy, same size
        fh.seek(1 << 20)
        byte = fh.read(1)
        fh.seek(1 << 20)
        fh.write(bytes([byte[0] ^ 0xFF]))
    for args in ((), ("--locked", "--lock", str(ez.cache / "locks" / f"{APP}.lock.json"))):
        r = ez.vztt("build", APP, *args, cache=bad)
        assert r.returncode == 5, r.stderr
        line = one_line_error(r)
        assert f"base {OS}: {bad}/{OS}.plain.tar.lz4 does not match the sha256 its manifest records" in line, line
        assert not (bad / f"{APP}.manifest.json").exists() and leftovers(bad) == []


def test_a_rebuilt_base_outdates_its_layer_and_update_rebuilds_both_in_order(ez: EzBuild, tmp_path: Path) -> None:
    old_lock = tmp_path / "old.lock.json"
    shutil.copyfile(ez.cache / "locks" / f"{APP}.lock.json", old_lock)
    make_repo(ez.repo, [build_deb(MARKER_2, tmp_path / "m2")], suite="bookworm", key=ez.key)
    st = ez.vztt("status", OS, APP, "--json")
    assert st.returncode == 2, st.stderr
    by_name = {s["name"]: s for s in st.json()}
    assert by_name[OS]["state"] == "outdated"
    assert {"name": "ez-marker", "arch": "all", "old": "1.0", "new": "2.0"} in by_name[OS]["changes"]
    assert by_name[APP]["state"] == "current"        # its base's build is still the one it was made on

    # Named layer first: update still rebuilds the base first, then the layer on the new base.
    r = ez.vztt("update", APP, OS, "--no-test", "--json")
    assert r.returncode == 0, r.stderr
    results = r.json()
    assert [x["name"] for x in results] == [OS, APP] and all(x["rebuilt"] for x in results)
    assert any(reason.startswith(f"base {OS} rebuilt") for reason in results[1]["reasons"]), results[1]
    base, layer = ez.manifest(OS), ez.manifest(APP)
    assert layer["base"]["build_id"] == base["build_id"]
    a = read_archive(ez.archive(APP), ("./usr/share/ez-marker/VERSION",))
    assert a.text("./usr/share/ez-marker/VERSION") == "2.0\n"      # the base's new package, under the layer
    st = ez.vztt("status", OS, APP)
    assert st.returncode == 0, st.stdout + st.stderr

    # The lock made on the old base build is refused on the new one.
    r = ez.vztt("build", APP, "--locked", "--lock", old_lock, "--no-test")
    assert r.returncode == 4
    line = one_line_error(r)
    assert "made on base build" in line and f"the cache holds {OS} build {base['build_id']}" in line, line
