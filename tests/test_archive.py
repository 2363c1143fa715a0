"""The packed archive: same tree -> same bytes, and the metadata survives."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import lz4.frame

from vztt.formats.plain import pack_tree

SDE = 1_700_000_000
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # cap_net_raw+ep


def make_tree(root: Path, reverse: bool) -> None:
    names = ["usr/bin/tool", "etc/b.conf", "etc/a.conf", "var/new-file"]
    for name in (reversed(names) if reverse else names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {name}\n")
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.link(root / "etc/a.conf", root / "etc/a-link.conf")
    os.symlink("../usr/bin/tool", root / "etc/tool-link")
    os.chown(root / "etc/b.conf", 1234, 4321)
    os.setxattr(root / "usr/bin/tool", "security.capability", CAP)
    os.setxattr(root / "etc/b.conf", "user.note", b"kept")
    (root / "lost+found").mkdir()
    # Old files keep their time; files newer than SOURCE_DATE_EPOCH are clamped to it.
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(Path(dirpath) / n, (SDE - 1000, SDE - 1000), follow_symlinks=False)
    os.utime(root / "var/new-file", (SDE + 99999, SDE + 99999))


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(lz4.frame.decompress(archive.read_bytes())), mode="r:") as tf:
        return tf.getmembers()


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, reverse=False)
    make_tree(b, reverse=True)          # other creation order, other inode numbers
    ra = pack_tree(a, tmp_path / "a.tar.lz4", SDE)
    rb = pack_tree(b, tmp_path / "b.tar.lz4", SDE)
    assert ra.sha256 == rb.sha256
    assert (tmp_path / "a.tar.lz4").read_bytes() == (tmp_path / "b.tar.lz4").read_bytes()
    other = pack_tree(a, tmp_path / "c.tar.lz4", SDE + 1)
    assert other.sha256 != ra.sha256     # the clamp is part of the bytes


def test_metadata_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_tree(root, reverse=False)
    out = tmp_path / "t.tar.lz4"
    pack_tree(root, out, SDE)
    ms = members(out)
    names = [m.name for m in ms]
    assert names == sorted(names, key=lambda n: n.encode())              # sorted by name
    assert "./lost+found" not in names
    by = {m.name: m for m in ms}
    # Sorted by name, a-link.conf comes first and holds the data; a.conf links to it.
    assert by["./etc/a-link.conf"].isreg() and by["./etc/a.conf"].islnk()
    assert by["./etc/a.conf"].linkname == "./etc/a-link.conf"
    assert by["./etc/tool-link"].issym() and by["./etc/tool-link"].linkname == "../usr/bin/tool"
    assert (by["./etc/b.conf"].uid, by["./etc/b.conf"].gid) == (1234, 4321)
    assert all(m.uname == "" and m.gname == "" for m in ms)            # numeric owners only
    assert by["./usr/bin/tool"].mode & 0o7777 == 0o4755
    assert by["./var/new-file"].mtime == SDE and by["./etc/b.conf"].mtime == SDE - 1000
    caps = by["./usr/bin/tool"].pax_headers["SCHILY.xattr.security.capability"]
    assert caps.encode("utf-8", "surrogateescape") == CAP
    assert by["./etc/b.conf"].pax_headers["SCHILY.xattr.user.note"] == "kept"
    assert not any("atime" in k or "ctime" in k for m in ms for k in m.pax_headers)
    # The lz4 command-line tool reads our frames.
    listing = subprocess.run(f"lz4 -dc {out} | tar -t", shell=True, capture_output=True, text=True, check=True)
    assert "./usr/bin/tool" in listing.stdout.split()
