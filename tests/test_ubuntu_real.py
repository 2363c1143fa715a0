"""A real Ubuntu build, where the machine reaches an Ubuntu archive.

The repository names no archive host: the test runs when UBUNTU_MIRROR is
configured (the host's apt sources, a mirrors file, or VZTT_MIRROR_UBUNTU_MIRROR)
and its Release file answers; otherwise it is skipped, never failed. Each
build runs the boot test, network rows included: Ubuntu's own netplan,
systemd-networkd and sshd bring the container up. The fixture-repository
tests (test_fixture_builds.py, test_ubuntu_network.py) cover the Ubuntu
recipes everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import requests

from conftest import run_vztt
from vztt.recipe import variables as mirrors

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _ubuntu_mirror(codename: str) -> str | None:
    url = mirrors.load(environ=dict(os.environ)).values.get("UBUNTU_MIRROR")
    if not url:
        return None
    try:
        if requests.get(f"{url}/dists/{codename}/Release", timeout=10).status_code == 200:
            return url
    except requests.RequestException:
        return None
    return None


@pytest.mark.parametrize("version,codename", [("22.04", "jammy"), ("24.04", "noble")])
def test_real_ubuntu(tmp_path, version: str, codename: str) -> None:  # type: ignore[no-untyped-def]
    url = _ubuntu_mirror(codename)
    if url is None:
        pytest.skip("no Ubuntu archive configured or reachable (set UBUNTU_MIRROR to run this)")
    name = f"ubuntu-{version}-x86_64-minimal"
    r = run_vztt("build", name, cache=tmp_path, env={"VZTT_MIRROR_UBUNTU_MIRROR": url}, timeout=1200)
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c for c in json.loads((tmp_path / f"{name}.manifest.json").read_text())["boot_test"]["checks"]}
    assert all(c["result"] == "passed" for c in checks.values()), checks
    assert checks["network:ssh"]["detail"].startswith("ssh root@192.0.2.2 uname -n: localhost")
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(f"lz4 -dc {tmp_path}/{name}.plain.tar.lz4 | tar -x --numeric-owner -p -C {tree}",
                   shell=True, check=True)
    assert f'VERSION_ID="{version}"' in (tree / "etc/os-release").read_text()
    assert (tree / "usr/sbin/netplan").exists() or (tree / "usr/bin/netplan").exists()
    audit = subprocess.run(["chroot", str(tree), "dpkg", "--audit"], capture_output=True, text=True)
    assert audit.returncode == 0 and audit.stdout == ""
