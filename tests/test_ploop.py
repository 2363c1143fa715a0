"""ploop v2 caches (vztt/ploop.py), checked by independent referees.

Referees from Debian: ploop 1.15 (`ploop check`, `ploop snapshot-list`),
qemu-img (its parallels driver reads ploop v2), e2fsprogs (e2fsck, debugfs,
dumpe2fs) and gdisk (sgdisk). Needs root (mkfs through a private bind mount,
chown in the sample tree). Nothing here attaches a loop device; the last test
checks that none was left behind anyway.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ploop_helpers as H  # noqa: E402
from rootfs_helpers import debian_rootfs, rootfs_cached  # noqa: E402

from vztt.formats import ploop  # noqa: E402
from vztt.base.errors import BuildError  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(bool(H.missing_tools()), reason=f"missing tools: {H.missing_tools()}"),
]

MiB = 1 << 20
DISK = 512 * MiB
UUID = "6b1f2a8e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
TS = 1_700_000_000


@dataclass
class Built:
    tree: Path
    raw: Path
    hds: Path
    layout: ploop.DiskLayout
    stats: ploop.ImageStats
    raw2: Path
    hds2: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    d = tmp_path_factory.mktemp("ploop")
    tree = H.make_sample_tree(d / "tree")
    layout = ploop.make_disk(tree, d / "disk.raw", DISK, uuid=UUID, timestamp=TS)
    stats = ploop.write_image(d / "disk.raw", d / "root.hds")
    # The second run, for the reproducibility test.
    ploop.make_disk(tree, d / "disk2.raw", DISK, uuid=UUID, timestamp=TS)
    ploop.write_image(d / "disk2.raw", d / "root2.hds")
    return Built(tree, d / "disk.raw", d / "root.hds", layout, stats, d / "disk2.raw", d / "root2.hds")


def sha256(p: Path) -> str:
    """Content digest, holes included as zeros (see ploop_helpers.content_digest)."""
    return H.content_digest(p)


# --- the image against ploop and qemu ----------------------------------------

def test_ploop_check_accepts_image(built: Built) -> None:
    # -f: check even if the dirty flag is clear; -c: also look for duplicate
    # blocks and holes; -r: read-only. Exit 0 and nothing on stderr.
    proc = H.run("ploop", "check", "-f", "-c", "-r", built.hds)
    assert proc.stderr.strip() == ""


def test_ploop_reads_descriptor(built: Built, tmp_path: Path) -> None:
    info = ploop.read_image(built.hds)
    d = tmp_path / "ct"
    d.mkdir()
    (d / "root.hds").write_bytes(built.hds.read_bytes())   # ploop check may write: a copy
    (d / "DiskDescriptor.xml").write_text(ploop.descriptor_for(info))
    out = H.run("ploop", "snapshot-list", d / "DiskDescriptor.xml").stdout
    assert ploop.TOPDELTA_GUID in out and str(d / "root.hds") in out
    H.run("ploop", "check", d / "DiskDescriptor.xml")


def test_qemu_reads_back_the_raw_disk(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    H.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", built.hds, out)
    assert out.stat().st_size == built.raw.stat().st_size == DISK
    H.run("cmp", out, built.raw)                      # every byte, once, the plain way
    info = H.run("qemu-img", "info", "-f", "parallels", built.hds).stdout
    assert f"({DISK} bytes)" in info


def test_read_raw_round_trip(built: Built, tmp_path: Path) -> None:
    back = tmp_path / "back.raw"
    info = ploop.read_raw(built.hds, back)
    assert sha256(back) == sha256(built.raw)
    assert info.clusters_allocated == built.stats.clusters_written


def test_header_and_layout(built: Built) -> None:
    info = ploop.read_image(built.hds)
    head = built.hds.read_bytes()[:64]
    assert head[:16] == b"WithouFreSpacExt"
    sig, typ, heads, cyls, sectors, nbat, dsect, in_use, first, flags, ext = struct.unpack("<16sIIIIIQIIIQ", head)
    assert (typ, sectors, nbat, dsect, in_use, first, flags, ext) == (2, 2048, 512, DISK // 512, 0, 2048, 0, 0)
    assert (heads, cyls) == (16, DISK // 512 // 1008)          # ConvertToCHS, middle range
    assert info.disk_size == DISK and info.cluster_size == MiB
    size = built.hds.stat().st_size
    assert size % MiB == 0 and size == (1 + built.stats.clusters_written) * MiB
    # No holes anywhere (ploop check refuses sparse images), header cluster included.
    with open(built.hds, "rb") as fh:
        assert os.lseek(fh.fileno(), 0, os.SEEK_HOLE) == size
    # Only non-zero clusters are stored: far fewer than the 512 of the disk.
    assert 0 < built.stats.clusters_written < 40


# --- the disk inside -----------------------------------------------------------

def test_gpt_partition_starts_at_2048(built: Built) -> None:
    out = H.run("sgdisk", "-i", "1", built.raw).stdout
    assert "First sector: 2048 " in out
    # ploop's create_gpt_partition: the partition ends one cluster before the end.
    assert f"Last sector: {DISK // 512 - 2048 - 1} " in out
    assert "0FC63DAF-8483-4772-8E79-3D69D8477DE4" in out and "'primary'" in out
    assert "No problems found" in H.run("sgdisk", "-v", built.raw).stdout
    assert built.layout.partition_start == 2048


def test_e2fsck_passes_on_the_partition(built: Built, tmp_path: Path) -> None:
    # Taken out of what qemu reads from the image, not from our raw file.
    out = tmp_path / "out.raw"
    H.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", built.hds, out)
    part = H.extract(out, tmp_path / "part.img", 2048 * 512, built.layout.fs_size)
    proc = H.run("e2fsck", "-fn", part, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_filesystem_options_match_ploop(built: Built) -> None:
    sb = H.run("dumpe2fs", "-h", f"{built.raw}?offset={2048 * 512}").stdout
    fields = dict(line.split(":", 1) for line in sb.splitlines() if ":" in line)
    f = {k.strip(): v.strip() for k, v in fields.items()}
    features = f["Filesystem features"].split()
    assert "metadata_csum" not in features and "64bit" not in features       # "safe"
    assert {"has_journal", "extent", "flex_bg", "uninit_bg", "dir_index", "resize_inode"} <= set(features)
    assert f["Filesystem UUID"] == UUID
    assert set(f["Default mount options"].split()) == {"user_xattr", "acl"}
    assert f["Errors behavior"] == "Remount read-only"
    assert f["Maximum mount count"] == "-1" and f["Check interval"].startswith("0 ")
    assert f["Block size"] == "4096" and f["Total journal size"] == "128M"
    assert f["Reserved GDT blocks"] == "1023"                                 # resize= up to 16T
    assert int(f["Block count"]) * 4096 == built.layout.fs_size <= built.layout.partition_size


def test_files_read_back_with_debugfs(built: Built) -> None:
    off = 2048 * 512
    for name, data in H.FILES.items():
        assert H.debugfs_cat(built.raw, f"/{name}", off) == data, name
    shadow = H.debugfs(built.raw, "stat /etc/shadow", off)
    assert "Mode:  0600" in shadow
    link = H.debugfs(built.raw, "stat /etc/hostname.link", off)
    assert "Type: symlink" in link and 'Fast link dest: "hostname"' in link
    tool = H.debugfs(built.raw, "stat /usr/bin/tool", off)
    assert "Links: 2" in tool
    ino = H.debugfs(built.raw, "ls -l /usr/bin", off)
    nums = {line.split()[-1]: line.split()[0] for line in ino.splitlines() if "tool" in line}
    assert nums["tool"] == nums["tool-hardlink"]
    assert "xattr-value" in H.debugfs(built.raw, "ea_get /etc/motd user.vztt", off)
    assert "User:  1000   Group:  1000" in H.debugfs(built.raw, "stat /var/lib/data.bin", off)
    balloon = H.debugfs(built.raw, f"stat /{ploop.BALLOON_NAME}", off)
    assert "Type: regular    Mode:  0600" in balloon
    assert "User:     0   Group:     0" in balloon and "Size: 0\n" in balloon


def test_reproducible(built: Built) -> None:
    assert sha256(built.raw) == sha256(built.raw2)
    assert sha256(built.hds) == sha256(built.hds2)


def test_other_uuid_other_bytes(built: Built, tmp_path: Path) -> None:
    layout = ploop.make_disk(built.tree, tmp_path / "d.raw", DISK, uuid="00000000-1111-2222-3333-444444444444",
                             timestamp=TS)
    assert sha256(tmp_path / "d.raw") != sha256(built.raw)
    assert layout.disk_guid != built.layout.disk_guid


def test_source_date_epoch_is_honoured(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(TS))
    layout = ploop.make_disk(built.tree, tmp_path / "d.raw", DISK, uuid=UUID)
    assert layout.timestamp == TS
    assert sha256(tmp_path / "d.raw") == sha256(built.raw)


def test_modern_profile_keeps_e2fsprogs_defaults(built: Built, tmp_path: Path) -> None:
    ploop.make_disk(built.tree, tmp_path / "m.raw", DISK, ext4_features="modern", timestamp=TS)
    sb = H.run("dumpe2fs", "-h", f"{tmp_path / 'm.raw'}?offset={2048 * 512}").stdout
    assert "metadata_csum" in sb and "64bit" in sb
    part = H.extract(tmp_path / "m.raw", tmp_path / "p.img", 2048 * 512, 300 * MiB)
    assert H.run("e2fsck", "-fn", part, check=False).returncode == 0
    ploop.write_image(tmp_path / "m.raw", tmp_path / "m.hds")
    H.run("ploop", "check", "-f", "-c", "-r", tmp_path / "m.hds")


def test_make_disk_refusals(built: Built, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="too small|below"):
        ploop.make_disk(built.tree, tmp_path / "x.raw", 64 * MiB)
    with pytest.raises(BuildError, match="ext4_features"):
        ploop.make_disk(built.tree, tmp_path / "x.raw", DISK, ext4_features="fancy")
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "blob", "wb") as fh:           # real data, not a hole
        for _ in range(200):
            fh.write(os.urandom(MiB))
    with pytest.raises(BuildError, match="does not fit") as e:
        ploop.make_disk(big, tmp_path / "x.raw", 300 * MiB)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob(".x.raw.tmp-*"))   # nothing half-made left behind


def test_balloon_already_in_tree(tmp_path: Path) -> None:
    tree = H.make_sample_tree(tmp_path / "t")
    (tree / ploop.BALLOON_NAME).write_bytes(b"")
    (tree / ploop.BALLOON_NAME).chmod(0o644)
    ploop.make_disk(tree, tmp_path / "d.raw", DISK, timestamp=TS)
    st = H.debugfs(tmp_path / "d.raw", f"stat /{ploop.BALLOON_NAME}", 2048 * 512)
    assert "Mode:  0600" in st
    (tree / ploop.BALLOON_NAME).write_bytes(b"x")
    with pytest.raises(BuildError, match="balloon"):
        ploop.make_disk(tree, tmp_path / "e.raw", DISK, timestamp=TS)


@pytest.fixture(scope="session")
def real_tree() -> Path:
    """A real minbase tree, the boot tests' (built once and cached by tests/rootfs_helpers.py:
    ~30 s from the host's apt sources on a fresh machine). A fixture, not a collection-time
    skipif: the tree exists only once something has built it."""
    return debian_rootfs()


@(pytest.mark.network if not rootfs_cached() else lambda f: f)     # the first run builds it from the mirror
def test_debian_tree_end_to_end(tmp_path: Path, real_tree: Path) -> None:
    # A real minbase tree (~10k inodes, big directories, device nodes).
    layouts = [ploop.make_disk(real_tree, tmp_path / f"d{i}.raw", 2 << 30, uuid=UUID, timestamp=TS)
               for i in (1, 2)]
    assert sha256(tmp_path / "d1.raw") == sha256(tmp_path / "d2.raw")
    ploop.write_image(tmp_path / "d1.raw", tmp_path / "root.hds")
    H.run("ploop", "check", "-f", "-c", "-r", tmp_path / "root.hds")
    out = tmp_path / "q.raw"
    H.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", tmp_path / "root.hds", out)
    part = H.extract(out, tmp_path / "p.img", 2048 * 512, layouts[0].fs_size)
    proc = H.run("e2fsck", "-fn", part, check=False)
    assert proc.returncode == 0, proc.stdout
    assert H.debugfs_cat(part, "/etc/debian_version").startswith(b"12")


# --- write_image on a big sparse disk ----------------------------------------------

def test_write_image_reads_only_data(tmp_path: Path) -> None:
    raw = tmp_path / "big.raw"
    rng = random.Random(7)
    data_clusters = sorted(rng.sample(range(1024), 40))
    with open(raw, "wb") as fh:
        fh.truncate(1 << 30)                          # 1 GiB, sparse
        for c in data_clusters:
            fh.seek(c * MiB)
            fh.write(rng.randbytes(MiB // 2) + bytes(MiB // 2))
        fh.seek(1000 * MiB)
        fh.write(bytes(2 * MiB))                      # allocated, but zeros
    stats = ploop.write_image(raw, tmp_path / "big.hds")
    assert stats.clusters_written == len(data_clusters)
    assert stats.zero_clusters_skipped == 2
    assert stats.bytes_read == (len(data_clusters) + 2) * MiB
    info = ploop.read_image(tmp_path / "big.hds")
    assert [i for i, v in enumerate(info.bat) if v] == data_clusters
    assert info.file_size == (1 + len(data_clusters)) * MiB
    H.run("ploop", "check", "-f", "-c", "-r", tmp_path / "big.hds")
    back = tmp_path / "back.raw"
    ploop.read_raw(tmp_path / "big.hds", back)
    assert sha256(back) == sha256(raw)


def test_empty_disk_and_odd_size(tmp_path: Path) -> None:
    raw = tmp_path / "e.raw"
    with open(raw, "wb") as fh:
        fh.truncate(3 * MiB + 512)                    # rounded up to whole clusters, as ploop does
    stats = ploop.write_image(raw, tmp_path / "e.hds")
    info = ploop.read_image(tmp_path / "e.hds")
    assert stats.clusters_written == 0 and info.flags == ploop.CIF_EMPTY
    assert info.disk_size == 4 * MiB and info.file_size == MiB
    H.run("ploop", "check", "-f", "-c", "-r", tmp_path / "e.hds")


def test_smaller_cluster_size(built: Built, tmp_path: Path) -> None:
    stats = ploop.write_image(built.raw, tmp_path / "small.hds", cluster_size=64 * 1024)
    assert stats.file_size % (64 * 1024) == 0
    out = tmp_path / "o.raw"
    H.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", tmp_path / "small.hds", out)
    assert sha256(out) == sha256(built.raw)


def test_content_digest_sees_every_byte(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with open(p, "wb") as fh:
            fh.truncate(8 * MiB)
            fh.seek(3 * MiB + 5)
            fh.write(b"data")
    assert sha256(a) == sha256(b)
    with open(b, "r+b") as fh:
        fh.seek(7 * MiB + 100)                          # in a hole of a
        fh.write(b"\x01")
    assert sha256(a) != sha256(b)
    os.truncate(b, 9 * MiB)
    assert sha256(a) != sha256(b)


# --- geometry, descriptor, package list, members -----------------------------------

@pytest.mark.parametrize("sectors,chs", [
    (2097152, (2080, 16, 63)),        # 1 GiB: ATA-2 middle range
    (20971520, (40960, 16, 32)),      # 10 GiB
    (131072, (256, 16, 32)),          # 64 MiB
    (1032192, (1024, 16, 63)),        # the boundary is exclusive
    (7, (7, 1, 1)),                   # pure LBA
])
def test_convert_to_chs(sectors: int, chs: tuple[int, int, int]) -> None:
    c = ploop.convert_to_chs(sectors)
    assert (c.cylinders, c.heads, c.sectors) == chs


def test_disk_descriptor_xml() -> None:
    geo = ploop.disk_geometry(2097152)
    text = ploop.disk_descriptor_xml(2097152, geo.cylinders, geo.heads, geo.sectors, 2048)
    assert text.startswith('<?xml version="1.0"?>\n<Parallels_disk_image>\n  <Disk_Parameters>\n')
    root = ET.fromstring(text)
    assert root.tag == "Parallels_disk_image"
    assert [c.tag for c in root] == ["Disk_Parameters", "StorageData", "Snapshots"]
    dp = root.find("Disk_Parameters")
    assert [(c.tag, c.text) for c in dp] == [("Disk_size", "2097152"), ("Cylinders", "2080"), ("Heads", "16"),
                                             ("Sectors", "63"), ("Padding", "0")]
    st = root.find("StorageData/Storage")
    assert [c.tag for c in st] == ["Start", "End", "Blocksize", "Image"]
    assert (st.findtext("Start"), st.findtext("End"), st.findtext("Blocksize")) == ("0", "2097152", "2048")
    img = st.find("Image")
    assert [(c.tag, c.text) for c in img] == [("GUID", "{5fbaabe3-6958-40ff-92a7-860e329aab41}"),
                                              ("Type", "Compressed"), ("File", "root.hds")]
    snaps = root.find("Snapshots")
    assert [c.tag for c in snaps] == ["TopGUID", "Shot"]
    assert snaps.findtext("TopGUID") == "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
    assert [(c.tag, c.text) for c in snaps.find("Shot")] == [
        ("GUID", "{5fbaabe3-6958-40ff-92a7-860e329aab41}"), ("ParentGUID", "{00000000-0000-0000-0000-000000000000}")]
    other = ploop.disk_descriptor_xml(2097152, 2080, 16, 63, root_element="Virtuozzo_disk_image")
    assert ET.fromstring(other).tag == "Virtuozzo_disk_image"


def test_vzpackages_format_is_byte_exact() -> None:
    text = ploop.vzpackages_text([("bash", "amd64", "5.2.15-2+b2"), ("libc6", "amd64", "2.36-9+deb12u4"),
                                  ("a-package-name-longer-than-22", "all", "1:2.0-1")])
    assert text == (" bash                   amd64     5.2.15-2+b2\n"
                    " libc6                  amd64     2.36-9+deb12u4\n"
                    " a-package-name-longer-than-22 all       1:2.0-1\n")
    with pytest.raises(BuildError):
        ploop.vzpackages_text([("two words", "amd64", "1")])


def test_cache_members(built: Built) -> None:
    members = ploop.cache_members("debian-12-x86_64", image=built.hds, disk_descriptor="<x/>",
                                  vzpackages=" a b c\n", timestamp="1700000000\n", mtime=TS)
    assert [m.name for m in members] == [
        "./root.hds", "./templates/", "./templates/vzpackages", "./templates/debian-12-x86_64/",
        "./templates/debian-12-x86_64/timestamp", "./DiskDescriptor.xml"]
    assert members[0].source == built.hds and members[0].size == built.hds.stat().st_size
    assert members[2].data == b" a b c\n"
    plain = ploop.cache_members("t", image=built.hds, disk_descriptor="", vzpackages="", timestamp="", mtime=0,
                                dot_prefix=False)
    assert plain[0].name == "root.hds" and plain[2].name == "templates/vzpackages"


# --- the inspector on malformed images ---------------------------------------------

def _good_image(tmp_path: Path) -> Path:
    raw = tmp_path / "g.raw"
    with open(raw, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(2 * MiB)
        fh.write(b"\x01" * MiB)
        fh.seek(5 * MiB)
        fh.write(b"\x02" * 100)
    hds = tmp_path / "g.hds"
    ploop.write_image(raw, hds)
    return hds


def _patch(p: Path, offset: int, data: bytes) -> None:
    with open(p, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _expect_format_error(p: Path, pattern: str) -> None:
    with pytest.raises(ploop.ImageFormatError, match=pattern) as e:
        ploop.read_image(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)), msg
    assert e.value.exit_code == 6 and e.value.kind == "format"


def test_good_image_reads(tmp_path: Path) -> None:
    info = ploop.read_image(_good_image(tmp_path))
    assert info.clusters_allocated == 2 and [i for i, v in enumerate(info.bat) if v] == [2, 5]


def test_bad_signature(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    _patch(p, 0, b"NotAPloopImage!!")
    _expect_format_error(p, "signature")


def test_v1_signature(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    _patch(p, 0, b"WithoutFreeSpace")
    _expect_format_error(p, "v1")


def test_wrong_version(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    _patch(p, 16, struct.pack("<I", 3))
    _expect_format_error(p, "version")


def test_bat_entry_past_end(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    _patch(p, 64 + 4 * 5, struct.pack("<I", 99))
    _expect_format_error(p, "BAT entry 5 points past the end")


def test_bat_entry_into_header(tmp_path: Path) -> None:
    # 4 KiB clusters: 2048 BAT entries need three header clusters (0-2).
    raw = tmp_path / "s.raw"
    with open(raw, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(MiB)
        fh.write(b"\x03" * 4096)
    p = tmp_path / "s.hds"
    ploop.write_image(raw, p, cluster_size=4096)
    assert ploop.read_image(p).header_clusters == 3
    _patch(p, 64 + 4 * 256, struct.pack("<I", 2))
    _expect_format_error(p, "BAT entry 256 points into the header")


def test_truncated_file(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    os.truncate(p, 40)
    _expect_format_error(p, "truncated")
    p2 = _good_image(tmp_path)
    os.truncate(p2, 1000)
    _expect_format_error(p2, "truncated")


def test_truncated_data_cluster(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    os.truncate(p, 2 * MiB)                          # drops the second data cluster
    _expect_format_error(p, "past the end")


def test_size_not_cluster_multiple(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    with open(p, "ab") as fh:
        fh.write(b"\0" * 512)
    _expect_format_error(p, "not a multiple of the cluster size")


def test_in_use_and_duplicate_and_geometry(tmp_path: Path) -> None:
    p = _good_image(tmp_path)
    _patch(p, 44, struct.pack("<I", ploop.SIGNATURE_DISK_IN_USE))
    _expect_format_error(p, "in use")
    p = _good_image(tmp_path)
    _patch(p, 64 + 4 * 6, struct.pack("<I", 1))      # same file cluster as entry 2
    _expect_format_error(p, "both point at cluster 1")
    p = _good_image(tmp_path)
    _patch(p, 32, struct.pack("<I", 9))              # BAT count that does not match the size
    _expect_format_error(p, "BAT has 9 entries")
    p = _good_image(tmp_path)
    _patch(p, 28, struct.pack("<I", 3000))           # cluster not a power of two
    _expect_format_error(p, "power of two")


def test_missing_file(tmp_path: Path) -> None:
    _expect_format_error(tmp_path / "nope.hds", "cannot read")


def test_random_corruption_never_escapes_as_other_exceptions(tmp_path: Path) -> None:
    good = _good_image(tmp_path).read_bytes()
    rng = random.Random(12345)
    p = tmp_path / "fuzz.hds"
    for _ in range(400):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(0, 64 + 4 * 8 + 8)    # header and BAT
            data[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(0, len(data))]
        p.write_bytes(bytes(data))
        try:
            ploop.read_image(p)
        except ploop.ImageFormatError as e:
            assert "\n" not in str(e)


# --- nothing left behind --------------------------------------------------------------

def test_zz_no_loop_devices_left(tmp_path_factory: pytest.TempPathFactory) -> None:
    assert H.loop_devices_backed_by([tmp_path_factory.getbasetemp()]) == []
