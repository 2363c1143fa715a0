"""The plain format: the root tree as a reproducible `.tar.lz4` (what `vztt create` unpacks).

GNU tar writes the tar (it knows every corner of file metadata: hard links,
xattrs and file capabilities, ACLs, sparse files), with mmdebstrap's flags for
reproducibility: entries sorted by name, mtimes clamped to
SOURCE_DATE_EPOCH, numeric owners, pax headers without atime/ctime and with
names that do not depend on the tar process. Python's lz4 binding compresses
the stream into one LZ4 frame, so the output depends on the tree's contents
alone, and `lz4 -d` (or vztt's reader) takes it back.

Every other format is made from this archive (see formats/__init__.py), and
the reading helpers here (`reading`, `tar_members`) serve every format whose
file is a `.tar.lz4`.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lz4.frame

from vztt.base.errors import BuildError
from vztt.base.mounts import Mounts
from vztt.base.proc import PIPE, kill_tree, spawn, tool_env
from vztt.formats import Format, FormatContext, ImageFormatError, Inspection
from vztt.formats.safetar import Limits, extract_lz4, file_chunks
from vztt.store.manifest import ArchiveRecord

CHUNK = 1 << 20

TAR_FLAGS = [
    "--sort=name", "--clamp-mtime", "--numeric-owner", "--format=pax",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--xattrs", "--xattrs-include=*", "--acls", "--one-file-system",
]
# --sort=name is bytewise only in the C locale.
TAR_ENV = tool_env(LC_ALL="C")
# What `vztt inspect` lists of a plain archive's members (all of them would be thousands).
LISTED_MEMBERS = 20


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
    with open(out, "wb") as fh:
        tar = spawn(cmd, what=f"tar of {root}", env=TAR_ENV)
        try:
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
        finally:
            if tar.returncode is None:
                kill_tree(tar)
            for stream in (tar.stdout, tar.stderr):
                if stream is not None:
                    stream.close()
        fh.flush()
        os.fsync(fh.fileno())
    return PackResult(path=out, sha256=digest.hexdigest(), size=out.stat().st_size, tar_size=tar_size)


def unpack_own(archive: Path, dest: Path, *, what: str) -> None:
    """Unpack an archive this build just wrote, for `what` (trusted: never for archives
    from elsewhere, which go through formats/safetar.py)."""
    tar = spawn(["tar", "-x", "--numeric-owner", "-p", "--xattrs", "--xattrs-include=*", "--acls", "-C", dest],
                what=f"unpack {archive} for {what}", env=TAR_ENV, stdin=PIPE, stdout=None)
    assert tar.stdin is not None and tar.stderr is not None
    try:
        with lz4.frame.open(archive, "rb") as src:
            while chunk := src.read(CHUNK):
                tar.stdin.write(chunk)
        tar.stdin.close()
    except BrokenPipeError:
        pass
    except BaseException:
        kill_tree(tar)
        raise
    err = tar.stderr.read().decode(errors="replace").strip()
    if tar.wait() != 0:
        raise BuildError(f"unpack {archive} for {what}: {err.splitlines()[-1] if err else 'tar failed'}")


# --- reading a .tar.lz4 for inspect ----------------------------------------------

@contextmanager
def reading(path: Path, kind: str = ".tar.lz4") -> Iterator[None]:
    """Turn what a damaged or cut archive (`kind`) raises while read into one ImageFormatError line."""
    if not Path(path).is_file():
        raise ImageFormatError(f"{path}: no such file")
    try:
        yield
    except ImageFormatError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, tarfile.TarError, lzma.LZMAError, zlib.error) as e:
        # lz4 raises RuntimeError for a damaged frame, lzma LZMAError, gzip/zlib BadGzipFile
        # (an OSError) or zlib.error; tarfile EOFError/ReadError for a cut tar.
        raise ImageFormatError(f"{path}: not a readable {kind} ({type(e).__name__}: {e})") from None


def tar_members(path: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The members of a `.tar.lz4` in stream order (read them inside `reading(path)`)."""
    with lz4.frame.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
        for member in tf:
            yield member, tf


def xz_tar_members(path: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The members of a `.tar.xz` in stream order (read them inside `reading(path, ".tar.xz")`);
    xz's block checks are verified on the way."""
    with lzma.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
        for member in tf:
            yield member, tf


def count_tree(members: Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]], result: Inspection,
               visit: Callable[[tarfile.TarInfo, tarfile.TarFile], None] | None = None) -> None:
    """Members, file data and the packages the dpkg database says are installed, of a
    root tree's tar (any format's), into `result`; `visit` sees every member too."""
    dpkg_installed = 0
    for member, tf in members:
        result.members += 1
        result.tar_size += member.size
        name = member.name[2:] if member.name.startswith("./") else member.name
        if name == "var/lib/dpkg/status" and member.isfile():
            f = tf.extractfile(member)
            text = f.read().decode(errors="replace") if f else ""
            dpkg_installed = len(re.findall(r"^Status: install ok installed$", text, re.M))
        if visit is not None:
            visit(member, tf)
        if len(result.member_names) < LISTED_MEMBERS:
            result.member_names.append(member.name)
    if result.members == 0:
        raise ImageFormatError(f"{result.path}: empty archive")
    result.packages = dpkg_installed or None


def inspect(path: Path) -> Inspection:
    """What a plain archive holds: members, file data, and the packages its dpkg
    database says are installed."""
    result = Inspection(path=Path(path), format="plain")
    with reading(result.path):
        count_tree(tar_members(result.path), result)
    # The keys `vztt inspect --json` has always had for every file: none of them
    # applies to a plain archive.
    result.details = {"disk_size": None, "clusters_used": None, "cluster_size": None, "file_systems": None}
    return result


class PlainFormat(Format):
    """The root tree as a reproducible tar, LZ4-compressed: what `vztt create` unpacks."""

    name = "plain"
    suffix = "plain.tar.lz4"
    summary = "rootfs .tar.lz4 (vztt create, any host with tar and lz4)"
    step = "pack"
    needs_tar_size = True
    tools = (("tar", "tar"),)
    bootable = True

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        packed = pack_tree(ctx.tree, ctx.out, ctx.source_date_epoch)
        return ArchiveRecord(file=self.file_name(ctx.name), format=self.name, sha256=packed.sha256,
                             size=packed.size, tar_size=packed.tar_size)

    def describe(self, record: ArchiveRecord) -> str:
        return f"{(record.tar_size or 0) / 1e6:.0f} MB tar -> {record.size / 1e6:.0f} MB lz4"

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith(".tar.lz4") and not path.name.endswith(".ploopv2.tar.lz4")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        return inspect(path)

    @contextmanager
    def bootable_tree(self, files: list[Path], scratch: Path) -> Iterator[Path]:
        """The archive unpacked into a tmpfs: faster than the disk both ways, and it
        goes with one umount (in the caller's private mount namespace, even after SIGKILL)."""
        tree = scratch / "tree"
        with Mounts() as mounts:
            mounts.mount("vztt-boottest", tree, fstype="tmpfs", options="mode=0755,nosuid")
            # The cached archive may come from a mirror or anywhere: the guarded unpacker,
            # as `vztt create` uses, never plain tar.
            limits = Limits(max_bytes=shutil.disk_usage(tree).free)
            extract_lz4(file_chunks(files[0]), tree, limits, what=str(files[0]), hash_input=False)
            yield tree


FORMAT = PlainFormat()
