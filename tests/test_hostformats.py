"""The other hosts' formats and indexes on small templates (no network): the manifest
and index stay readable both ways, recipes name formats and levels, publish writes
and prunes every host's index with index.json, and a format that cannot be written
fails in one line, leaving the cache as it was. (The real build and the hosts' own
programs: tests/test_hosts.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import RECIPES, one_line_error, run_vztt
from hostkit import check, missing, run, tiny_host_template
from mirrorkit import Keys, keys, snapshot, temp_files, tiny_template  # noqa: F401  (keys: fixture)
from vztt import formats
from vztt.base.errors import BuildError
from vztt.formats import FormatContext, NotBootable
from vztt.formats.hostmeta import HOST_ARCH, HostArch, host_arch, variant_of
from vztt.mirror import hostindex
from vztt.mirror.index import MirrorError, index_bytes, parse_index
from vztt.recipe.recipe import RecipeStore
from vztt.recipe.settings import ARCHES
from vztt.store.manifest import ArchiveRecord, Manifest

TINY = "tiny-1-x86_64-minimal"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")


# -- records, recipes, names --------------------------------------------------------------

def test_manifests_without_parts_still_read_and_parts_round_trip() -> None:
    old = {"format": 1, "name": "x", "created": "2025-01-01T00:00:00+00:00", "formats": ["plain"],
           "archive": {"file": "x.plain.tar.lz4", "format": "plain", "sha256": "a" * 64, "size": 3, "tar_size": 9}}
    m = Manifest.from_dict(old, "old")
    assert m.archive.parts == [] and [f.file for f in m.archive.files] == ["x.plain.tar.lz4"]
    assert "parts" not in m.to_dict()["archives"]["plain"]
    rec = {"file": "x.lxc.rootfs.tar.xz", "format": "lxc", "sha256": "b" * 64, "size": 5, "compression": "xz -6",
           "parts": [{"file": "x.lxc.meta.tar.xz", "sha256": "c" * 64, "size": 2}]}
    again = ArchiveRecord.from_json(json.loads(json.dumps(ArchiveRecord.from_json(rec, "lxc").to_json())), "lxc")
    assert [f.file for f in again.files] == ["x.lxc.rootfs.tar.xz", "x.lxc.meta.tar.xz"]
    assert again.total_size == 7 and again.details == {"compression": "xz -6"}


def test_recipe_format_takes_a_list_and_compression_a_level(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    leaf = (recipes / "debian-12-x86_64-minimal.toml").read_text()
    default_digest = RecipeStore(recipes).load("debian-12-x86_64-minimal").digest()
    (recipes / "debian-12-x86_64-minimal.toml").write_text(leaf + '\nformat = ["plain", "lxc"]\n')
    r = RecipeStore(recipes).load("debian-12-x86_64-minimal")
    assert formats.parse(r.format) == ("plain", "lxc")
    (recipes / "debian-12-x86_64-minimal.toml").write_text(leaf + '\n[compression]\nlevel = 6\n')
    assert RecipeStore(recipes).load("debian-12-x86_64-minimal").digest() == default_digest
    (recipes / "debian-12-x86_64-minimal.toml").write_text(leaf + '\n[compression]\nlevel = 0\n')
    assert RecipeStore(recipes).load("debian-12-x86_64-minimal").digest() != default_digest
    for extra, message in (('\nformat = ["plain", "zip"]\n', "'zip' is not one of"),
                           ('\n[compression]\nlevel = 12\n', "12 is not a level from 0 to 9")):
        (recipes / "debian-12-x86_64-minimal.toml").write_text(leaf + extra)
        res = run_vztt("show", "debian-12-x86_64-minimal", recipes=recipes)
        assert res.returncode == 3 and message in one_line_error(res)
        assert "debian-12-x86_64-minimal.toml" in one_line_error(res)


def test_every_format_is_known_to_the_cli_and_has_its_files() -> None:
    assert formats.parse("all") == ("plain", "ploop", "lxc", "incus", "oci", "nspawn")
    assert formats.bootable() == ("plain", "ploop")
    names = [n for f in formats.names() for n in formats.get(f).file_names("t")]
    assert len(names) == len(set(names))                     # no two formats share a cache file
    help_text = run_vztt("build", "--help").stdout
    for fmt in formats.names():
        assert fmt in help_text


def test_architecture_names_come_from_one_table() -> None:
    assert HOST_ARCH["x86_64"].debian == "amd64" and HOST_ARCH["x86_64"].kernel == "x86_64"
    assert HOST_ARCH["x86_64"].oci == "amd64" and HOST_ARCH["x86_64"].oci_variant == ""
    assert HOST_ARCH["aarch64"] == HostArch(kernel="aarch64", debian="arm64", oci="arm64", oci_variant="v8")
    assert set(HOST_ARCH) == set(ARCHES)               # every arch a recipe may name has its row
    with pytest.raises(BuildError, match=r"^format lxc: no host names for architecture 'mips' "
                                         r"\(vztt/formats/hostmeta.py HOST_ARCH has x86_64, aarch64\)$"):
        host_arch("mips", "lxc")
    assert variant_of("debian-12-x86_64-minimal", "debian", "12", "x86_64") == "minimal"
    assert variant_of("my-template", "debian", "12", "x86_64") == "default"


# -- publish: every host's index, signed, pruned with the builds ---------------------------

@root_only
def test_publish_writes_and_prunes_every_hosts_index(tmp_path: Path, keys: Keys) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "mirror"
    ids = []
    for day in (1, 2):
        m = tiny_host_template(cache, tmp_path / "work", payload=f"build {day}\n".encode(),
                               created=f"2026-01-0{day}T00:00:00+00:00")
        r = run_vztt("publish", TINY, "--to", dest, "--keep", "1", "--json", cache=cache, env=keys.env())
        assert r.returncode == 0, r.stderr
        ids.append(r.json()["published"][0]["id"])
        assert r.json()["host_indexes"] == ["meta/1.0/index-system.asc", "meta/1.0/index-system",
                                            "meta/1.0/index-user.asc", "meta/1.0/index-user",
                                            "streams/v1/images.json", "streams/v1/index.json"]
    index = parse_index((dest / "index.json").read_bytes(), "index")
    (build,) = index["templates"][TINY]["builds"]
    assert build["id"] == ids[1]
    d = dest / "templates" / TINY / ids[1]
    # The old build went whole: its files, SHA256SUMS and signatures, its directory.
    assert not (dest / "templates" / TINY / ids[0]).exists()
    assert sorted(p.name for p in d.iterdir()) == sorted([
        f"{TINY}.plain.tar.lz4", f"{TINY}.manifest.json", "rootfs.tar.xz", "meta.tar.xz", "rootfs.tar.xz.asc",
        "meta.tar.xz.asc", "incus.tar.xz", "rootfs.squashfs", f"{TINY}.oci.tar", f"{TINY}.tar.xz",
        "SHA256SUMS", "SHA256SUMS.gpg"])
    assert {rec["path"].rsplit("/", 1)[1] for rec in build["host_files"]} == {
        "SHA256SUMS", "SHA256SUMS.gpg", "rootfs.tar.xz.asc", "meta.tar.xz.asc"}
    for sig, data in (("SHA256SUMS.gpg", "SHA256SUMS"), ("rootfs.tar.xz.asc", "rootfs.tar.xz"),
                      ("meta.tar.xz.asc", "meta.tar.xz")):
        check(run("gpgv", "--keyring", keys.trusted, d / sig, d / data))
    sums = (d / "SHA256SUMS").read_text()
    assert f"{hashlib.sha256((d / f'{TINY}.tar.xz').read_bytes()).hexdigest()} *{TINY}.tar.xz\n" in sums
    # LXC: the newest build only, under the release and its name; signed.
    lxc = (dest / "meta/1.0/index-system").read_text()
    assert lxc == (f"tiny;1;amd64;minimal;{ids[1]};templates/{TINY}/{ids[1]}\n"
                   f"tiny;one;amd64;minimal;{ids[1]};templates/{TINY}/{ids[1]}\n")
    assert (dest / "meta/1.0/index-user").read_text() == lxc
    check(run("gpgv", "--keyring", keys.trusted, dest / "meta/1.0/index-system.asc", dest / "meta/1.0/index-system"))
    images = json.loads((dest / "streams/v1/images.json").read_text())
    product = images["products"]["tiny:1:minimal:amd64"]
    assert list(product["versions"]) == [ids[1]] and product["aliases"] == "tiny/1/minimal,tiny/one/minimal"
    items = product["versions"][ids[1]]["items"]
    meta, root = d / "incus.tar.xz", d / "rootfs.squashfs"
    combined = hashlib.sha256(meta.read_bytes() + root.read_bytes()).hexdigest()
    assert items["incus.tar.xz"]["combined_squashfs_sha256"] == combined == items["lxd.tar.xz"]["combined_squashfs_sha256"]
    assert json.loads((dest / "streams/v1/index.json").read_text())["index"]["images"]["products"] == [
        "tiny:1:minimal:amd64"]
    if not missing("incus-simplestreams"):          # Incus's own reader of such a tree
        check(subprocess.run(["incus-simplestreams", "verify"], cwd=dest, capture_output=True, text=True))
    assert temp_files(dest) == []


def _members(path: Path, opener: str) -> dict[str, bytes]:
    """A small tar's regular files by name (no `./`)."""
    import tarfile
    with tarfile.open(path, opener) as tf:
        return {m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf if m.isfile()  # type: ignore[union-attr]
                and m.size < 1 << 20}


@root_only
def test_arm64_is_named_each_hosts_way_in_every_format_and_index(tmp_path: Path, keys: Keys) -> None:
    """An aarch64 template beside an x86_64 one of the same image: each format's metadata and
    each mirror index names it as its host does (uname -m, Debian's, OCI's with variant v8)."""
    cache, dest = tmp_path / "cache", tmp_path / "mirror"
    arm = "tiny-1-aarch64-minimal"
    tiny_host_template(cache, tmp_path / "work")
    tiny_host_template(cache, tmp_path / "work-arm", name=arm, arch="aarch64", formats=("lxc", "incus", "oci"))
    meta = _members(cache / f"{arm}.lxc.meta.tar.xz", "r:xz")
    assert meta["config"].endswith(b"\nlxc.arch = aarch64\n") and b"lxc.arch = aarch64\n" in meta["config-user"]
    incus = _members(cache / f"{arm}.incus.tar.xz", "r:xz")["metadata.yaml"].decode()
    assert incus.startswith('architecture: "aarch64"\n') and '\n  architecture: "arm64"\n' in incus
    layout = _members(cache / f"{arm}.oci.tar", "r:")
    index = json.loads(layout["index.json"])
    (entry,) = index["manifests"]
    assert entry["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    manifest = json.loads(layout[f"blobs/sha256/{entry['digest'][7:]}"])
    config = json.loads(layout[f"blobs/sha256/{manifest['config']['digest'][7:]}"])
    assert (config["architecture"], config["os"], config["variant"]) == ("arm64", "linux", "v8")
    r = run_vztt("inspect", cache / f"{arm}.oci.tar", "--json")
    assert r.returncode == 0, r.stderr
    assert (r.json()["platform"], r.json()["variant"]) == ("linux/arm64/v8", "v8")
    # The x86_64 one has no variant (OCI's table gives amd64 none)
    assert json.loads(_members(cache / f"{TINY}.oci.tar", "r:")["index.json"])["manifests"][0]["platform"] == {
        "architecture": "amd64", "os": "linux"}
    # The mirror: index.json, LXC's index, simplestreams, each with both architectures
    r = run_vztt("publish", TINY, arm, "--to", dest, "--json", cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    ids = {p["name"]: p["id"] for p in r.json()["published"]}
    index_doc = parse_index((dest / "index.json").read_bytes(), "index")
    assert {t: doc["builds"][0]["arch"] for t, doc in index_doc["templates"].items()} == {
        TINY: "x86_64", arm: "aarch64"}
    assert index_doc["templates"][arm]["builds"][0]["archives"]["oci"]["host"]["arch"] == "arm64"
    lxc = (dest / "meta/1.0/index-system").read_text().splitlines()
    assert f"tiny;1;arm64;minimal;{ids[arm]};templates/{arm}/{ids[arm]}" in lxc
    assert f"tiny;1;amd64;minimal;{ids[TINY]};templates/{TINY}/{ids[TINY]}" in lxc
    products = json.loads((dest / "streams/v1/images.json").read_text())["products"]
    assert sorted(products) == ["tiny:1:minimal:amd64", "tiny:1:minimal:arm64"]
    assert products["tiny:1:minimal:arm64"]["arch"] == "arm64"
    assert list(products["tiny:1:minimal:arm64"]["versions"]) == [ids[arm]]
    assert temp_files(dest) == []


@root_only
def test_pull_takes_every_format_through_the_same_checks(tmp_path: Path, keys: Keys) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "mirror"
    tiny_host_template(cache, tmp_path / "work")
    assert run_vztt("publish", TINY, "--to", dest, cache=cache, env=keys.env()).returncode == 0
    host = tmp_path / "host"
    r = run_vztt("pull", TINY, "--from", dest, "--format", "lxc,oci", "--json", cache=host, env=keys.env())
    assert r.returncode == 0, r.stderr
    for f in formats.get("lxc").file_names(TINY) + formats.get("oci").file_names(TINY):
        assert (host / f).read_bytes() == (cache / f).read_bytes()
    # A part whose bytes changed on the mirror: refused, the cache as it was.
    meta = next((dest / "templates" / TINY).glob("*/meta.tar.xz"))
    meta.write_bytes(meta.read_bytes()[:-1] + b"\0")
    other = tmp_path / "other"
    before = snapshot(other)
    r = run_vztt("pull", TINY, "--from", dest, "--format", "lxc", cache=other, env=keys.env())
    assert r.returncode == 5 and "meta.tar.xz" in one_line_error(r)
    # (.mirrors: the index's serial, seen and kept against rollback, as any pull does)
    assert {k: v for k, v in snapshot(other).items() if not k.startswith((".locks", ".downloads", ".mirrors"))} \
        == before
    assert temp_files(other) == []


def test_index_reading_old_new_and_foreign() -> None:
    sha = "a" * 64
    rec = {"path": "templates/t/20260101T000000Z-aaaaaaaa/t.plain.tar.lz4", "sha256": sha, "size": 1, "tar_size": 1}
    build = {"id": "20260101T000000Z-aaaaaaaa", "manifest": {**rec, "path": rec["path"][:-13] + "manifest.json"},
             "archives": {"plain": rec}}
    doc = {"format": 1, "serial": 1, "templates": {"t": {"builds": [build]}}}
    parse_index(index_bytes(doc), "old")                   # what vztt wrote before parts existed
    build["archives"]["future"] = {**rec, "path": rec["path"] + ".future"}
    parse_index(index_bytes(doc), "foreign")               # a format this vztt does not know: kept
    build["archives"]["lxc"] = {**rec, "path": rec["path"] + ".lxc"}
    with pytest.raises(MirrorError, match="lxc archive: 1 files, the format has 2"):
        parse_index(index_bytes(doc), "short")
    build["archives"]["lxc"]["parts"] = [{**rec, "path": "../../etc/passwd"}]
    with pytest.raises(MirrorError, match="bad path"):
        parse_index(index_bytes(doc), "escape")
    build["archives"]["lxc"]["parts"] = [{**rec, "path": rec["path"] + ".meta"}]
    build["archives"]["lxc"]["host"] = {"os": "t", "release": "1\n", "releases": ["1"], "variant": "v",
                                        "arch": "amd64", "description": "d"}
    with pytest.raises(MirrorError, match="bad host fields"):
        parse_index(index_bytes(doc), "host")
    build["archives"]["lxc"]["host"]["os"] = "t;x"
    build["archives"]["lxc"]["host"]["release"] = "1"
    parsed = parse_index(index_bytes(doc), "semicolon")
    assert hostindex.lxc_index(parsed) == b""              # nothing LXC's parser would split on gets in


# -- failures: one line, nothing lost ------------------------------------------------------

@root_only
def test_a_missing_tool_fails_the_build_at_once_naming_the_format(tmp_path: Path) -> None:
    """mksquashfs made unusable in a mount namespace of the test's own: the build stops
    before anything is installed, one line, the cached template untouched."""
    cache = tmp_path / "cache"
    tiny_template(cache, "debian-12-x86_64-minimal")
    before = snapshot(cache)
    script = ('mount --bind /dev/null "$(command -v mksquashfs)" && exec "$@"')
    argv = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh"]
    from conftest import PACKAGE_CACHE, REPO
    import sys
    proc = subprocess.run([*argv, sys.executable, "-m", "vztt", "--cache-dir", str(cache), "build",
                           "debian-12-x86_64-minimal", "--format", "plain,incus"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "VZTT_PACKAGE_CACHE": str(PACKAGE_CACHE)}, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("vztt: ")]
    assert proc.returncode == 7 and len(lines) == 1, proc.stderr
    assert "mksquashfs is missing (format incus): apt-get install squashfs-tools" in lines[0]
    assert "resolve" not in proc.stderr                  # nothing was done before
    after = {k: v for k, v in snapshot(cache).items() if not k.startswith((".locks", "logs", ".work"))}
    assert after == before


@root_only
def test_no_space_fails_the_format_in_one_line(tmp_path: Path) -> None:
    """A format whose output does not fit: one line naming the format (and the tool), from
    xz's own complaint or from what Python wrote."""
    from vztt.base.progress import Progress
    from vztt.builder.pipeline import write_formats
    from vztt.store.templates import TemplateCache
    cache, tree, work = tmp_path / "cache", tmp_path / "tree", tmp_path / "work"
    tiny_template(cache, TINY, payload=os.urandom(3 << 20))
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/payload").write_bytes(os.urandom(3 << 20))
    work.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    check(run("mount", "-t", "tmpfs", "-o", "size=5m", "vztt-test-full", small))
    try:
        settings = {"distro": "tiny", "version": "1", "release": "one", "arch": "x86_64", "compression.level": 0}
        ctx = FormatContext(name=TINY, tree=tree, out=small, work=work, source_date_epoch=1,
                            lock_digest="sha256:" + "0" * 64, packages=[], settings=settings,
                            plain=cache / formats.get("plain").file_name(TINY))
        lxc = formats.get("lxc")
        check(run("fallocate", "-l", "4m", small / "filler"))
        outs = {p.suffix: small / p.cache_name(TINY) for p in lxc.part_list()}
        with pytest.raises(BuildError) as raised:
            lxc.write(FormatContext(**{**ctx.__dict__, "out": outs["lxc.rootfs.tar.xz"], "outs": outs}))
        assert str(raised.value).startswith("format lxc: xz: ") and "No space left on device" in str(raised.value)
        (small / "filler").unlink()
        # The pipeline's own step: plain (3 MB) fits, the OCI archive after it does not.
        temps: list[Path] = []
        with pytest.raises(BuildError, match=r"^format oci: writing .*oci\.tar.*: No space left on device$"):
            write_formats(("oci",), FormatContext(**{**ctx.__dict__, "plain": None}), TemplateCache(small),
                          Progress(quiet=True), temps)
    finally:
        run("umount", small)


def test_inspect_refuses_damaged_files_of_each_format(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    if os.geteuid() != 0:
        pytest.skip("needs root (the incus format unpacks onto a tmpfs)")
    tiny_host_template(cache, tmp_path / "work")
    cases = {f"{TINY}.lxc.rootfs.tar.xz": "not a readable .tar.xz", f"{TINY}.nspawn.tar.xz": "not a readable .tar.xz",
             f"{TINY}.oci.tar": "", f"{TINY}.incus.rootfs.squashfs": ""}
    for name, message in cases.items():
        good = cache / name
        bad = tmp_path / name
        data = bytearray(good.read_bytes())
        if name.endswith(".squashfs"):
            data[:4] = b"nope"
            message = "not a squashfs image"
        elif name.endswith(".oci.tar"):
            at = data.find(b'"architecture":"amd64","author"')      # the config blob, said otherwise
            data[at:at + 22] = b'"architecture":"arm64"'
            message = "the config does not match its digest"
        else:
            data = data[:len(data) // 2]
        bad.write_bytes(bytes(data))
        r = run_vztt("inspect", bad)
        assert r.returncode == 6, (name, r.stdout, r.stderr)
        assert message in one_line_error(r) and str(bad) in one_line_error(r)


def test_vztt_boots_only_what_it_can_and_says_so(tmp_path: Path) -> None:
    with pytest.raises(NotBootable):
        formats.get("oci").bootable_tree([], tmp_path)
    cache = tmp_path / "cache"
    tiny_template(cache, "debian-12-x86_64-minimal")
    r = run_vztt("test", "debian-12-x86_64-minimal", "--format", "lxc", cache=cache)
    assert r.returncode == 2 and "'lxc' is not one of 'plain', 'ploop'" in r.stderr
    r = run_vztt("test", "debian-12-x86_64-minimal", "--format", "ploop", cache=cache)
    assert r.returncode == 3 and "holds no ploop archive to boot" in one_line_error(r)
