"""The ploop format's cache file: `<name>.plain.ploopv2.tar.lz4`, as Virtuozzo 7's vztt makes it.

A tar (root owned, member names and order as vztt's src/ploop.c) of the ploop
image `root.hds`, `DiskDescriptor.xml` and `templates/` (the package list in
vztt's vzpackages format, the template's timestamp), LZ4-compressed. The disk
is filled from the plain archive, so both formats hold the same tree.
`inspect` reads one back, trusting nothing in it.

Format references: vztt's src/ploop.c and src/util.c (cache members,
vzpackages format).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lz4.frame

from vztt.base.errors import BuildError
from vztt.base.mounts import Mounts
from vztt.base.proc import Log
from vztt.formats import ImageFormatError, Inspection
from vztt.formats.plain import reading, tar_members, unpack_own
from vztt.formats.ploop.descriptor import DESCRIPTOR_NAME, descriptor_for
from vztt.formats.ploop.disk import make_disk
from vztt.formats.ploop.image import IMAGE_NAME, ImageInfo, read_image, write_image

VZPACKAGES = "templates/vzpackages"
APP_CACHE_SUFFIX = "_app_"       # vztt's src/appcache.c


def app_cache_name(os_template: str, apps: Sequence[str]) -> str:
    """What `vzpkg create appcache` calls the cache of OS template `os_template` with the
    application templates `apps` (src/appcache.c, check_appcache_options): the OS name,
    `_app_`, and the md5 of the sorted names, one per line after five spaces (the list file
    vztt writes and hashes)."""
    listing = "".join(f"     {app}\n" for app in sorted(apps))
    return f"{os_template}{APP_CACHE_SUFFIX}{hashlib.md5(listing.encode()).hexdigest()}"


def vzpackages_text(packages: Sequence[tuple[str, str, str]]) -> str:
    """templates/vzpackages: vztt's save_vzpackages() format, one line per
    package, `" %-22s %-9s %s\\n"` of name, arch, [epoch:]version-release.
    vztt's readers skip lines without a leading space and split on blanks, so
    no field may be empty or contain whitespace."""
    out = []
    for pkg in packages:
        if len(pkg) != 3 or any(not isinstance(f, str) or not f or f.split() != [f] for f in pkg):
            raise BuildError(f"vzpackages: bad package entry {pkg!r} (need name, arch, evr without blanks)")
        out.append(" %-22s %-9s %s\n" % pkg)
    return "".join(out)


@dataclass(frozen=True)
class CacheMember:
    """One tar member of the cache; `source` (a file to copy) or `data`."""

    name: str
    type: str                      # "dir" | "file"
    mode: int
    mtime: int
    source: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        if self.type == "dir":
            return 0
        if self.data is not None:
            return len(self.data)
        assert self.source is not None
        return self.source.stat().st_size


def cache_members(template_name: str, *, image: Path, disk_descriptor: str, vzpackages: str,
                  timestamp: str, mtime: int, dot_prefix: bool = True,
                  more_templates: Sequence[str] = ()) -> list[CacheMember]:
    """The members of a plain.ploopv2 cache tar, in vztt's order.

    vztt runs `tar -c --numeric-owner ... | lz4` in the ploop directory:
    Virtuozzo 7's vztt archives "." (members `./root.hds`, `./templates/...`,
    `./DiskDescriptor.xml`), later versions name `root.hds templates
    DiskDescriptor.xml` (no `./`). vztt's package-list reader extracts
    `-O ./templates/vzpackages`, and GNU tar matches member names literally,
    so the `./` form (the default here) is the one every vztt reader finds.
    Owner is root (0/0) for all; the tar writer sets it. `more_templates`: the other
    templates of an app cache (its applications), each with its timestamp.
    """
    names = [template_name, *(t for t in more_templates if t != template_name)]
    for t in names:
        if not t or "/" in t or t in (".", "..") or t == "vzpackages":
            raise BuildError(f"cache: bad template name {t!r}")
    p = "./" if dot_prefix else ""
    image = Path(image)
    stamps = [m for t in names for m in (
        CacheMember(f"{p}templates/{t}/", "dir", 0o755, mtime),
        CacheMember(f"{p}templates/{t}/timestamp", "file", 0o644, mtime, data=timestamp.encode()))]
    return [
        CacheMember(f"{p}{IMAGE_NAME}", "file", 0o600, mtime, source=image),
        CacheMember(f"{p}templates/", "dir", 0o755, mtime),
        CacheMember(f"{p}templates/vzpackages", "file", 0o644, mtime, data=vzpackages.encode()),
        *stamps,
        CacheMember(f"{p}{DESCRIPTOR_NAME}", "file", 0o644, mtime, data=disk_descriptor.encode()),
    ]


def is_cache_member(path: str, kind: str) -> bool:
    """Whether a member (normalized path, guard type) belongs in a ploop cache: what the
    tar guard lets through when one is unpacked (vztt create, the boot test)."""
    return (path in (IMAGE_NAME, DESCRIPTOR_NAME, "templates") and kind == ("dir" if path == "templates" else "file")) \
        or (path.startswith("templates/") and path.count("/") <= 2 and kind in ("file", "dir"))


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
               log: Log | None = None, templates: Sequence[str] = ()) -> PloopResult:
    """The ploop cache of the plain archive `plain`, written to `out` (renamed into place by the caller).

    The disk is filled from the plain archive unpacked onto a tmpfs, not from
    the build tree: the archive's entries come in sorted order with clamped
    times, so mkfs allocates the same inodes to the same files every time, and
    the two formats hold exactly the same tree. `identity` (the lock digest)
    seeds the filesystem UUID and hash seed: the same lock gives the same bytes.
    """
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vztt:{name}:{identity}"))
    raw, hds, tree = workdir / "disk.raw", workdir / IMAGE_NAME, workdir / "ploop-tree"
    try:
        with Mounts() as mounts:
            mounts.mount("tmpfs", tree, fstype="tmpfs", options="mode=0755")
            unpack_own(plain, tree, what="the ploop disk")
            make_disk(tree, raw, disk_size, ext4_features=ext4_features, uuid=fs_uuid,
                      timestamp=source_date_epoch, log=log)
        stats = write_image(raw, hds)
        raw.unlink()
        info = read_image(hds)
        first, *more = templates or (name,)
        members = cache_members(
            first, image=hds, vzpackages=vzpackages_text(sorted(packages)),
            disk_descriptor=descriptor_for(info), timestamp=f"{source_date_epoch}\n", mtime=source_date_epoch,
            more_templates=more)
        digest = write_tar_lz4(out, members)
        return PloopResult(path=out, sha256=digest, size=out.stat().st_size, disk_size=stats.disk_size,
                           clusters=stats.clusters_written, fs_uuid=fs_uuid)
    finally:
        raw.unlink(missing_ok=True)
        hds.unlink(missing_ok=True)


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


def write_tar_lz4(out: Path, members: list[CacheMember]) -> str:
    """`tar -c --numeric-owner | lz4` of the members, byte-for-byte repeatable; the sha256 of `out`.
    (The caller writes `out` under a temporary name and renames it into place.)"""
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


# --- inspect -------------------------------------------------------------------

def inspect(path: Path, workdir: Path) -> Inspection:
    """What a ploop cache holds: its members (all named), the package count from
    templates/vzpackages, and the image's disk size and clusters, read_image checking
    everything in the image's header and BAT."""
    result = Inspection(path=Path(path), format="ploop")
    image = None
    with reading(result.path):
        for member, tf in tar_members(result.path):
            result.members += 1
            result.tar_size += member.size
            result.member_names.append(member.name)
            name = member.name[2:] if member.name.startswith("./") else member.name
            if name == IMAGE_NAME:
                image = _read_member_image(result.path, member, tf, workdir)
            elif name == VZPACKAGES:
                f = tf.extractfile(member)
                text = f.read().decode(errors="replace") if f else ""
                result.packages = sum(1 for line in text.splitlines() if line[:1].isspace() and line.split())
    if result.members == 0:
        raise ImageFormatError(f"{path}: empty archive")
    if image is None:
        raise ImageFormatError(f"{path}: ploop cache without {IMAGE_NAME}")
    result.details = {"disk_size": image.disk_size, "clusters_used": image.clusters_allocated,
                      "cluster_size": image.cluster_size, "file_systems": None}
    result.notes = [f"  disk      {image.disk_size / 2**30:.1f} GiB, cluster {image.cluster_size >> 10} KiB, "
                    f"{image.clusters_allocated} clusters used "
                    f"({image.clusters_allocated * image.cluster_size / 1e6:.0f} MB)",
                    *(f"    {n}" for n in result.member_names)]
    return result


def _read_member_image(path: Path, member: tarfile.TarInfo, tf: tarfile.TarFile, workdir: Path) -> ImageInfo:
    """The ploop image member, copied out to `workdir` and checked by read_image."""
    hds = workdir / f"inspect-{os.getpid()}.hds"
    try:
        src = tf.extractfile(member)
        assert src is not None
        with open(hds, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return read_image(hds)
    except ImageFormatError as e:
        raise ImageFormatError(f"{path}: {IMAGE_NAME}: {str(e).split(': ', 1)[-1]}") from None
    finally:
        hds.unlink(missing_ok=True)
