"""The Ubuntu recipes come up on the network (issue #17), from a local mirror.

Ubuntu's archive is not reachable everywhere `make test` runs (the real build,
test_ubuntu_real.py, skips then). Here the shipped ubuntu-22.04 and
ubuntu-24.04 recipes build, offline, from a mini distribution (tests/minidist.py)
of real Debian 12 packages published under Ubuntu's suite names, this time
with Debian's real netplan.io (0.106, the upstream release Ubuntu 22.04 ships)
and what it needs, resolved and fetched by vztt from Debian's mirror. Each
build runs the boot test: the netplan file vztt writes is turned into a
systemd-networkd configuration by netplan's own generator at boot, networkd
brings the interface up, and the network rows (address, ping from inside,
ssh from the test's namespace) pass. The recipes' os-release smoke check is
set to Debian's values: these are Debian's packages.

The other Ubuntu fixture (test_fixture_builds.py) keeps a synthetic
netplan.io: its many rebuilds stay small.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aptrepo import make_gpg_key  # noqa: E402
from conftest import PACKAGE_CACHE, RECIPES, BuiltTemplate, leftovers, run_vztt  # noqa: E402
from minidist import fetch_locked, publish_suites, stage_locked_debs  # noqa: E402
from test_fixture_builds import LEAF  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="vztt build needs root")]

RELEASES = {"22.04": "jammy", "24.04": "noble"}
NETPLAN_RECIPE = 'extends = "debian-12-x86_64-minimal"\n[packages]\ninclude = ["netplan.io"]\n'
# The fixture's leaf (the shipped recipe, its repositories signed by the tests' key), for each
# release, with smoke checks for Debian's packages and for what netplan made of vztt's file.
EXTRA = """
[[smoke]]
name = "os-release"
output = 'VERSION_ID="12"'

[[smoke]]
# netplan's generator turned vztt's netplan file into networkd's configuration at boot
name = "netplan-generated"
command = "cat /run/systemd/network/10-netplan-eth0.network"
output = '(?m)^Address=192\\.0\\.2\\.2/24$'
"""


@pytest.fixture(scope="module")
def mirror(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipes, mirror root): Debian 12's packages and netplan.io's, as jammy and noble."""
    tmp = tmp_path_factory.mktemp("ubuntu-net")
    recipes = tmp / "recipes"
    shutil.copytree(RECIPES, recipes)
    (recipes / "debian-12-netplan.toml").write_text(NETPLAN_RECIPE)
    cache = tmp / "resolve-cache"
    r = run_vztt("resolve", "debian-12-netplan", cache=cache, recipes=recipes)
    assert r.returncode == 0, r.stderr
    lock_file = cache / "locks" / "debian-12-netplan.lock.json"
    fetch_locked(lock_file, PACKAGE_CACHE)
    debs = {p.name: p for p in stage_locked_debs(debian12.lock, PACKAGE_CACHE, tmp / "debs")}
    debs.update({p.name: p for p in stage_locked_debs(json.loads(lock_file.read_text()), PACKAGE_CACHE, tmp / "debs")})
    key = make_gpg_key(tmp / "key", "ubuntu-net <ubuntu-net@example.invalid>")
    suites = [f"{codename}{pocket}" for codename in RELEASES.values() for pocket in ("", "-updates", "-security")]
    publish_suites(tmp / "repo", {"main": sorted(debs.values())}, suites, key, components=("main", "universe"))
    shutil.copyfile(key.keyring, recipes / "keys" / "fixture.gpg")
    for version in RELEASES:
        (recipes / f"ubuntu-net-{version}.toml").write_text(LEAF.replace("24.04", version) + EXTRA)
    return recipes, (tmp / "repo").resolve()


@pytest.mark.parametrize("version", list(RELEASES))
def test_ubuntu_recipe_comes_up_on_the_network(mirror: tuple[Path, Path], version: str,
                                               tmp_path: Path) -> None:
    recipes, repo = mirror
    name = f"ubuntu-net-{version}"
    cache = tmp_path / "cache"
    r = run_vztt("build", name, "--json", cache=cache, recipes=recipes, timeout=1200,
                 env={"VZTT_MIRROR_UBUNTU_MIRROR": f"file://{repo}"})
    manifest = json.loads((cache / f"{name}.manifest.json").read_text()) if r.returncode == 0 else {}
    assert r.returncode == 0, r.stderr[-4000:]
    assert manifest["release"] == RELEASES[version] and manifest["version"] == version
    assert {p["name"] for p in manifest["packages"]} >= {"netplan.io", "iputils-ping", "openssh-server"}
    assert "ifupdown" not in {p["name"] for p in manifest["packages"]}
    checks = {c["name"]: c for c in manifest["boot_test"]["checks"]}
    assert manifest["boot_test"]["result"] == "passed", {n: c for n, c in checks.items() if c["result"] != "passed"}
    assert checks["network:address"]["detail"] == "eth0 has 192.0.2.2/24"
    assert checks["network:ssh"]["detail"].startswith("ssh root@192.0.2.2 uname -n: localhost; host key ")
    assert checks["smoke:netplan-generated"]["result"] == "passed"
    assert leftovers(cache) == []
