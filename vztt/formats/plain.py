"""Packing a root tree into a reproducible `.tar.lz4`.

GNU tar writes the tar (it knows every corner of file metadata: hard links,
xattrs and file capabilities, ACLs, sparse files), with mmdebstrap's flags for
reproducibility: entries sorted by name, mtimes clamped to
SOURCE_DATE_EPOCH, numeric owners, pax headers without atime/ctime and with
names that do not depend on the tar process. Python's lz4 binding compresses
the stream into one LZ4 frame, so the output depends on the tree's contents
alone, and `lz4 -d` (or vztt's reader) takes it back.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lz4.frame

from vztt.base.errors import BuildError
from vztt.formats import Format, FormatContext, Inspection
from vztt.store.manifest import ArchiveRecord

CHUNK = 1 << 20

TAR_FLAGS = [
    "--sort=name", "--clamp-mtime", "--numeric-owner", "--format=pax",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--xattrs", "--xattrs-include=*", "--acls", "--one-file-system",
]


@dataclass(frozen=True)
class PackResult:
    path: Path
    sha256: str
    size: int                 # compressed bytes
    tar_size: int             # uncompressed tar bytes


def pack_tree(root: Path, out: Path, source_date_epoch: int, exclude: tuple[str, ...] = ("./lost+found",)) -> PackResult:
    """Write `root` as tar.lz4 to `out` (the caller renames it into place)."""
    cmd = ["tar", "--create", "--file=-", f"--directory={root}", f"--mtime=@{source_date_epoch}", *TAR_FLAGS]
    cmd += [f"--exclude={e}" for e in exclude]
    cmd.append(".")
    digest = hashlib.sha256()
    tar_size = 0
    env = {**os.environ, "LC_ALL": "C"}  # --sort=name is bytewise only in the C locale
    with open(out, "wb") as fh, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as tar:
        assert tar.stdout is not None and tar.stderr is not None
        with lz4.frame.LZ4FrameCompressor(block_size=lz4.frame.BLOCKSIZE_MAX4MB, content_checksum=True) as comp:
            def emit(data: bytes) -> None:
                if data:
                    digest.update(data)
                    fh.write(data)
            emit(comp.begin())
            while chunk := tar.stdout.read(CHUNK):
                tar_size += len(chunk)
                emit(comp.compress(chunk))
            emit(comp.flush())
        err = tar.stderr.read().decode(errors="replace").strip()
        if tar.wait() != 0:
            raise BuildError(f"tar of {root}: {err.splitlines()[-1] if err else 'exit status ' + str(tar.returncode)}")
        fh.flush()
        os.fsync(fh.fileno())
    return PackResult(path=out, sha256=digest.hexdigest(), size=out.stat().st_size, tar_size=tar_size)


def open_tar_stream(path: Path):  # -> file object of the uncompressed tar
    """The decompressed stream of a .tar.lz4, for tarfile's streaming mode."""
    return lz4.frame.open(path, "rb")


class PlainFormat(Format):
    """The root tree as a reproducible tar, LZ4-compressed: what `vztt create` unpacks."""

    name = "plain"
    suffix = "plain.tar.lz4"
    summary = "rootfs .tar.lz4 (vztt create, any host with tar and lz4)"

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        packed = pack_tree(ctx.tree, ctx.out, ctx.source_date_epoch)
        return ArchiveRecord(file=self.file_name(ctx.name), format=self.name, sha256=packed.sha256,
                             size=packed.size, tar_size=packed.tar_size)

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith(".tar.lz4") and not path.name.endswith(".ploopv2.tar.lz4")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        from vztt.formats.vzcache import inspect
        return inspect(path, workdir)


FORMAT = PlainFormat()
