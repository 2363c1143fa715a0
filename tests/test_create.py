"""`vztt create` (issue #7): containers from cached templates, pulled from a real
nginx when missing, in the three layouts; booted with the container runtime;
and hostile archives, which must leave nothing behind, inside or outside.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import lz4.frame
import pytest

from conftest import REPO, BuiltTemplate, leftovers, one_line_error, run_vztt
from mirrorkit import NAME, Keys, Member, install_template, keys, small_tree, snapshot, tar_bytes, tiny_template, web
from nginx import Nginx
from vztt.formats.ploop import image as ploop
from vztt.boot.runtime import Container
from vztt.formats.safetar import Limits, TarGuard, UnsafeArchive

__all__ = ["keys", "web"]

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="create needs root")
TINY = "tiny-1-x86_64"
GiB = 1 << 30


def no_leftovers(cache: Path, parent: Path) -> None:
    assert leftovers(cache) == [], leftovers(cache)
    assert [p.name for p in parent.iterdir() if ".vztt-create-" in p.name] == [] if parent.exists() else True
    assert not [l for l in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
                if str(parent) in l or str(cache) in l]


@pytest.fixture(scope="module")
def mirror_url(debian12: BuiltTemplate, keys: Keys, web: Nginx) -> str:
    r = run_vztt("publish", NAME, "--to", web.mirror_root, cache=debian12.cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    return web.url("mirror")


# -- dir: pulled, streamed, booted ---------------------------------------------------------------

@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_create_pulls_the_template_and_the_container_boots(debian12: BuiltTemplate, mirror_url: str, keys: Keys,
                                                          tmp_path: Path) -> None:
    cache, dest = tmp_path / "host-cache", tmp_path / "vz" / "101"
    r = run_vztt("create", NAME, dest, "--layout", "dir", "--hostname", "ct101.example.test", "--from", mirror_url,
                 "--json", cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["layout"] == "dir" and doc["pulled"]["mirror"] == mirror_url and doc["members"] > 5000
    # The template is in the cache now, byte for byte what was published.
    assert (cache / f"{NAME}.plain.tar.lz4").read_bytes() == debian12.archive.read_bytes()
    assert json.loads((cache / f"{NAME}.manifest.json").read_text())["pulled"]["build"] == doc["build"]
    assert (dest / "etc" / "hostname").read_text() == "ct101.example.test\n"
    assert (dest / "etc" / "machine-id").read_bytes() == b""
    assert "127.0.1.1\tct101.example.test ct101" in (dest / "etc" / "hosts").read_text()
    assert os.stat(dest / "usr" / "bin" / "passwd").st_mode & 0o4000          # setuid kept
    no_leftovers(cache, dest.parent)

    with Container(dest, tmp_path / "state", name="vztt-create-test", hostname="ct101", overlay=True,
                   console_log=tmp_path / "console.log") as box:
        state, failed = box.wait_running(timeout=60)
        assert state in ("running", "degraded") and not failed, (state, failed)
        status, out = box.exec(["systemctl", "is-system-running"], timeout=30)
        assert out.strip() == "running", out
        status, machine_id = box.exec(["cat", "/etc/machine-id"], timeout=30)
        assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id), machine_id         # made at first boot
        assert box.poweroff(timeout=30)
    assert (dest / "etc" / "machine-id").read_bytes() == b""                  # the tree stays as created

    # From the cache now, offline, as an ext4 image: a fresh UUID each time.
    uuids = []
    for n in (102, 103):
        d = tmp_path / "vz" / str(n)
        r = run_vztt("create", NAME, d, "--layout", "ext4", "--size", "1G", "--offline", "--json", cache=cache)
        assert r.returncode == 0, r.stderr
        img = d / "root.img"
        assert img.stat().st_size == GiB and img.stat().st_blocks * 512 < 600 << 20      # sparse
        info = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True).stdout
        uuids.append(re.search(r"Filesystem UUID:\s+(\S+)", info).group(1))
        assert r.json()["fs_uuid"] == uuids[-1]
        assert subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0
        machine_id = subprocess.run(["debugfs", "-R", "cat /etc/machine-id", str(img)], capture_output=True).stdout
        assert machine_id == b""
    assert uuids[0] != uuids[1]
    no_leftovers(cache, tmp_path / "vz")


# -- ploop ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ploop_cache(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding debian-12 as a ploop cache only, made with the build's own ploop step
    (in a private mount namespace: its scratch tmpfs cannot outlive it)."""
    work = tmp_path_factory.mktemp("ploop-work")
    cache = tmp_path_factory.mktemp("ploop-cache")
    out = cache / f"{NAME}.plain.ploopv2.tar.lz4"
    m = debian12.manifest
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from vztt.formats.ploop import pack_ploop\n"
        "a = json.loads(sys.argv[1])\n"
        "pl = pack_ploop(Path(a['plain']), Path(a['out']), Path(a['work']), name=a['name'], "
        "packages=[tuple(p) for p in a['packages']], disk_size=a['disk_size'], ext4_features='safe', "
        "source_date_epoch=a['sde'], identity=a['identity'])\n"
        "print(json.dumps({'sha256': pl.sha256, 'size': pl.size, 'disk_size': pl.disk_size, "
        "'clusters': pl.clusters, 'fs_uuid': pl.fs_uuid}))\n")
    args = {"plain": str(debian12.archive), "out": str(out), "work": str(work), "name": NAME,
            "packages": [(p["name"], p["arch"], p["version"]) for p in m["packages"]], "disk_size": 10 * GiB,
            "sde": m["source_date_epoch"], "identity": m["lock_digest"]}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script,
                           json.dumps(args)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    pl = json.loads(proc.stdout)
    rec = {"file": out.name, "format": "ploop", "ext4_features": "safe", **pl}
    manifest = {**m, "formats": ["ploop"], "archive": rec, "archives": {"ploop": rec}}
    (cache / f"{NAME}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return cache


def _partition_fs(raw: Path) -> dict:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    (part,) = table["partitions"]
    dev = f"{raw}?offset={part['start'] * 512}"
    info = subprocess.run(["dumpe2fs", "-h", dev], capture_output=True, text=True).stdout
    return {"table": table, "part": part, "dev": dev,
            "uuid": re.search(r"Filesystem UUID:\s+(\S+)", info).group(1),
            "blocks": int(re.search(r"Block count:\s+(\d+)", info).group(1))}


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_ploop_layout_is_the_default_for_a_ploop_cache_and_is_resized(ploop_cache: Path, tmp_path: Path) -> None:
    dest = tmp_path / "vz" / "private" / "101"
    r = run_vztt("create", NAME, dest, "--size", "12G", "--hostname", "ploop-ct", "--json", cache=ploop_cache)
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["layout"] == "ploop" and doc["format"] == "ploop" and doc["size"] == 12 * GiB
    hds, dd = dest / "root.hdd" / "root.hds", dest / "root.hdd" / "DiskDescriptor.xml"
    info = ploop.read_image(hds)
    assert info.disk_size == 12 * GiB
    assert f"<Disk_size>{12 * GiB // 512}</Disk_size>" in dd.read_text()
    assert (dest / "templates" / "vzpackages").read_text().count("\n") > 100
    # Debian's ploop and qemu-img take it.
    assert subprocess.run(["ploop", "check", "-f", "-c", "-r", str(hds)], capture_output=True).returncode == 0
    qemu = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "parallels", str(hds)],
                                     capture_output=True, text=True, check=True).stdout)
    assert qemu["virtual-size"] == 12 * GiB
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "parallels", "-O", "raw", str(hds), str(raw)], check=True)
    fs = _partition_fs(raw)
    assert fs["part"]["start"] == 2048
    assert (fs["part"]["start"] + fs["part"]["size"]) * 512 == 12 * GiB - (1 << 20)   # one cluster before the end
    assert fs["blocks"] * 4096 == fs["part"]["size"] * 512                            # the filesystem fills it
    cached = json.loads((ploop_cache / f"{NAME}.manifest.json").read_text())["archives"]["ploop"]["fs_uuid"]
    assert fs["uuid"] != cached and uuid.UUID(fs["uuid"])
    assert subprocess.run(["e2fsck", "-fn", fs["dev"]], capture_output=True).returncode == 0

    def cat(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", fs["dev"]], capture_output=True).stdout

    assert cat("/etc/hostname") == b"ploop-ct\n" and cat("/etc/machine-id") == b""
    assert b"ID=debian" in cat("/usr/lib/os-release")
    no_leftovers(ploop_cache, dest.parent)
    # A plain layout needs the plain archive, which this cache does not have.
    r = run_vztt("create", NAME, tmp_path / "vz" / "102", "--layout", "dir", "--offline", cache=ploop_cache)
    assert r.returncode == 3 and "--layout ploop" in one_line_error(r)


# -- hostile archives ----------------------------------------------------------------------------------

HOSTILE = {
    "dotdot": [Member("./", tarfile.DIRTYPE), Member("../escaped", data=b"out\n")],
    "absolute": [Member("/OUTSIDE/escaped", data=b"out\n")],
    "symlink-then-write": [Member("./", tarfile.DIRTYPE), Member("etc", tarfile.SYMTYPE, link="/OUTSIDE"),
                           Member("etc/passwd", data=b"root::0:0::/root:/bin/sh\n")],
    "relative-symlink-then-write": [Member("a", tarfile.DIRTYPE),
                                    Member("a/up", tarfile.SYMTYPE, link="../../../../../../../OUTSIDE"),
                                    Member("a/up/escaped", data=b"out\n")],
    "hardlink-out": [Member("x", tarfile.LNKTYPE, link="../../../../../../OUTSIDE/sentinel")],
    "block-device": [Member("dev", tarfile.DIRTYPE), Member("dev/sda", tarfile.BLKTYPE, devmajor=8)],
    "symlink-replaced-by-file": [Member("lib", tarfile.SYMTYPE, link="/OUTSIDE"), Member("lib", data=b"x")],
}


@ROOT
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    (outside / "sentinel").write_text("untouched\n")
    members = [Member(m.name.replace("/OUTSIDE", str(outside)), m.type, m.data,
                      m.link.replace("/OUTSIDE", str(outside)), m.mode, m.devmajor, m.devminor)
               for m in HOSTILE[case]]
    raw = tar_bytes(members)
    cache = tmp_path / "cache"
    install_template(cache, TINY, lz4.frame.compress(raw), tar_size=len(raw))
    before = snapshot(tmp_path)
    dest = tmp_path / "ct" / "666"
    r = run_vztt("create", TINY, dest, "--layout", "dir", "--offline", cache=cache)
    assert r.returncode == 6, r.stderr
    assert one_line_error(r).startswith("vztt: archive error: ")
    assert not dest.exists()
    after = snapshot(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"ct", "cache/.locks", "cache/.work"} | {k for k in after if k.startswith("cache/.locks/")}, changed
    assert (outside / "sentinel").read_text() == "untouched\n" and sorted(os.listdir(outside)) == ["sentinel"]
    no_leftovers(cache, tmp_path / "ct")


@ROOT
def test_truncated_damaged_and_mismatched_archives(tmp_path: Path) -> None:
    raw = tar_bytes(small_tree(os.urandom(200_000)))
    good = lz4.frame.compress(raw)
    cases = {
        "truncated-lz4": (good[: len(good) // 2], 6, "lz4"),
        "truncated-tar": (lz4.frame.compress(raw[: len(raw) // 2]), 6, "truncated"),
        "not-lz4": (b"\0" * 4096, 6, "lz4"),
    }
    for case, (archive, code, word) in cases.items():
        cache = tmp_path / case
        install_template(cache, TINY, archive, tar_size=len(raw))
        dest = tmp_path / "ct" / case
        r = run_vztt("create", TINY, dest, "--layout", "dir", "--offline", cache=cache)
        assert r.returncode == code, (case, r.stderr)
        assert word in one_line_error(r), (case, r.stderr)
        assert not dest.exists()
        no_leftovers(cache, dest.parent)
    # A cached archive that no longer matches its manifest.
    cache = tmp_path / "changed"
    install_template(cache, TINY, good, tar_size=len(raw))
    changed = bytearray(raw)
    changed[4000] ^= 0x01                                   # one bit of the payload
    (cache / f"{TINY}.plain.tar.lz4").write_bytes(lz4.frame.compress(bytes(changed)))
    r = run_vztt("create", TINY, tmp_path / "ct" / "changed", "--layout", "dir", "--offline", cache=cache)
    assert r.returncode == 5 and "sha256" in one_line_error(r)
    assert not (tmp_path / "ct" / "changed").exists()


@ROOT
def test_destination_taken_and_too_little_space(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tiny_template(cache, payload=os.urandom(3 << 20))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("mine\n")
    r = run_vztt("create", TINY, taken, "--layout", "dir", "--offline", cache=cache)
    assert r.returncode == 6 and "not an empty directory" in one_line_error(r)
    assert sorted(os.listdir(taken)) == ["file"]
    # An empty directory is fine (as vzctl leaves /vz/private/ID).
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_vztt("create", TINY, empty, "--layout", "dir", "--hostname", "tiny", "--offline", cache=cache)
    assert r.returncode == 0, r.stderr
    assert (empty / "etc" / "hostname").read_text() == "tiny\n"
    assert (empty / "usr" / "bin" / "payload-link").stat().st_ino == (empty / "usr" / "bin" / "payload").stat().st_ino
    assert os.readlink(empty / "etc" / "localtime") == "/usr/share/zoneinfo/Etc/UTC"
    # A small filesystem: refused before anything is written.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "vztt-test-small", str(small)], check=True)
    try:
        r = run_vztt("create", TINY, small / "ct", "--layout", "dir", "--offline", cache=cache)
        assert r.returncode == 7 and "MB free" in one_line_error(r)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    r = run_vztt("create", TINY, tmp_path / "x", "--layout", "dir", "--hostname", "bad_name!", "--offline",
                 cache=cache)
    assert r.returncode == 2 and "--hostname" in one_line_error(r)


# -- the guard, without tar --------------------------------------------------------------------------------

def _guard(raw: bytes, max_bytes: int | None = None) -> TarGuard:
    guard = TarGuard(Limits(max_bytes=max_bytes or len(raw)))
    for i in range(0, len(raw), 777):                                   # odd pieces: headers split across feeds
        guard.feed(raw[i:i + 777])
    guard.finish()
    return guard


def test_guard_reads_names_as_tar_does() -> None:
    long = "d/" * 60 + "file"
    assert _guard(tar_bytes([Member(long, data=b"x")], tarfile.PAX_FORMAT)).stats.members == 1
    assert _guard(tar_bytes([Member(long, data=b"x")], tarfile.GNU_FORMAT)).stats.members == 1
    # The same escape through each way of spelling a long name: pax path, GNU long name, ustar prefix.
    evil = "a/" * 60 + "../" * 70 + "escaped"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with pytest.raises(UnsafeArchive, match=r"'\.\.'"):
            _guard(tar_bytes([Member(evil, data=b"x")], fmt))
    ustar = tar_bytes([Member("a/" * 50 + "../" * 3 + "escaped", data=b"x")], tarfile.USTAR_FORMAT)
    assert ustar[345:500].strip(b"\0")                                 # the name went into the prefix field
    with pytest.raises(UnsafeArchive, match=r"'\.\.'"):
        _guard(ustar)
    # A damaged header (bad checksum) stops the stream instead of being skipped.
    raw = bytearray(tar_bytes([Member("a", data=b"x"), Member("b", data=b"y")], tarfile.USTAR_FORMAT))
    raw[1024 + 10] ^= 0xFF
    with pytest.raises(UnsafeArchive, match="checksum"):
        _guard(bytes(raw))
    # Sizes are bounded.
    with pytest.raises(UnsafeArchive, match="more than"):
        _guard(tar_bytes([Member("big", data=b"x" * (2 << 20))]), max_bytes=100_000)


def test_guard_passes_safe_special_files() -> None:
    members = [Member("dev", tarfile.DIRTYPE), Member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
               Member("run", tarfile.DIRTYPE), Member("run/fifo", tarfile.FIFOTYPE)]
    assert _guard(tar_bytes(members)).stats.members == 4
    with pytest.raises(UnsafeArchive, match="device node"):
        _guard(tar_bytes([Member("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)]))
