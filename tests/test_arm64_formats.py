"""The arm64 template in the other hosts' formats, judged by the hosts' own programs on
this x86_64 host (issue 21).

The session's debian-12-aarch64-minimal build (tests/conftest.py's `debian12_arm64`,
built once under emulation) is not built again: its Incus and OCI files are
written from its cached plain archive by the formats' own code at compression
level 0 (tests/hostkit.py `host_formats_of_build`: seconds; LXC's rootfs.tar.xz
would take half a minute of xz for metadata that depends on the recipe alone:
tests/test_hostformats.py checks LXC's for an aarch64 template). Then podman runs the
OCI image under qemu-user (`--arch arm64`: uname -m says aarch64), skopeo reads its
platform, and a private incusd imports the split image as an aarch64 one. Nothing
here boots a system: the build's own boot test did that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import RECIPES, BuiltTemplate, run_vztt
from hostkit import Incusd, Podman, check, host_formats_of_build, missing
from vztt import formats
from vztt.base import emulation

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="builds and containers need root")]

NAME = "debian-12-aarch64-minimal"
IMAGE = f"localhost/{NAME}"


@dataclass
class Arm64Formats:
    cache: Path
    manifest: dict

    def file(self, fmt: str, index: int = 0) -> Path:
        return self.cache / formats.get(fmt).file_names(NAME)[index]


@pytest.fixture(scope="module")
def arm64(debian12_arm64: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Arm64Formats:
    base = tmp_path_factory.mktemp("arm64-formats")
    manifest = host_formats_of_build(debian12_arm64.cache, NAME, RECIPES, base / "cache", base / "work",
                                     formats=("incus", "oci"))
    return Arm64Formats(base / "cache", manifest)


def _inspect(path: Path) -> dict:
    r = run_vztt("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    return r.json()


def test_every_format_says_aarch64_its_hosts_way(arm64: Arm64Formats) -> None:
    """What vztt's own inspect (which trusts nothing in the files) reads back."""
    assert arm64.manifest["arch"] == "aarch64"
    assert {f: arm64.manifest["archives"][f]["host"]["arch"] for f in ("incus", "oci")} == \
        {"incus": "arm64", "oci": "arm64"}
    assert _inspect(arm64.file("incus", 1))["architecture"] == "aarch64"
    oci = _inspect(arm64.file("oci"))
    assert (oci["architecture"], oci["variant"], oci["platform"]) == ("arm64", "v8", "linux/arm64/v8")


@pytest.mark.skipif(bool(missing("podman", "skopeo", "runc")), reason="needs podman, skopeo, runc")
def test_podman_runs_our_arm64_image_under_emulation(arm64: Arm64Formats, tmp_path: Path) -> None:
    entry, why = emulation.registered("aarch64")
    assert entry is not None, f"{why} (`make binfmt`)"
    podman = Podman(tmp_path / "podman", "vztt-test-podman-arm64")
    archive = arm64.file("oci")
    try:
        assert f"{IMAGE}:latest" in check(podman("load", "-q", "-i", archive))
        # One container (podman's vfs storage copies the tree for each): its programs are aarch64's.
        machine, os_release = check(podman("run", "--rm", "--arch", "arm64", IMAGE, "sh", "-c",
                                           "uname -m; cat /etc/os-release")).split("\n", 1)
        assert machine == "aarch64"
        assert 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in os_release
        shown = json.loads(check(podman("inspect", f"oci-archive:{archive}", tool="skopeo")))
        assert (shown["Architecture"], shown["Os"]) == ("arm64", "linux")
        config = json.loads(check(podman("inspect", "--config", f"oci-archive:{archive}", tool="skopeo")))
        assert (config["architecture"], config["variant"]) == ("arm64", "v8")
    finally:
        podman.cleanup()


@pytest.mark.skipif(bool(missing("incus", "/usr/libexec/incus/incusd")),
                    reason="needs incus-base and incus-extra (bookworm-backports)")
def test_incus_imports_it_as_an_aarch64_image(arm64: Arm64Formats, tmp_path: Path) -> None:
    """Import only: launching it would boot a system under emulation (the build did)."""
    incus = Incusd(tmp_path, Path("/etc/ssl/certs/ca-certificates.crt"))
    try:
        incus.start()
        imported = check(incus("image", "import", arm64.file("incus", 1), arm64.file("incus", 0), "--alias", "a64"))
        assert arm64.manifest["archives"]["incus"]["combined_sha256"] in imported
        (image,) = json.loads(check(incus("image", "list", "a64", "--format=json")))
        assert image["architecture"] == "aarch64" and image["properties"]["architecture"] == "arm64"
        assert "Architecture: aarch64" in check(incus("image", "info", "a64")).splitlines()
    finally:
        incus.stop()
