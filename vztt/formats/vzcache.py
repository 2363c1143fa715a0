"""Template archives in the two formats a host takes, and a reader for both.

  plain  <name>.plain.tar.lz4          the root filesystem as a tar (vztt/archive.py)
  ploop  <name>.plain.ploopv2.tar.lz4  Virtuozzo 7's cache: a ploop v2 image of an
                                       ext4 disk ("plain" = ext4), DiskDescriptor.xml
                                       and templates/vzpackages (vztt/ploop.py)

`inspect` opens either and says what it holds, trusting nothing in it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lz4.frame

from vztt.formats.ploop import image as ploop
from vztt.base.errors import BuildError
from vztt.base.mounts import Mounts
from vztt.formats.ploop.image import ImageFormatError

FORMATS = ("plain", "ploop")
SUFFIX = {"plain": "plain.tar.lz4", "ploop": "plain.ploopv2.tar.lz4"}


def formats_for(choice: str) -> tuple[str, ...]:
    return FORMATS if choice == "all" else (choice,)


@dataclass(frozen=True)
class PloopResult:
    path: Path
    sha256: str
    size: int
    disk_size: int
    clusters: int             # data clusters stored in root.hds
    fs_uuid: str


def pack_ploop(plain: Path, out: Path, workdir: Path, *, name: str, packages: Sequence[tuple[str, str, str]],
               disk_size: int, ext4_features: str, source_date_epoch: int, identity: str,
               log: Any = None) -> PloopResult:
    """The ploop cache of the plain archive `plain`, written to `out` (renamed into place by the caller).

    The disk is filled from the plain archive unpacked onto a tmpfs, not from
    the build tree: the archive's entries come in sorted order with clamped
    times, so mkfs allocates the same inodes to the same files every time, and
    the two formats hold exactly the same tree. `identity` (the lock digest)
    seeds the filesystem UUID and hash seed: the same lock gives the same bytes.
    """
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vztt:{name}:{identity}"))
    raw, hds, tree = workdir / "disk.raw", workdir / ploop.IMAGE_NAME, workdir / "ploop-tree"
    try:
        with Mounts() as mounts:
            mounts.mount("tmpfs", tree, fstype="tmpfs", options="mode=0755")
            _unpack_own_archive(plain, tree)
            ploop.make_disk(tree, raw, disk_size, ext4_features=ext4_features, uuid=fs_uuid,
                            timestamp=source_date_epoch, log=log)
        stats = ploop.write_image(raw, hds)
        raw.unlink()
        info = ploop.read_image(hds)
        members = ploop.cache_members(
            name, image=hds, vzpackages=ploop.vzpackages_text(sorted(packages)),
            disk_descriptor=ploop.descriptor_for(info), timestamp=f"{source_date_epoch}\n", mtime=source_date_epoch)
        digest = _write_tar_lz4(out, members)
        return PloopResult(path=out, sha256=digest, size=out.stat().st_size, disk_size=stats.disk_size,
                           clusters=stats.clusters_written, fs_uuid=fs_uuid)
    finally:
        raw.unlink(missing_ok=True)
        hds.unlink(missing_ok=True)


def _unpack_own_archive(archive: Path, dest: Path) -> None:
    """Unpack an archive this build just wrote (trusted: not for archives from elsewhere)."""
    tar = subprocess.Popen(["tar", "-x", "--numeric-owner", "-p", "--xattrs", "--xattrs-include=*", "--acls",
                            "-C", str(dest)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None and tar.stderr is not None
    try:
        with lz4.frame.open(archive, "rb") as src:
            while chunk := src.read(1 << 20):
                tar.stdin.write(chunk)
        tar.stdin.close()
    except BrokenPipeError:
        pass
    err = tar.stderr.read().decode(errors="replace").strip()
    if tar.wait() != 0:
        raise BuildError(f"unpack {archive} for the ploop disk: {err.splitlines()[-1] if err else 'tar failed'}")


class _HashingWriter(io.RawIOBase):
    """A file that hashes what passes through it on the way to disk."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _write_tar_lz4(out: Path, members: list[ploop.CacheMember]) -> str:
    """`tar -c --numeric-owner | lz4` of the members, byte-for-byte repeatable."""
    with open(out, "wb") as raw_fh:
        sink = _HashingWriter(raw_fh)
        with lz4.frame.LZ4FrameFile(sink, mode="wb", block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                                    content_checksum=True) as comp:
            with tarfile.open(fileobj=comp, mode="w|", format=tarfile.GNU_FORMAT, bufsize=1 << 20) as tf:
                for m in members:
                    info = tarfile.TarInfo(m.name.rstrip("/"))
                    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = m.mode, m.mtime, 0, 0, "", ""
                    if m.type == "dir":
                        info.type = tarfile.DIRTYPE
                        tf.addfile(info)
                    elif m.data is not None:
                        info.size = len(m.data)
                        tf.addfile(info, io.BytesIO(m.data))
                    else:
                        assert m.source is not None
                        info.size = m.source.stat().st_size
                        with open(m.source, "rb") as src:
                            tf.addfile(info, src)
        raw_fh.flush()
        os.fsync(raw_fh.fileno())
    return sink.sha.hexdigest()


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------

@dataclass
class Inspection:
    path: Path
    format: str                              # plain | ploop
    members: int = 0
    tar_size: int = 0
    packages: int | None = None
    member_names: list[str] = field(default_factory=list)   # ploop: all; plain: first few
    disk_size: int | None = None
    clusters_used: int | None = None
    cluster_size: int | None = None
    file_systems: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def _stream(path: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    with lz4.frame.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
        for member in tf:
            yield member, tf


def inspect(path: Path, workdir: Path) -> Inspection:
    path = Path(path)
    if not path.is_file():
        raise ImageFormatError(f"{path}: no such file")
    try:
        return _inspect(path, workdir)
    except ImageFormatError:
        raise
    except (RuntimeError, EOFError, OSError, tarfile.TarError) as e:
        # lz4 raises RuntimeError for a damaged frame; tarfile EOFError/ReadError for a cut tar.
        raise ImageFormatError(f"{path}: not a readable .tar.lz4 ({type(e).__name__}: {e})") from None


def _inspect(path: Path, workdir: Path) -> Inspection:
    result = Inspection(path=path, format="plain")
    dpkg_installed = 0
    for member, tf in _stream(path):
        result.members += 1
        result.tar_size += member.size
        name = member.name[2:] if member.name.startswith("./") else member.name
        if name == ploop.IMAGE_NAME:
            result.format = "ploop"
            hds = workdir / f"inspect-{os.getpid()}.hds"
            try:
                src = tf.extractfile(member)
                assert src is not None
                with open(hds, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                info = ploop.read_image(hds)
            except ImageFormatError as e:
                raise ImageFormatError(f"{path}: {ploop.IMAGE_NAME}: {str(e).split(': ', 1)[-1]}") from None
            finally:
                hds.unlink(missing_ok=True)
            result.disk_size, result.clusters_used, result.cluster_size = (
                info.disk_size, info.clusters_allocated, info.cluster_size)
        elif name == "templates/vzpackages":
            f = tf.extractfile(member)
            text = f.read().decode(errors="replace") if f else ""
            result.packages = sum(1 for line in text.splitlines() if line[:1].isspace() and line.split())
        elif name == "var/lib/dpkg/status" and member.isfile():
            f = tf.extractfile(member)
            text = f.read().decode(errors="replace") if f else ""
            dpkg_installed = len(re.findall(r"^Status: install ok installed$", text, re.M))
        if result.format == "ploop" or len(result.member_names) < 20:
            result.member_names.append(member.name)
    if result.members == 0:
        raise ImageFormatError(f"{path}: empty archive")
    if result.format == "plain":
        result.packages = dpkg_installed or None
    elif result.disk_size is None:
        raise ImageFormatError(f"{path}: ploop cache without {ploop.IMAGE_NAME}")
    return result
