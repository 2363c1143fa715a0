"""arm64 templates on this x86_64 host (issue 21): the build under qemu-user
(binfmt_misc), the container boot test under emulation, the same bytes again
from the lock, and the one-line refusals (no emulator, an unknown arch, a
repository without the arch's Packages).

The arm64 template is conftest's `debian12_arm64` (built once per session,
boot-tested by the build); tests/test_vm_arm64.py boots it in the aarch64 VM.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import lz4.frame
import pytest

from aptrepo import FakePackage, build_deb, make_gpg_key
from conftest import PACKAGE_CACHE, RECIPES, BuiltTemplate, leftovers, one_line_error, run_vztt
from minidist import fixture_leaf, publish_suites, sha256_file as sha256, stage_locked_debs
from test_boottest import check_rows, nothing_left
from vztt.base import emulation

NAME = "debian-12-aarch64-minimal"
ENTRY = emulation.BINFMT / "qemu-aarch64"
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (builds, binfmt_misc)")
NETWORK = pytest.mark.network        # Debian's mirror: the arm64 template is built from it


def exit_code(kind: str) -> int:
    return {"recipe": 3, "resolve": 4, "environment": 7}[kind]


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with lz4.frame.open(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        return {m.name: m for m in tar}


def member_bytes(archive: Path, name: str, size: int = 64) -> bytes:
    with lz4.frame.open(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for m in tar:
            if m.name == name:
                f = tar.extractfile(m)
                assert f is not None, name
                return f.read(size)
    raise AssertionError(f"{name} not in {archive}")


# -- the build and its container boot test, under emulation ---------------------------

@ROOT
@NETWORK
def test_arm64_template_holds_aarch64_programs(debian12_arm64: BuiltTemplate) -> None:
    archive = debian12_arm64.archive
    head = member_bytes(archive, "./usr/bin/bash")
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 0xB7     # EM_AARCH64
    init = member_bytes(archive, "./usr/lib/systemd/systemd")
    assert int.from_bytes(init[18:20], "little") == 0xB7
    names = members(archive)
    # Nothing of the emulator went into the image (binfmt's F flag: the kernel holds it).
    assert not [n for n in names if "qemu" in n.rsplit("/", 1)[-1]], [n for n in names if "qemu" in n]
    lock = debian12_arm64.lock
    assert lock["arch"] == "arm64"
    assert {p["arch"] for p in lock["packages"]} <= {"arm64", "all"} and any(p["arch"] == "arm64"
                                                                                for p in lock["packages"])
    manifest = debian12_arm64.manifest
    assert manifest["arch"] == "aarch64"
    status = member_bytes(archive, "./var/lib/dpkg/status", 10 << 20).decode()
    assert "Architecture: arm64" in status and "Architecture: amd64" not in status


@ROOT
@NETWORK
def test_arm64_build_was_boot_tested_under_emulation(debian12_arm64: BuiltTemplate) -> None:
    """`vztt build` boot-tested it in the container runtime, init under qemu-user: passed,
    with the emulator's failures (and only those) let through by boot.allowed_failed_emulated."""
    boot = debian12_arm64.manifest["boot_test"]
    assert boot["result"] == "passed", boot
    text = json.dumps(boot)
    assert "aarch64 under qemu-user" in text, text
    assert "systemd-sysusers.service" in text, text        # allowed to fail there, and said so


@ROOT
@NETWORK
def test_arm64_test_command_boots_it_and_leaves_nothing(debian12_arm64: BuiltTemplate) -> None:
    result = run_vztt("test", NAME, cache=debian12_arm64.cache, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = check_rows(result.stdout)
    assert rows["boot"] == "ok" and rows["failed-units"] == "ok" and rows["poweroff"] == "ok", result.stdout
    assert rows["network:ssh"] == "ok" and rows["package-db"] == "ok", result.stdout
    assert "aarch64 under qemu-user" in result.stdout
    assert nothing_left(debian12_arm64.cache, NAME) == []


@ROOT
@NETWORK
def test_arm64_rebuild_from_the_lock_gives_the_same_bytes(debian12_arm64: BuiltTemplate,
                                                          debian12_arm64_again: BuiltTemplate) -> None:
    """Another cache, the same lock (--locked, no test): the archive's bytes are the same."""
    again = debian12_arm64_again
    assert again.cache != debian12_arm64.cache and again.lock == debian12_arm64.lock
    assert sha256(again.archive) == sha256(debian12_arm64.archive), "two builds from one arm64 lock differ"
    assert leftovers(again.cache) == []


# -- refusals ----------------------------------------------------------------------------

@ROOT
@NETWORK
def test_foreign_build_and_boot_refused_when_the_emulator_is_off(debian12_arm64: BuiltTemplate,
                                                                 tmp_path: Path) -> None:
    """The host's own qemu-aarch64 entry, disabled for the length of the test: the build says
    so in one line naming it and what to run, exit 7, nothing resolved or written; the boot
    test of the built arm64 template, exit 10 (no runtime for it here), nothing left."""
    if not ENTRY.exists():
        pytest.fail(f"{ENTRY} is missing: run `make binfmt`")
    cache = tmp_path / "cache"
    ENTRY.write_text("0")
    try:
        result = run_vztt("build", NAME, cache=cache, timeout=300)
        boot = run_vztt("test", NAME, "--container", cache=debian12_arm64.cache, timeout=300)
    finally:
        ENTRY.write_text("1")
    assert ENTRY.read_text().splitlines()[0] == "enabled"
    line = one_line_error(boot)
    assert boot.returncode == 10 and "qemu-aarch64" in line and "disabled" in line, boot.stderr
    assert nothing_left(debian12_arm64.cache, NAME) == []
    line = one_line_error(result)
    assert result.returncode == exit_code("environment") == 7, result.stderr
    assert NAME in line and "qemu-aarch64" in line and "disabled" in line and "make binfmt" in line, line
    assert not (cache / "locks").exists() or not list((cache / "locks").iterdir())
    assert not list(cache.glob("*.tar.lz4")) if cache.exists() else True
    assert leftovers(cache) == [] if cache.exists() else True


def fake_binfmt(root: Path, status: str = "enabled", flags: str | None = "PF", enabled: bool = True) -> Path:
    """A directory laid out as /proc/sys/fs/binfmt_misc, with Debian's qemu-aarch64 entry."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "status").write_text(status + "\n")
    if flags is not None:
        (root / "qemu-aarch64").write_text(
            f"{'enabled' if enabled else 'disabled'}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
            f"flags: {flags}\noffset 0\nmagic 7f454c460201010000000000000000000200b700\n"
            "mask ffffffffffffff00fffffffffffffffffeffffff\n")
    return root


def test_binfmt_entry_reasons(tmp_path: Path) -> None:
    """What the check says for each way a host falls short (the kernel's own entry text)."""
    assert emulation.registered("aarch64", tmp_path / "absent")[1] == \
        f"binfmt_misc is not mounted on {tmp_path / 'absent'}"
    assert "is disabled" in emulation.registered("aarch64", fake_binfmt(tmp_path / "a", status="disabled"))[1]
    entry, why = emulation.registered("aarch64", fake_binfmt(tmp_path / "b", flags="P"))
    assert entry is None and "qemu-aarch64" in why and "without F" in why, why
    entry, why = emulation.registered("aarch64", fake_binfmt(tmp_path / "c", enabled=False))
    assert entry is None and why == "binfmt_misc entry qemu-aarch64 for aarch64 is disabled", why
    entry, why = emulation.registered("aarch64", fake_binfmt(tmp_path / "d", flags=None))
    assert entry is None and why == "no binfmt_misc entry runs aarch64 programs", why
    entry, why = emulation.registered("aarch64", fake_binfmt(tmp_path / "e"))
    assert entry is not None and entry.name == "qemu-aarch64" and why == ""
    # The header the entries are matched with is aarch64's, static and PIE; x86_64's is not.
    assert entry.matches(emulation.elf_header("aarch64", 2)) and entry.matches(emulation.elf_header("aarch64", 3))
    x86 = emulation.elf_header("aarch64", 2)[:18] + (0x3E).to_bytes(2, "little") + emulation.elf_header("aarch64")[20:]
    assert not entry.matches(x86)


@ROOT
def test_this_host_runs_aarch64_programs() -> None:
    """`make binfmt` left the real entry usable: the 132-byte program exits 42 under qemu-user."""
    entry, why = emulation.registered("aarch64")
    assert entry is not None, why
    assert "F" in entry.flags
    assert emulation.runs("aarch64") == (True, "")


def test_unknown_arch_is_one_line(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    (recipes / "debian-12-riscv64-minimal.toml").write_text(
        'extends = "debian"\nrelease = "bookworm"\nversion = "12"\narch = "riscv64"\n')
    result = run_vztt("resolve", "debian-12-riscv64-minimal", cache=tmp_path / "cache", recipes=recipes)
    line = one_line_error(result)
    assert result.returncode == exit_code("recipe"), result.stderr
    assert "arch" in line and "riscv64" in line and "aarch64" in line and "x86_64" in line, line
    assert not (tmp_path / "cache" / "locks").exists()


# -- repositories: the arch's Packages, Ubuntu's ports archive ----------------------------

def fixture_recipes(tmp_path: Path, key_keyring: Path, version: str) -> Path:
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    shutil.copyfile(key_keyring, recipes / "keys" / "fixture.gpg")
    (recipes / "ubuntu-fixture-arm64.toml").write_text(fixture_leaf(f"ubuntu-{version}-aarch64-minimal",
                                                                    f"Ubuntu {version} arm64"))
    return recipes


@ROOT
def test_repository_without_the_arch_is_one_line(tmp_path: Path) -> None:
    """An amd64-only repository for an arm64 recipe: named, with what its Release offers."""
    key = make_gpg_key(tmp_path / "key")
    debs = [build_deb(FakePackage("hello-fixture", arch="amd64"), tmp_path / "debs")]
    publish_suites(tmp_path / "repo", {"main": debs}, ["noble", "noble-updates", "noble-security"], key,
                   components=("main", "universe"))
    recipes = fixture_recipes(tmp_path, key.keyring, "24.04")
    result = run_vztt("resolve", "ubuntu-fixture-arm64", cache=tmp_path / "cache", recipes=recipes,
                      env={"VZTT_MIRROR_UBUNTU_PORTS_MIRROR": "file://" + str((tmp_path / "repo").resolve())})
    line = one_line_error(result)
    assert result.returncode == exit_code("resolve"), result.stderr
    assert "repository main" in line and "no Packages index for arm64" in line and "amd64" in line, line
    assert not (tmp_path / "cache" / "locks" / "ubuntu-fixture-arm64.lock.json").exists()


NETPLAN_ARM64 = FakePackage(
    "netplan.io", version="1.0-0fixture1", arch="arm64", depends="iproute2", priority="optional",
    files={"/usr/share/doc/netplan.io/README.fixture": "synthetic netplan.io for vztt's tests\n"})


@ROOT
@NETWORK
@pytest.mark.parametrize("version,suite", [("22.04", "jammy"), ("24.04", "noble")])
def test_ubuntu_arm64_recipe_resolves_from_a_ports_fixture(debian12_arm64: BuiltTemplate, tmp_path: Path,
                                                            version: str, suite: str) -> None:
    """Ubuntu's ports archive does not answer here: a local arm64 one (the real arm64 packages
    of the Debian build, and a synthetic netplan.io) published under Ubuntu's suite names.
    The shipped recipe reads $UBUNTU_PORTS_MIRROR, not $UBUNTU_MIRROR, and locks arm64."""
    key = make_gpg_key(tmp_path / "key")
    debs = stage_locked_debs(debian12_arm64.lock, PACKAGE_CACHE, tmp_path / "debs")
    debs.append(build_deb(NETPLAN_ARM64, tmp_path / "debs"))
    suites = [suite, f"{suite}-updates", f"{suite}-security"]
    repos = publish_suites(tmp_path / "repo", {"main": debs}, suites, key, components=("main", "universe"),
                           arch="arm64")
    assert repos
    recipes = fixture_recipes(tmp_path, key.keyring, version)
    url = "file://" + str((tmp_path / "repo").resolve())
    cache = tmp_path / "cache"
    # Only the amd64 archive's variable set: the arm64 recipe names what it misses.
    unset = run_vztt("resolve", "ubuntu-fixture-arm64", cache=cache, recipes=recipes,
                     env={"VZTT_MIRROR_UBUNTU_MIRROR": url})
    assert "UBUNTU_PORTS_MIRROR" in one_line_error(unset)
    result = run_vztt("resolve", "ubuntu-fixture-arm64", "--json", cache=cache, recipes=recipes,
                      env={"VZTT_MIRROR_UBUNTU_PORTS_MIRROR": url})
    assert result.returncode == 0, result.stderr
    lock = json.loads((cache / "locks" / "ubuntu-fixture-arm64.lock.json").read_text())
    assert lock["arch"] == "arm64" and lock["distro"] == "ubuntu" and lock["release"] == suite
    archs = {p["name"]: p["arch"] for p in lock["packages"]}
    assert archs["netplan.io"] == "arm64" and archs["systemd"] == "arm64" and archs["bash"] == "arm64"
    assert set(archs.values()) <= {"arm64", "all"}
    assert {r["url"] for r in lock["repositories"]} == {"$UBUNTU_PORTS_MIRROR"}
