"""EL 10: centos-stream-10, almalinux-10 and rockylinux-10, as shipped.

Their mirrors cannot be reached from here, so each recipe resolves against a
local mirror laid out as the distribution's (`10-stream/BaseOS/x86_64/os` or
`10/BaseOS/x86_64/os`, and AppStream beside it) holding the fixture
distribution's EL 10 flavour (tests/rpmdist.py: EL 10's release package, and
rpm with its database in /usr/lib/sysimage/rpm), in a copy of the recipes whose
key file of that name holds the fixture's key. One of them is built and
booted: the database where EL 10's rpm reads it, /var/lib/rpm its symlink.

The keys in recipes/keys/ are checked here against the fingerprints the
README lists (which were checked against the distributions' published ones).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PACKAGE_CACHE, RECIPES, REPO, leftovers, one_line_error, run_vztt
from rpmdist import el10_repo, make_mirror
from rpmdist_debs import sha256_file as sha256
from test_el_fixture import rpm_qa
from vztt.boot.runtime import cpu

# name -> (mirror variable, the directory below it, key file)
EL10 = {
    "centos-stream-10-x86_64-minimal": ("CENTOS_MIRROR", "10-stream", "RPM-GPG-KEY-centosofficial-SHA256"),
    "almalinux-10-x86_64-minimal": ("ALMALINUX_MIRROR", "10", "RPM-GPG-KEY-AlmaLinux-10"),
    "rockylinux-10-x86_64-minimal": ("ROCKY_MIRROR", "10", "RPM-GPG-KEY-Rocky-10"),
}
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="builds and boots need root")
DBPATH = "/usr/lib/sysimage/rpm"


# -- as shipped: listed, shown, keys -------------------------------------------------------

def test_vztt_list_shows_the_el10_recipes(tmp_path: Path) -> None:
    listed = run_vztt("list", "--json", cache=tmp_path / "cache")
    assert listed.returncode == 0, listed.stderr
    names = {t["name"] for t in listed.json()}
    assert set(EL10) <= names


@pytest.mark.parametrize("name", sorted(EL10))
def test_vztt_show(name: str, tmp_path: Path) -> None:
    variable, top, key = EL10[name]
    shown = run_vztt("show", name, "--json", cache=tmp_path / "cache")
    assert shown.returncode == 0, shown.stderr
    settings = shown.json()["settings"]
    assert (settings["release"], settings["version"], settings["cpu_level"]) == ("10", "10", "x86-64-v3")
    repos = {r["name"]: r for r in settings["repositories"]}
    assert repos["baseos"]["url"] == f"${variable}/{top}/BaseOS/x86_64/os"
    assert repos["appstream"]["url"] == f"${variable}/{top}/AppStream/x86_64/os"
    assert {Path(r["keyring"]).name for r in repos.values()} == {key}
    # without a mirror, resolving says which variable to set
    unset = run_vztt("resolve", name, cache=tmp_path / "cache")
    assert unset.returncode == 3 and f"${variable} is not set" in one_line_error(unset)


def readme_fingerprints() -> dict[str, str]:
    """`key file` -> fingerprint, from the README's table of the distributions' keys."""
    rows = re.findall(r"^\| `(RPM-GPG-KEY-[^`]+)` \| `([0-9A-F ]+)` \|", (REPO / "README.md").read_text(), re.M)
    return {name: fpr.replace(" ", "") for name, fpr in rows}


def test_every_distribution_key_is_the_one_the_readme_lists(tmp_path: Path) -> None:
    listed = readme_fingerprints()
    files = sorted(p.name for p in (RECIPES / "keys").glob("RPM-GPG-KEY-*"))
    assert sorted(listed) == files
    used = {key for _, _, key in EL10.values()}
    assert used <= set(files)
    for name in files:
        out = subprocess.run(["gpg", "--show-keys", "--with-colons", str(RECIPES / "keys" / name)],
                             capture_output=True, text=True, check=True).stdout
        primary = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
        assert primary == listed[name], name
        # Debian's rpm takes it (what checks the packages' signatures)
        home = tmp_path / name
        home.mkdir()
        imported = subprocess.run(["rpmkeys", "--root", str(home), "--dbpath", "/db", "--import",
                                   str(RECIPES / "keys" / name)], capture_output=True, text=True,
                                  env={"PATH": os.environ["PATH"], "HOME": str(home)})
        assert imported.returncode == 0, imported.stderr


# -- against a local mirror of the EL 10 fixture ------------------------------------------------

@pytest.fixture(scope="module")
def el10_mirrors(el_distribution, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(recipes, {name: mirror root}, the EL 10 repository): one mirror tree per distribution."""
    tmp = tmp_path_factory.mktemp("el10")
    repo = el10_repo(el_distribution, tmp / "repo")
    recipes = tmp / "recipes"
    shutil.copytree(RECIPES, recipes)
    mirrors = {}
    for name, (_, top, key) in EL10.items():
        # The recipe as shipped, trusting the fixture's key under its distribution's key file name.
        shutil.copyfile(el_distribution.key, recipes / "keys" / key)
        mirrors[name] = make_mirror(el_distribution, tmp / name, f"{top}/BaseOS/x86_64/os",
                                    (f"{top}/AppStream/x86_64/os",), repo=repo)
    return recipes, mirrors, repo


def vztt_el10(el10_mirrors, name: str, *args: str, cache: Path):  # type: ignore[no-untyped-def]
    recipes, mirrors, _ = el10_mirrors
    variable = EL10[name][0]
    return run_vztt(*args, "--mirror", f"{variable}=file://{mirrors[name]}", cache=cache, recipes=recipes,
                    env={"VZTT_PACKAGE_CACHE": str(PACKAGE_CACHE)})


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EL10))
def test_vztt_resolve_against_a_local_mirror(el10_mirrors, name: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, repo = el10_mirrors
    resolved = vztt_el10(el10_mirrors, name, "resolve", name, "--json", cache=tmp_path / "cache")
    assert resolved.returncode == 0, resolved.stderr
    lock = json.loads((tmp_path / "cache" / "locks" / f"{name}.lock.json").read_text())
    packages = {p["name"]: p for p in lock["packages"]}
    assert packages["vztt-fixture-release"]["version"] == "10.0-1.el10"
    for p in lock["packages"]:
        assert sha256(repo.root / p["filename"]) == p["sha256"], p["name"]
    assert [r["name"] for r in lock["repositories"]] == ["baseos", "appstream"]
    assert {p["repository"] for p in lock["packages"]} == {"baseos"}
    assert (lock["release"], lock["distro"]) == ("10", name.split("-1")[0])


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_an_el10_template_builds_and_boots(el10_mirrors, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The database in /usr/lib/sysimage/rpm, read there by the image's rpm and dnf."""
    name, cache = "almalinux-10-x86_64-minimal", tmp_path / "cache"
    built = vztt_el10(el10_mirrors, name, "build", name, "--json", cache=cache)
    missing = [f for f in cpu.flags("x86-64-v3") if f not in cpu.host_flags()]
    if missing:         # this host cannot run an EL 10 template: refused, naming what it lacks
        assert built.returncode == 10, built.stderr
        assert f"{name}: its programs need an x86-64-v3 CPU" in one_line_error(built)
        assert not (cache / f"{name}.plain.tar.lz4").exists()
        return
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((cache / f"{name}.manifest.json").read_text())
    checks = {c["name"]: c for c in manifest["boot_test"]["checks"]}
    assert all(c["result"] == "passed" for c in checks.values())
    assert checks["package-db"]["detail"].startswith("rpm -Va: clean")
    assert "smoke:dnf-lists-installed" in checks and "smoke:cpu-level" in checks

    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "--use-compress-program=lz4", "-f", str(cache / f"{name}.plain.tar.lz4"),
                    "-C", str(tree), "--numeric-owner", "-p"], check=True)
    assert (tree / DBPATH.lstrip("/") / "rpmdb.sqlite").is_file()
    assert os.readlink(tree / "var/lib/rpm") == "../../usr/lib/sysimage/rpm"
    lock = json.loads((cache / "locks" / f"{name}.lock.json").read_text())
    assert rpm_qa(tree, DBPATH) == {(p["name"], p["version"], p["arch"]) for p in lock["packages"]}
    assert 'VERSION_ID="10"' in (tree / "usr/lib/os-release").read_text()
    assert leftovers(cache) == []
