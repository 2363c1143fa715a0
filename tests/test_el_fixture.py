"""An EL template through everything a real one goes through, from the
bootable fixture distribution (tests/rpmdist.py: Debian 12's binaries split,
named and signed as EL 9's packages): resolve -> lock -> fetch -> install with
dnf -> customize -> every output format of the registry -> the container boot
test (the build's gate) -> the VM boot test with vztt's kernel -> publish ->
pull -> create, and the container made boots.

One build, shared by every test here (`el9`). The recipe,
tests/recipes/el9-fixture-x86_64-minimal.toml, is the shipped recipes/el.toml
with the fixture as its mirror: its packages, files, hooks and smoke checks
are the real EL recipes'.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import RECIPES, Result, leftovers, processes_naming, run_vztt
from minidist import read_archive
from rpmdist_debs import sha256_file as sha256
import mirrorkit
import test_kernel
from mirrorkit import Keys
from test_kernel import kernel_env
from vztt import formats as formats_registry
from vztt.boot.checks import rpm_verify_problem
from vztt.boot.runtime import Container

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="builds and boots need root"),
              pytest.mark.network, pytest.mark.slow]

# Fixtures of other modules, bound here for pytest (assigned, not imported by name: pyflakes
# reads a test's parameter of an imported name as a redefinition)
keys = mirrorkit.keys                   # the module's publishing keys
built_kernel = test_kernel.built_kernel  # the session's kernel

NAME = "el9-fixture-x86_64-minimal"
TEST_RECIPES = Path(__file__).resolve().parent / "recipes"
FIXTURE_KEY = "RPM-GPG-KEY-vztt-fixture"
DBPATH = "/var/lib/rpm"


def el_recipes(dest: Path, key: Path, names: tuple[str, ...] = (NAME,)) -> Path:
    """The shipped recipes, with the tests' fixture recipes `names` and the fixture's key beside them."""
    shutil.copytree(RECIPES, dest)
    for name in names:
        shutil.copyfile(TEST_RECIPES / f"{name}.toml", dest / f"{name}.toml")
    shutil.copyfile(key, dest / "keys" / FIXTURE_KEY)
    return dest


def rpm_qa(root: Path, dbpath: str = DBPATH) -> set[tuple[str, str, str]]:
    """(name, [epoch:]version-release, arch) of every package the tree's database holds, read by Debian's rpm."""
    out = subprocess.run(["rpm", "--root", str(root), "--dbpath", dbpath, "-qa", "--qf",
                          r"%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE} %{ARCH}\n"],
                         capture_output=True, text=True, check=True).stdout
    return {tuple(line.split()) for line in out.splitlines()}  # type: ignore[misc]


def locked(lock: dict) -> set[tuple[str, str, str]]:
    return {(p["name"], p["version"], p["arch"]) for p in lock["packages"]}


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run(["tar", "-x", "--use-compress-program=lz4", "-f", str(archive), "-C", str(dest),
                    "--numeric-owner", "-p", "--xattrs", "--xattrs-include=*"], check=True)
    return dest


@dataclass
class ElBuild:
    tmp: Path
    cache: Path
    recipes: Path
    mirror: str
    build: Result

    @property
    def lock(self) -> dict:
        return json.loads((self.cache / "locks" / f"{NAME}.lock.json").read_text())

    @property
    def manifest(self) -> dict:
        return json.loads((self.cache / f"{NAME}.manifest.json").read_text())

    def vztt(self, *args: str, recipes: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = 900) -> Result:
        return run_vztt(*args, cache=self.cache, recipes=recipes or self.recipes, timeout=timeout,
                        env={"VZTT_MIRROR_FIXTURE_MIRROR": self.mirror, **(env or {})})


@pytest.fixture(scope="module")
def el9(el_distribution, tmp_path_factory: pytest.TempPathFactory) -> ElBuild:  # type: ignore[no-untyped-def]
    """The fixture's template, built once with every format; the build boot-tests it in a container."""
    tmp = tmp_path_factory.mktemp("el9")
    built = ElBuild(tmp=tmp, cache=tmp / "cache", recipes=el_recipes(tmp / "recipes", el_distribution.key),
                    mirror=el_distribution.url, build=Result(0, "", ""))
    built.build = built.vztt("build", NAME, "--format", "all", "--json")
    assert built.build.returncode == 0, built.build.stderr[-4000:]
    return built


# -- resolve, lock, fetch ----------------------------------------------------------------

def test_the_lock_is_the_fixture_s_packages_with_their_checksums(el9: ElBuild, el_distribution) -> None:  # type: ignore[no-untyped-def]
    lock = el9.lock
    names = {p["name"] for p in lock["packages"]}
    # system-release is a Provides: the lock names the package that provides it
    assert "vztt-fixture-release" in names and "system-release" not in names
    assert set(el_distribution.manifest["base"]) - {"system-release"} <= names
    assert "systemd-libs" in names and "dbus-broker" in names            # dependencies, through their Requires
    assert lock["distro"] == "centos-stream" and lock["release"] == "9"
    assert lock["repositories"][0]["url"] == "$FIXTURE_MIRROR"
    for p in lock["packages"]:                      # what the repository holds, byte for byte
        assert sha256(el_distribution.repo.root / p["filename"]) == p["sha256"], p["name"]
    assert el9.manifest["package_count"] == len(lock["packages"]) > 100


def test_the_resolve_leaves_no_gpg_agent(el9: ElBuild) -> None:
    """librepo checked repomd.xml.asc with gpg in the template's state directory: its agent is gone."""
    assert processes_naming(el9.cache) == []


# -- install, customize, clean: the image ------------------------------------------------------

def test_the_image_is_what_an_el_container_needs(el9: ElBuild) -> None:
    archive = el9.cache / f"{NAME}.plain.tar.lz4"
    members = read_archive(archive).members            # before anything reads the database (sqlite's -shm)
    shipped = {n[2:] for n in members}
    # no dnf cache, history or logs, no sqlite side files, no host's files, no relabelling asked for
    for rel in ("var/lib/dnf/history.sqlite", "var/log/dnf.log", "var/log/hawkey.log", "etc/hostname",
                "etc/resolv.conf", ".autorelabel", f"{DBPATH.lstrip('/')}/rpmdb.sqlite-shm",
                f"{DBPATH.lstrip('/')}/rpmdb.sqlite-wal"):
        assert rel not in shipped, rel
    assert not [n for n in shipped if n.startswith("var/cache/dnf/")]
    # SELinux: rpm's plugin was off, so nothing is labelled (a container has no policy of its own)
    assert not [n for n, m in members.items() if any("selinux" in k for k in m.pax_headers)]

    tree = extract(archive, el9.tmp / "tree")
    lock = el9.lock
    # rpm's database where EL's rpm reads it, listing exactly the lock; no key imported into it
    assert (tree / DBPATH.lstrip("/") / "rpmdb.sqlite").is_file()
    assert rpm_qa(tree) == locked(lock)
    # every file as the database says (modes, owners, digests): /proc and /dev, mount points
    # while installing, have the filesystem package's modes again
    verify = subprocess.run(["rpm", "--root", str(tree), "--dbpath", DBPATH, "-Va", "--nomtime"],
                            capture_output=True, text=True)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if rpm_verify_problem(line)]
    assert problems == []
    assert oct(os.stat(tree / "proc").st_mode & 0o7777) == "0o555"
    # first-boot state: an empty machine-id (systemd's %post made one), no host keys
    assert (tree / "etc/machine-id").read_bytes() == b""
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))
    assert (tree / "etc/locale.conf").read_text() == "LANG=C.UTF-8\n"
    # the presets ran (systemd's %posttrans preset-all): EL's units on, Debian's network daemons off
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "sshd.service").is_symlink()
    assert (wants / "NetworkManager.service").is_symlink()           # what brings the keyfile's network up
    assert not (wants / "systemd-networkd.service").exists()
    assert leftovers(el9.cache) == []


# -- every format of the registry ----------------------------------------------------------------

def test_every_format_is_written_and_inspects(el9: ElBuild) -> None:
    manifest = el9.manifest
    assert manifest["formats"] == list(formats_registry.names())
    for fmt in formats_registry.names():
        path = el9.cache / formats_registry.get(fmt).file_name(NAME)
        assert path.is_file() and sha256(path) == manifest["archives"][fmt]["sha256"], fmt
        info = el9.vztt("inspect", str(path), "--json")
        assert info.returncode == 0, info.stderr
        assert info.json()["format"] == fmt
        assert info.json()["packages"] in (None, manifest["package_count"]), fmt


# -- boot: container (the build's gate), VM -------------------------------------------------------

def test_the_container_boot_test_passed_every_check(el9: ElBuild) -> None:
    report = el9.manifest["boot_test"]
    checks = {c["name"]: c for c in report["checks"]}
    assert report["result"] == "passed", [c for c in report["checks"] if c["result"] != "passed"]
    assert all(c["result"] == "passed" for c in report["checks"])
    assert re.match(r"running in ", checks["boot"]["detail"]), checks["boot"]
    assert checks["failed-units"]["detail"] == "none"
    assert checks["package-db"]["detail"].startswith("rpm -Va: clean")
    for smoke in ("dnf-lists-installed", "locale", "cpu-level", "rpm-works", "os-release"):
        assert f"smoke:{smoke}" in checks, smoke


def test_it_boots_in_a_vm_with_an_x86_64_v3_cpu(el9: ElBuild, built_kernel: Path) -> None:
    """EL 10 needs x86-64-v3: under TCG the guest gets qemu's model with those
    instructions enforced, and glibc inside says the level is supported."""
    recipes = el9.tmp / "recipes-v3"
    shutil.copytree(el9.recipes, recipes)
    leaf = recipes / f"{NAME}.toml"
    # The leaf ends in its [boot] table. The fixture has no udev (Debian's udev is not
    # repackaged), and NetworkManager on a kernel with udev's devices waits for it to
    # manage eth0 (EL's NetworkManager requires systemd-udev): the network rows are the
    # container test's, which passes them; this test is the CPU level's.
    leaf.write_text('cpu_level = "x86-64-v3"\n' + leaf.read_text().rstrip("\n") + "\nnetwork = false\n")
    result = el9.vztt("test", NAME, "--vm", "--json", recipes=recipes,
                      env={**kernel_env(built_kernel), "VZTT_VM_ACCEL": "tcg"})
    report = result.json()
    failed = {c["name"]: (c.get("detail"), c.get("output", "")[-800:]) for c in report["checks"]
              if c["result"] != "passed"}
    assert result.returncode == 0 and not failed, failed or result.stderr[-3000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert "(qemu microvm, tcg" in checks["boot"]["detail"]
    assert checks["package-db"]["detail"].startswith("rpm -Va: clean")
    # a passed check reports its detail, not its output: the output matched EL's smoke regex
    assert checks["smoke:cpu-level"]["detail"].endswith(r"output matches /^  x86-64-v3 \(supported/")
    console = Path(report["console_log"]).read_text(errors="replace")
    assert "Linux version 6.1." in console and "'AVX registers'" in console and "reboot: Power down" in console
    assert leftovers(el9.cache) == [] and processes_naming(el9.cache) == []


# -- publish, pull, create ----------------------------------------------------------------------

def test_publish_pull_create_and_the_container_boots(el9: ElBuild, keys: Keys, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    published = el9.vztt("publish", NAME, "--to", str(mirror), "--json", env=keys.env())
    assert published.returncode == 0, published.stderr
    index = json.loads((mirror / "index.json").read_text())
    build = index["templates"][NAME]["builds"][0]
    assert build["boot_test"] == "passed" and build["formats"] == el9.manifest["formats"]

    host, dest = tmp_path / "host-cache", tmp_path / "vz" / "201"
    pulled = run_vztt("pull", NAME, "--from", str(mirror), "--json", cache=host, env=keys.env())
    assert pulled.returncode == 0, pulled.stderr
    for fmt in formats_registry.names():
        name = formats_registry.get(fmt).file_name(NAME)
        assert sha256(host / name) == sha256(el9.cache / name), fmt
    created = run_vztt("create", NAME, str(dest), "--layout", "dir", "--hostname", "ct201.example.test",
                       "--offline", "--json", cache=host)
    assert created.returncode == 0, created.stderr
    assert rpm_qa(dest) == locked(el9.lock)
    assert (dest / "etc/hostname").read_text() == "ct201.example.test\n"
    assert (dest / "etc/machine-id").read_bytes() == b""
    assert leftovers(host) == []

    with Container(dest, tmp_path / "state", name="vztt-el-create-test", hostname="ct201", overlay=True,
                   console_log=tmp_path / "console.log") as box:
        state, failed = box.wait_running(timeout=90)
        assert state == "running" and not failed, (state, failed)
        status, out = box.exec(["rpm", "-q", "systemd", "openssh-server"], timeout=60)
        assert status == 0, out
        status, machine_id = box.exec(["cat", "/etc/machine-id"], timeout=30)
        assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id), machine_id            # made at first boot
        assert box.poweroff(timeout=30)
