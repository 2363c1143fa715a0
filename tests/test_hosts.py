"""Every container host takes our templates, judged by the hosts' own programs.

One `vztt build --format all` of the session's debian-12 lock (at compression
level 0: the fastest; every level is reproducible) is built twice, published
to a mirror directory with a throwaway key and served by a loopback nginx
(http, and https with a throwaway CA where a tool needs it). Then LXC, systemd,
podman/skopeo and Incus (Debian's packages, Incus from bookworm-backports)
fetch, verify, create and boot what we made, and say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import RECIPES, BuiltTemplate, leftovers, run_vztt
from hostkit import (Incusd, Lxc, Podman, TlsNginx, check, make_ca, missing, nspawn_booted, remove_image_root,
                     run, systemd_pull, wait_running)
from mirrorkit import Keys, keys  # noqa: F401  (fixture)
from reprokit import elsewhere, explain
from vztt import formats

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="builds and containers need root")]

NAME = "debian-12-x86_64-minimal"
HOST_FORMATS = ("lxc", "incus", "oci", "nspawn")


@dataclass
class Built:
    cache: Path
    recipes: Path
    lock: Path
    manifest: dict

    def file(self, fmt: str, index: int = 0) -> Path:
        return self.cache / formats.get(fmt).file_names(NAME)[index]


def fast_recipes(base: Path) -> Path:
    """The shipped recipes, the debian-12 one at compression level 0 (tests' speed)."""
    recipes = base / "recipes"
    shutil.copytree(RECIPES, recipes)
    with open(recipes / f"{NAME}.toml", "a") as fh:
        fh.write("\n[compression]\nlevel = 0\n")
    return recipes


@pytest.fixture(scope="module")
def built(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("hosts-build")
    recipes = fast_recipes(base)
    lock = debian12.cache / "locks" / f"{NAME}.lock.json"
    r = run_vztt("build", NAME, "--locked", "--lock", lock, "--format", "all", "--json", cache=base / "cache",
                 recipes=recipes, timeout=1800)
    assert r.returncode == 0, r.stderr
    cache = base / "cache"
    return Built(cache=cache, recipes=recipes, lock=lock,
                 manifest=json.loads((cache / f"{NAME}.manifest.json").read_text()))


# -- the build --------------------------------------------------------------------------

def test_format_all_writes_every_format_and_inspect_checks_each(built: Built) -> None:
    m = built.manifest
    assert m["formats"] == list(formats.names())
    assert set(m["steps"]) >= {"pack", "ploop", *HOST_FORMATS, "test", "test-ploop"}
    for fmt in formats.names():
        rec = m["archives"][fmt]
        files = [rec, *rec.get("parts", [])]
        assert [f["file"] for f in files] == formats.get(fmt).file_names(NAME)
        for f in files:
            data = (built.cache / f["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["size"]
    assert m["archives"]["lxc"]["compression"] == "xz -0"
    inspected = {}
    for fmt in HOST_FORMATS:
        r = run_vztt("inspect", built.file(fmt), "--json", cache=built.cache)
        assert r.returncode == 0, r.stderr
        inspected[fmt] = r.json()
        assert inspected[fmt]["format"] == fmt
        assert inspected[fmt]["packages"] == m["package_count"], fmt
    assert inspected["lxc"]["lxc_arch"] == "x86_64" and inspected["lxc"]["templates"] == ["/etc/hostname", "/etc/hosts"]
    assert inspected["incus"]["fingerprint"] == m["archives"]["incus"]["combined_sha256"]
    assert inspected["incus"]["architecture"] == "x86_64"
    assert inspected["oci"]["annotations"]["org.vztt.lock.sha256"] == m["lock_digest"].removeprefix("sha256:")
    assert inspected["oci"]["architecture"] == "amd64" and inspected["oci"]["ref"] == NAME
    # The same tree in every format: one more member in LXC's (its /etc/hostname placeholder).
    plain = run_vztt("inspect", built.file("plain"), "--json", cache=built.cache).json()
    assert inspected["nspawn"]["members"] == inspected["oci"]["members"] == plain["members"]
    assert inspected["lxc"]["members"] == plain["members"] + 1


def test_same_lock_same_bytes_for_every_format(built: Built, tmp_path: Path) -> None:
    """Reproducible builds: the same lock built again five years later (faketime), with umask
    077, another locale, time zone and host name, into a cache at another, longer path:
    byte-identical files in every format. A mismatch names the members that differ."""
    other = tmp_path / "elsewhere" / "a-much-longer-path-for-another-cache"
    r = elsewhere(["--cache-dir", str(other), "--recipes", str(built.recipes), "build", NAME, "--locked",
                   "--lock", str(built.lock), "--format", "all", "--no-test", "--json"])
    assert r.returncode == 0, r.stderr
    again = json.loads((other / f"{NAME}.manifest.json").read_text())
    assert again["created"][:4] > built.manifest["created"][:4]          # it did run years later
    differ = [explain(built.cache / f, other / f) for fmt in formats.names() for f in formats.get(fmt).file_names(NAME)
              if subprocess.run(["cmp", "-s", built.cache / f, other / f]).returncode != 0]
    assert differ == [], "\n".join(differ)
    assert {f: a["sha256"] for f, a in again["archives"].items()} == \
        {f: a["sha256"] for f, a in built.manifest["archives"].items()}
    assert leftovers(other) == []


def test_ploop_is_boot_tested_from_its_own_disk(built: Built) -> None:
    """The build booted the ploop cache itself (root.hds read back, mounted read-only), and so
    does `vztt test --format ploop`."""
    assert built.manifest["boot_test"]["formats"]["ploop"]["result"] == "passed"
    assert built.manifest["boot_test"]["formats"]["plain"]["result"] == "passed"
    r = run_vztt("test", NAME, "--format", "ploop", "--json", cache=built.cache, recipes=built.recipes)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.json()
    assert report["archive"].endswith(".plain.ploopv2.tar.lz4")
    assert {c["name"]: c["result"] for c in report["checks"]}["package-db"] == "passed"
    assert all(c["result"] == "passed" for c in report["checks"])
    assert leftovers(built.cache) == []


# -- the mirror -------------------------------------------------------------------------

@dataclass
class Mirror:
    root: Path
    web: TlsNginx
    tls: dict[str, Path]
    keys: Keys
    build_dir: str                # templates/<name>/<build id>

    def url(self, rel: str, tls: bool = False) -> str:
        return (self.web.https if tls else self.web.url("mirror")) + rel


@pytest.fixture(scope="module")
def mirror(built: Built, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    base = tmp_path_factory.mktemp("hosts-mirror")
    tls = make_ca(base / "tls")
    web = TlsNginx(base, tls)
    r = run_vztt("publish", NAME, "--to", web.mirror_root, "--json", cache=built.cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    bid = r.json()["published"][0]["id"]
    with web:
        yield Mirror(root=web.mirror_root, web=web, tls=tls, keys=keys, build_dir=f"templates/{NAME}/{bid}")


def test_publish_writes_each_hosts_index(mirror: Mirror) -> None:
    d = mirror.root / mirror.build_dir
    for name in ("rootfs.tar.xz", "meta.tar.xz", "rootfs.tar.xz.asc", "meta.tar.xz.asc", "incus.tar.xz",
                 "rootfs.squashfs", f"{NAME}.tar.xz", f"{NAME}.oci.tar", "SHA256SUMS", "SHA256SUMS.gpg"):
        assert (d / name).is_file(), name
    # Every signature checks out with the publisher's key, by gpgv.
    for data, sig in ((d / "SHA256SUMS", d / "SHA256SUMS.gpg"), (d / "rootfs.tar.xz", d / "rootfs.tar.xz.asc"),
                      (mirror.root / "meta/1.0/index-system", mirror.root / "meta/1.0/index-system.asc")):
        check(run("gpgv", "--keyring", mirror.keys.trusted, sig, data))
    sums = dict(line.split(" *")[::-1] for line in (d / "SHA256SUMS").read_text().splitlines())
    assert sums[f"{NAME}.tar.xz"] == hashlib.sha256((d / f"{NAME}.tar.xz").read_bytes()).hexdigest()
    lines = (mirror.root / "meta/1.0/index-system").read_text().splitlines()
    assert lines == [f"debian;12;amd64;minimal;{d.name};{mirror.build_dir}",
                     f"debian;bookworm;amd64;minimal;{d.name};{mirror.build_dir}"]
    # Incus's own reader of a simplestreams tree finds every file with the right sha256.
    if not missing("incus-simplestreams"):
        check(subprocess.run(["incus-simplestreams", "verify"], cwd=mirror.root, capture_output=True, text=True))


def test_vztt_pulls_each_format_from_the_same_mirror(mirror: Mirror, built: Built, tmp_path: Path) -> None:
    cache = tmp_path / "pulled"
    r = run_vztt("pull", NAME, "--from", mirror.url(""), "--format", "lxc,incus,nspawn", "--json", cache=cache,
                 env=mirror.keys.env())
    assert r.returncode == 0, r.stderr
    assert r.json()["formats"] == ["lxc", "incus", "nspawn"]
    for fmt in ("lxc", "incus", "nspawn"):
        for f in formats.get(fmt).file_names(NAME):
            assert (cache / f).read_bytes() == (built.cache / f).read_bytes(), f
    manifest = json.loads((cache / f"{NAME}.manifest.json").read_text())
    assert manifest["formats"] == ["lxc", "incus", "nspawn"] and manifest["pulled"]["signer"] == mirror.keys.publisher
    assert leftovers(cache) == []


# -- LXC ----------------------------------------------------------------------------------

@pytest.mark.skipif(bool(missing("lxc-create", "lxc-start", "lxc-attach", "wget")), reason="needs lxc and wget")
def test_lxc_creates_and_boots_from_our_files_and_our_mirror(built: Built, mirror: Mirror, tmp_path: Path) -> None:
    lxc = Lxc(tmp_path, mirror.tls["ca"])
    try:
        check(lxc.create("vztt-local", "local", "--metadata", str(built.file("lxc", 1)),
                         "--fstree", str(built.file("lxc", 0))))
        assert (lxc.path / "vztt-local/rootfs/etc/hostname").read_text() == "vztt-local\n"
        # lxc-download speaks https only, to https://<server>/: the mirror below /mirror/ works.
        created = lxc.create("vztt-dl", "download", "--server", f"127.0.0.1:{mirror.web.tls_port}/mirror",
                             "--dist", "debian", "--release", "12", "--arch", "amd64", "--variant", "minimal")
        check(created)
        rootfs = lxc.path / "vztt-dl/rootfs"
        assert "127.0.1.1\tvztt-dl" in (rootfs / "etc/hosts").read_text()
        assert f"lock {built.manifest['lock_digest']}" in created.stdout + created.stderr   # our create-message
        lxc.start("vztt-dl")
        assert wait_running(*lxc.attach("vztt-dl")) in ("running", "degraded")
        assert check(run(*lxc.attach("vztt-dl"), "hostname")).strip() == "vztt-dl"
        assert "Debian GNU/Linux 12" in check(run(*lxc.attach("vztt-dl"), "cat", "/etc/os-release"))
        check(lxc.stop("vztt-dl"))
    finally:
        lxc.cleanup()


# -- systemd ------------------------------------------------------------------------------

@pytest.mark.skipif(bool(missing("/lib/systemd/systemd-pull", "systemd-nspawn", "unshare", "chattr")),
                    reason="needs systemd-container")
def test_systemd_pull_verifies_ours_and_nspawn_boots_it(mirror: Mirror, tmp_path: Path) -> None:
    url = mirror.url(f"{mirror.build_dir}/{NAME}.tar.xz")
    good, changed = tmp_path / "machines", tmp_path / "machines-changed"
    sums = mirror.root / mirror.build_dir / "SHA256SUMS"
    original = sums.read_bytes()
    try:
        check(systemd_pull(mirror.keys.trusted, good, url, "vztt-pulled"))
        tree = good / "vztt-pulled"
        assert (tree / "usr/lib/os-release").is_file()
        # One more line in SHA256SUMS: the signature no longer matches, nothing is made.
        sums.write_bytes(original + b"0" * 64 + b" *other\n")
        refused = systemd_pull(mirror.keys.trusted, changed, url, "vztt-changed")
        assert refused.returncode != 0
        assert "BAD signature" in refused.stderr + refused.stdout
        assert not (changed / "vztt-changed").exists()
        sums.write_bytes(original)
        with nspawn_booted(tree, "vztt-nspawn", tmp_path / "nspawn.log") as init:
            enter = ("nsenter", "--target", str(init), "--all")
            assert wait_running(*enter) in ("running", "degraded")
            assert check(run(*enter, "hostname")).strip() == "vztt-nspawn"
    finally:
        sums.write_bytes(original)
        remove_image_root(good)
        remove_image_root(changed)


# -- OCI ----------------------------------------------------------------------------------

@pytest.mark.skipif(bool(missing("podman", "skopeo", "runc")), reason="needs podman, skopeo, runc")
def test_podman_loads_and_runs_it_and_skopeo_shows_our_annotations(built: Built, tmp_path: Path) -> None:
    podman = Podman(tmp_path / "podman", "vztt-test-podman")
    archive = built.file("oci")
    try:
        loaded = check(podman("load", "-q", "-i", archive))
        assert f"localhost/{NAME}:latest" in loaded
        os_release = check(podman("run", "--rm", f"localhost/{NAME}", "cat", "/etc/os-release"))
        assert 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in os_release
        shown = json.loads(check(podman("inspect", f"oci-archive:{archive}", tool="skopeo")))
        labels = shown["Labels"]
        assert labels["org.vztt.lock.sha256"] == built.manifest["lock_digest"].removeprefix("sha256:")
        assert labels["org.vztt.plain.sha256"] == hashlib.sha256(
            subprocess.run(["lz4", "-dc", built.file("plain")], capture_output=True, check=True).stdout).hexdigest()
        assert shown["Architecture"] == "amd64" and shown["Os"] == "linux"
        raw = json.loads(check(podman("inspect", "--raw", f"oci-archive:{archive}", tool="skopeo")))
        assert raw["annotations"]["org.opencontainers.image.title"] == NAME
    finally:
        podman.cleanup()


# -- Incus --------------------------------------------------------------------------------

@pytest.mark.skipif(bool(missing("incus", "/usr/libexec/incus/incusd")),
                    reason="needs incus-base and incus-extra (bookworm-backports)")
def test_incus_imports_the_split_image_and_launches_from_our_simplestreams(built: Built, mirror: Mirror,
                                                                           tmp_path: Path) -> None:
    incus = Incusd(tmp_path, mirror.tls["bundle"])
    try:
        incus.start()
        imported = check(incus("image", "import", built.file("incus", 1), built.file("incus", 0), "--alias", "split"))
        fingerprint = built.manifest["archives"]["incus"]["combined_sha256"]
        assert fingerprint in imported
        info = json.loads(check(incus("image", "list", "split", "--format=json")))
        assert info[0]["properties"]["os"] == "debian" and info[0]["properties"]["variant"] == "minimal"
        check(incus("image", "delete", "split"))
        # Incus takes simplestreams over https only, TLS 1.3: our nginx, our CA.
        check(incus("remote", "add", "vztt", mirror.web.https, "--protocol", "simplestreams", "--public"))
        listed = json.loads(check(incus("image", "list", "vztt:", "--format=json")))
        assert {a["name"] for img in listed for a in img["aliases"]} >= {"debian/12/minimal", "debian/bookworm/minimal"}
        assert [img["fingerprint"] for img in listed] == [fingerprint]
        check(incus("launch", "vztt:debian/12/minimal", "vztt-incus"))
        assert wait_running("incus", "exec", "vztt-incus", "--", env=incus.env()) in ("running", "degraded")
        assert check(incus("exec", "vztt-incus", "--", "hostname")).strip() == "vztt-incus"
        assert "127.0.1.1\tvztt-incus" in check(incus("exec", "vztt-incus", "--", "cat", "/etc/hosts"))
    finally:
        incus.stop()
