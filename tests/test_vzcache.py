"""Virtuozzo ploop caches from a real build, judged by Debian's ploop and qemu-img."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import lz4.frame
import pytest

from conftest import BuiltTemplate, leftovers, one_line_error, run_vztt
from vztt.formats.ploop import BALLOON_NAME

pytestmark = [pytest.mark.network, pytest.mark.slow]

# vztt's member names (src/ploop.c archives "." on Virtuozzo 7; its reader asks for ./templates/vzpackages).
def expected_members(name: str) -> list[str]:
    return ["./root.hds", "./templates", "./templates/vzpackages", f"./templates/{name}",
            f"./templates/{name}/timestamp", "./DiskDescriptor.xml"]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def both(debian12: BuiltTemplate) -> dict:
    """The same lock built again with both of vztt's own formats."""
    r = run_vztt("build", debian12.name, "--locked", "--format", "plain,ploop", "--json", cache=debian12.cache)
    assert r.returncode == 0, r.stderr
    return json.loads((debian12.cache / f"{debian12.name}.manifest.json").read_text())


@pytest.fixture(scope="module")
def unpacked(debian12: BuiltTemplate, both: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ploop")
    archive = debian12.cache / both["archives"]["ploop"]["file"]
    subprocess.run(f"lz4 -dc {archive} | tar -x -C {d}", shell=True, check=True)
    return d


def test_member_names_follow_vztt(debian12: BuiltTemplate, both: dict) -> None:
    archive = debian12.cache / both["archives"]["ploop"]["file"]
    assert archive.name == f"{debian12.name}.plain.ploopv2.tar.lz4"
    listing = subprocess.run(f"lz4 -dc {archive} | tar -t --numeric-owner -v", shell=True, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    names = [line.split()[-1].rstrip("/") for line in listing]
    assert names == expected_members(debian12.name)
    assert all(" 0/0 " in line for line in listing)                   # numeric root owner
    # vztt's own reader command finds the package list.
    out = subprocess.run(f"lz4 -d < {archive} | tar -x -O ./templates/vzpackages", shell=True,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == both["package_count"]
    for line in lines:
        assert re.fullmatch(r" \S+\s+\S+\s+\S+", line), line
    apt = next(l for l in lines if l.split()[0] == "apt")
    locked = next(p for p in debian12.lock["packages"] if p["name"] == "apt")
    assert apt == " %-22s %-9s %s" % ("apt", "amd64", locked["version"])


def test_plain_archive_is_unchanged_by_format_all(debian12: BuiltTemplate, both: dict) -> None:
    assert both["formats"] == ["plain", "ploop"]
    # Against the first build's own output (its --json), not the manifest `both` rewrote,
    # and against the bytes now in the cache.
    first = debian12.build.json()
    assert both["archives"]["plain"]["sha256"] == first["sha256"]
    assert sha256_of(debian12.cache / both["archives"]["plain"]["file"]) == first["sha256"]
    # What ships to Virtuozzo was booted too: from the ploop cache's own disk.
    assert both["boot_test"]["formats"]["ploop"]["result"] == "passed"


def test_ploop_tools_accept_the_image(unpacked: Path, both: dict, tmp_path: Path) -> None:
    hds = unpacked / "root.hds"
    with open(hds, "rb") as fh:
        head = fh.read(64)
    sig, version, _, _, cluster_sectors, nbat, disk_sectors = struct.unpack("<16sIIIIIQ", head[:44])
    assert sig == b"WithouFreSpacExt" and version == 2 and cluster_sectors == 2048
    assert disk_sectors * 512 == both["archives"]["ploop"]["disk_size"] == 10 << 30
    assert hds.stat().st_size % (1 << 20) == 0
    assert subprocess.run(["ploop", "check", "-f", "-c", "-r", str(hds)], capture_output=True).returncode == 0
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "parallels", "-O", "raw", str(hds), str(raw)], check=True)
    gpt = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True)
    part = json.loads(gpt.stdout)["partitiontable"]
    assert part["label"] == "gpt" and part["partitions"][0]["start"] == 2048
    fs = tmp_path / "part.img"
    subprocess.run(["dd", f"if={raw}", f"of={fs}", "bs=1M", "skip=1", "conv=sparse", "status=none"], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /etc/debian_version", str(fs)], capture_output=True, text=True)
    assert re.match(r"12\.\d+", cat.stdout)
    stat = subprocess.run(["debugfs", "-R", f"stat /{BALLOON_NAME}", str(fs)], capture_output=True, text=True)
    assert "Mode:  0600" in stat.stdout and "Size: 0" in stat.stdout
    status = subprocess.run(["debugfs", "-R", "cat /var/lib/dpkg/status", str(fs)], capture_output=True, text=True)
    assert status.stdout.count("Status: install ok installed") == both["package_count"]
    features = subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True).stdout
    feature_line = next(l for l in features.splitlines() if l.startswith("Filesystem features"))
    assert "metadata_csum" not in feature_line and "64bit" not in feature_line     # the safe default
    assert "has_journal" in feature_line


def test_disk_descriptor(unpacked: Path, both: dict) -> None:
    root = ET.parse(unpacked / "DiskDescriptor.xml").getroot()
    assert root.tag == "Virtuozzo_disk_image"
    sectors = both["archives"]["ploop"]["disk_size"] // 512
    assert int(root.findtext("Disk_Parameters/Disk_size")) == sectors
    assert int(root.findtext("StorageData/Storage/End")) == sectors
    assert root.findtext("StorageData/Storage/Blocksize") == "2048"
    assert root.findtext("StorageData/Storage/Image/GUID") == "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
    assert root.findtext("StorageData/Storage/Image/File") == "root.hds"
    assert root.findtext("Snapshots/TopGUID") == "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
    assert root.findtext("Snapshots/Shot/ParentGUID") == "{00000000-0000-0000-0000-000000000000}"


def test_inspect_both_formats(debian12: BuiltTemplate, both: dict) -> None:
    plain = run_vztt("inspect", debian12.cache / both["archives"]["plain"]["file"], "--json", cache=debian12.cache)
    assert plain.returncode == 0, plain.stderr
    assert plain.json()["format"] == "plain" and plain.json()["packages"] == both["package_count"]
    pl = run_vztt("inspect", debian12.cache / both["archives"]["ploop"]["file"], "--json", cache=debian12.cache)
    doc = pl.json()
    assert doc["format"] == "ploop" and doc["packages"] == both["package_count"]
    assert doc["disk_size"] == 10 << 30 and doc["clusters_used"] == both["archives"]["ploop"]["clusters"]
    assert doc["member_names"] == expected_members(debian12.name)
    text = run_vztt("inspect", debian12.cache / both["archives"]["ploop"]["file"], cache=debian12.cache)
    assert "clusters used" in text.stdout
    assert leftovers(debian12.cache) == []


def _ploop_cache(path: Path, hds: bytes) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("./root.hds")
        info.size = len(hds)
        tf.addfile(info, io.BytesIO(hds))
    path.write_bytes(lz4.frame.compress(buf.getvalue()))
    return path


def _header(disk_sectors: int = 4096, nbat: int = 2) -> bytes:
    return struct.pack("<16sIIIIIQIIIQ", b"WithouFreSpacExt", 2, 16, 1, 2048, nbat, disk_sectors, 0, 2048, 0, 0)


@pytest.mark.parametrize("label,make,message", [
    ("bad signature", lambda: b"NotAPloopImage!!" + _header()[16:] + b"\0" * ((1 << 20) - 64),
     "root.hds: not a ploop v2 image"),
    ("BAT past the end", lambda: (_header() + struct.pack("<II", 7, 0)).ljust(1 << 20, b"\0"),
     "root.hds: BAT entry 0 points past the end"),
    ("truncated image", lambda: _header()[:40], "root.hds: truncated"),
])
def test_inspect_refuses_malformed_images(tmp_path: Path, label: str, make, message: str) -> None:  # type: ignore[no-untyped-def]
    archive = _ploop_cache(tmp_path / "bad.plain.ploopv2.tar.lz4", make())
    r = run_vztt("inspect", archive, cache=tmp_path / "c")
    assert r.returncode == 6
    assert message in one_line_error(r)


def test_inspect_refuses_a_truncated_archive(debian12: BuiltTemplate, both: dict, tmp_path: Path) -> None:
    src = debian12.cache / both["archives"]["ploop"]["file"]
    cut = tmp_path / "cut.plain.ploopv2.tar.lz4"
    with open(src, "rb") as fh:
        cut.write_bytes(fh.read(src.stat().st_size // 3))
    r = run_vztt("inspect", cut, cache=tmp_path / "c")
    assert r.returncode == 6
    assert "cut.plain.ploopv2.tar.lz4" in one_line_error(r)
