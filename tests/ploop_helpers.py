"""Helpers for tests/test_ploop.py: a small sample tree and the referee tools.

The referees are independent implementations from Debian: ploop (1.15),
qemu-img (qemu-utils), e2fsprogs (e2fsck, debugfs, dumpe2fs) and gdisk's
sgdisk. None of them needs a loop device or a mount.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

TOOLS = ("ploop", "qemu-img", "e2fsck", "debugfs", "dumpe2fs", "sgdisk", "sfdisk", "mkfs.ext4", "tune2fs")

# name -> content of the regular files in the sample tree
FILES = {
    "etc/hostname": b"vztt-test\n",
    "etc/motd": b"hello from a ploop image\n",
    "etc/shadow": b"root:*:19000:0:99999:7:::\n",
    "usr/bin/tool": b"#!/bin/sh\necho tool\n",
    "var/lib/data.bin": bytes(range(256)) * 64,
}


def content_digest(path: Path) -> str:
    """sha256 of a file's content, holes read as zeros, without reading the holes.

    Every non-zero MiB is hashed with its offset, then the size: equal
    digests mean equal bytes, however sparse either file is.
    """
    chunk = 1 << 20
    zero = bytes(chunk)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        pos = done = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            off = max(start // chunk * chunk, done)
            while off < end:
                data = os.pread(fd, chunk, off)
                if data != zero[:len(data)]:
                    h.update(off.to_bytes(8, "little") + data)
                off += chunk
            done = off                  # a chunk spanning two extents is hashed once
            pos = end
        h.update(b"size" + size.to_bytes(8, "little"))
    return h.hexdigest()


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def make_sample_tree(root: Path) -> Path:
    """A few files, a symlink, a hard link, a 0600 file, an xattr, a non-root owner."""
    for name, data in FILES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "usr/bin/tool").chmod(0o755)
    (root / "etc/shadow").chmod(0o600)
    os.symlink("hostname", root / "etc/hostname.link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    os.setxattr(root / "etc/motd", "user.vztt", b"xattr-value")
    os.chown(root / "var/lib/data.bin", 1000, 1000)
    (root / "empty-dir").mkdir()
    return root


def run(*argv: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, errors="replace",
                          env={**os.environ, "LC_ALL": "C"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def debugfs(image: Path, request: str, offset: int = 0) -> str:
    """Run one read-only debugfs request; return its stdout."""
    dev = f"{image}?offset={offset}" if offset else str(image)
    return run("debugfs", "-R", request, dev).stdout


def debugfs_cat(image: Path, path: str, offset: int = 0) -> bytes:
    """A file's bytes as debugfs reads them out of the filesystem."""
    dev = f"{image}?offset={offset}" if offset else str(image)
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", dev], capture_output=True, check=True)
    return proc.stdout


def extract(raw: Path, out: Path, offset: int, length: int) -> Path:
    """Copy `length` bytes at `offset` out of `raw`, keeping holes (like dd conv=sparse)."""
    chunk = 1 << 20
    zero = bytes(chunk)
    with open(raw, "rb") as src, open(out, "wb") as dst:
        dst.truncate(length)
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            data = os.pread(src.fileno(), n, offset + pos)
            if data != zero[:len(data)]:
                os.pwrite(dst.fileno(), data, pos)
            pos += n
    return out


def loop_devices_backed_by(paths: list[Path]) -> list[str]:
    """Lines of `losetup -a` whose backing file is under one of `paths`."""
    out = run("losetup", "-a", check=False).stdout
    roots = [str(p) for p in paths]
    return [line for line in out.splitlines() if any(r in line for r in roots)]
