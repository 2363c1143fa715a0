"""The incus format: the split image Incus and LXD import, a metadata tarball and
`rootfs.squashfs` (`incus image import incus.tar.xz rootfs.squashfs`, or a
mirror's simplestreams index: mirror/simplestreams.py).

incus.tar.xz (Incus's doc/reference/image_format.md):

  metadata.yaml         architecture (uname -m), creation_date and expiry_date (from the lock's
                        source date), properties os/release/variant/architecture/description/
                        name/serial and vztt.lock_sha256; templates for /etc/hostname and /etc/hosts
  templates/hostname.tpl, hosts.tpl   pongo2: `{{ container.name }}`, which LXD and Incus both give

rootfs.squashfs is made by mksquashfs from the plain archive unpacked onto a
tmpfs (the same tree, sorted, times clamped), with SOURCE_DATE_EPOCH set: its
superblock time is the source date and newer file times are clamped to it;
`-reproducible` (its default) keeps the order independent of the processor
count. squashfs cannot hold POSIX ACLs (mksquashfs drops system.posix_acl_*;
the one Debian ships, /var/log/journal's, is set again by systemd-tmpfiles at
boot); every other xattr (security.capability...) is kept.

The image's fingerprint, as Incus computes it, is sha256(incus.tar.xz ||
rootfs.squashfs): kept in the record (`combined_sha256`) for the mirror's index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from vztt.base.errors import BuildError
from vztt.base.mounts import Mounts
from vztt.base.proc import run, tool_env
from vztt.formats import FormatContext, ImageFormatError, Inspection, Part
from vztt.formats.compress import CHUNK, xz_bytes
from vztt.formats.hostmeta import HostFormat, ImageMeta
from vztt.formats.plain import reading, unpack_own, xz_tar_members
from vztt.formats.tarstream import hosts_with, small_tar
from vztt.store.manifest import ArchivePart, ArchiveRecord
from vztt.store.packages import sha256_file

ROOTFS = Part("incus.rootfs.squashfs", "rootfs.squashfs")
META = Part("incus.tar.xz", "incus.tar.xz")
NAME_TEMPLATE = "{{ container.name }}"
SQUASHFS_FLAGS = ["-noappend", "-reproducible", "-no-progress", "-quiet", "-xattrs"]
SQUASHFS_MAGIC = b"hsqs"
SQUASHFS_COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
METADATA_KEYS = ("architecture:", "creation_date:", "properties:")


def yaml_text(value: Any, indent: int = 0) -> str:
    """Block YAML for dicts, lists, strings, ints and bools; strings JSON-quoted (valid YAML)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return " {}\n"
        return "\n" + "".join(f"{pad}{json.dumps(k) if ':' in k or k.startswith('/') else k}:"
                              f"{yaml_text(v, indent + 1)}" for k, v in value.items())
    if isinstance(value, list):
        return " []\n" if not value else "\n" + "".join(f"{pad}-{yaml_text(v, indent + 1)}" for v in value)
    if isinstance(value, bool):
        return f" {'true' if value else 'false'}\n"
    if isinstance(value, int):
        return f" {value}\n"
    return f" {json.dumps(str(value))}\n"


def metadata_files(meta: ImageMeta, hosts: bytes | None) -> dict[str, bytes]:
    template = {"when": ["create", "copy"], "create_only": False, "properties": {}}
    doc = {
        "architecture": meta.arch.kernel,
        "creation_date": meta.source_date_epoch,
        "expiry_date": meta.expiry_epoch,
        "properties": {
            "architecture": meta.arch.debian, "description": meta.description, "name": meta.name, "os": meta.os,
            "release": meta.release, "serial": meta.serial, "variant": meta.variant,
            "vztt.lock_sha256": meta.lock_sha256,
        },
        "templates": {"/etc/hostname": {**template, "template": "hostname.tpl"},
                      "/etc/hosts": {**template, "template": "hosts.tpl"}},
    }
    return {"metadata.yaml": yaml_text(doc).lstrip("\n").encode(),
            "templates/hostname.tpl": f"{NAME_TEMPLATE}\n".encode(),
            "templates/hosts.tpl": hosts_with(NAME_TEMPLATE, hosts)}


def combined_sha256(*paths: Path) -> str:
    """Incus's fingerprint of a split image: sha256 over the files, one after the other."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _read_regular(path: Path) -> bytes | None:
    """A regular file of our own tree, never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with open(fd, "rb") as fh:
        return fh.read(1 << 20)


class IncusFormat(HostFormat):
    """Incus's and LXD's split image: metadata tarball + squashfs."""

    name = "incus"
    suffix = ROOTFS.suffix
    parts = (ROOTFS, META)
    summary = "Incus/LXD split image: incus.tar.xz + rootfs.squashfs (incus image import, simplestreams)"
    step = "incus"
    tools = (("mksquashfs", "squashfs-tools"), ("xz", "xz-utils"), ("tar", "tar"))
    shares_files = False

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        meta, compression = self.image(ctx)
        rootfs, meta_out = ctx.out_for(ROOTFS), ctx.out_for(META)
        tree = ctx.work / "incus-tree"
        with Mounts() as mounts:
            mounts.mount("vztt-incus", tree, fstype="tmpfs", options="mode=0755")
            unpack_own(ctx.plain, tree, what=f"format {self.name}")
            hosts = _read_regular(tree / "etc" / "hosts")
            # An inherited SOURCE_DATE_EPOCH plus mksquashfs's own time options is fatal to it:
            # the environment is exactly ours.
            run(["mksquashfs", tree, rootfs, *SQUASHFS_FLAGS, *compression.squashfs],
                what=f"format {self.name}: mksquashfs", error=BuildError, inherit_env=False,
                env=tool_env(SOURCE_DATE_EPOCH=str(ctx.source_date_epoch)), log=ctx.log)
        tree.rmdir()
        xz_bytes(small_tar(metadata_files(meta, hosts), ctx.source_date_epoch, dirs=("templates",)), meta_out,
                 compression, self.name)
        return ArchiveRecord(
            file=ROOTFS.cache_name(ctx.name), format=self.name, sha256=sha256_file(rootfs),
            size=rootfs.stat().st_size,
            details={"squashfs": compression.squashfs_name, "combined_sha256": combined_sha256(meta_out, rootfs),
                     "host": meta.index_fields()},
            parts=[ArchivePart(META.cache_name(ctx.name), sha256_file(meta_out), meta_out.stat().st_size)])

    def describe(self, record: ArchiveRecord) -> str:
        meta = record.parts[0].size if record.parts else 0
        return (f"rootfs.squashfs {record.size / 1e6:.0f} MB ({record.details.get('squashfs', '?')}) + "
                f"metadata {meta} bytes, fingerprint {str(record.details.get('combined_sha256', ''))[:12]}")

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith((f".{ROOTFS.suffix}", f".{META.suffix}")) or \
            path.name in (ROOTFS.published, META.published, "lxd.tar.xz")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        path = Path(path)
        is_meta = path.name.endswith(f".{META.suffix}") or path.name in (META.published, "lxd.tar.xz")
        if is_meta:
            rootfs = path.with_name(ROOTFS.published if path.name in (META.published, "lxd.tar.xz")
                                    else path.name[:-len(META.suffix)] + ROOTFS.suffix)
            meta = path
        else:
            rootfs = path
            meta = path.with_name(META.published if path.name == ROOTFS.published
                                  else path.name[:-len(ROOTFS.suffix)] + META.suffix)
        result = Inspection(path=path, format=self.name)
        if not path.is_file():
            raise ImageFormatError(f"{path}: no such file")
        if meta.is_file():
            result.details.update(_inspect_metadata(meta))
            result.notes.append(f"  metadata  {meta}: architecture {result.details['architecture']}, "
                                f"templates {', '.join(result.details['templates'])}")
        if rootfs.is_file():
            _inspect_squashfs(rootfs, result)
        if meta.is_file() and rootfs.is_file():
            result.details["fingerprint"] = combined_sha256(meta, rootfs)
            result.notes.append(f"  fingerprint {result.details['fingerprint']} (what `incus image import` says)")
        return result


def _inspect_metadata(path: Path) -> dict[str, Any]:
    files: dict[str, bytes] = {}
    with reading(path, ".tar.xz"):
        for member, tf in xz_tar_members(path):
            if member.isfile() and member.size < 1 << 20:
                f = tf.extractfile(member)
                files[member.name.removeprefix("./")] = f.read() if f else b""
    text = files.get("metadata.yaml", b"").decode(errors="replace")
    missing = [k for k in METADATA_KEYS if not re.search(rf"^{k}", text, re.M)]
    if "metadata.yaml" not in files or missing:
        raise ImageFormatError(f"{path}: not Incus image metadata: metadata.yaml without "
                               f"{', '.join(k.rstrip(':') for k in missing) or 'content'}")
    templates = sorted(n for n in files if n.startswith("templates/"))
    for name in re.findall(r'template: "([^"]+)"', text):
        if f"templates/{name}" not in files:
            raise ImageFormatError(f"{path}: metadata.yaml names templates/{name}, which it does not hold")
    arch = re.search(r'^architecture: "?([^"\n]+)"?$', text, re.M)
    return {"architecture": arch.group(1) if arch else "", "templates": templates}


def _inspect_squashfs(path: Path, result: Inspection) -> None:
    """The superblock checked by hand, then the whole directory tree and the dpkg
    database read by unsquashfs (which checks every metadata block it reads)."""
    with open(path, "rb") as fh:
        sb = fh.read(96)
    size = path.stat().st_size
    if len(sb) < 96 or sb[:4] != SQUASHFS_MAGIC:
        raise ImageFormatError(f"{path}: not a squashfs image (no hsqs superblock)")
    inodes, _mkfs_time, block_size = struct.unpack_from("<III", sb, 4)
    compressor, = struct.unpack_from("<H", sb, 20)
    major, minor = struct.unpack_from("<HH", sb, 28)
    bytes_used, = struct.unpack_from("<Q", sb, 40)
    if (major, minor) != (4, 0) or bytes_used > size or compressor not in SQUASHFS_COMPRESSORS:
        raise ImageFormatError(f"{path}: bad squashfs superblock (version {major}.{minor}, {bytes_used} bytes "
                               f"used of {size}, compressor {compressor})")
    listing = run(["unsquashfs", "-no-progress", "-l", path], what=f"{path}: unsquashfs -l", error=ImageFormatError,
                  inherit_env=False)
    status = run(["unsquashfs", "-no-progress", "-cat", path, "var/lib/dpkg/status"], what=f"{path}: unsquashfs",
                 error=ImageFormatError, inherit_env=False, check=False)
    result.members = max(len(listing.stdout.splitlines()) - 1, 0)          # less squashfs-root itself
    result.packages = len(re.findall(r"^Status: install ok installed$", status.stdout, re.M)) or None
    result.details.update({"squashfs_inodes": inodes, "squashfs_block_size": block_size,
                           "squashfs_compressor": SQUASHFS_COMPRESSORS[compressor]})
    result.notes.append(f"  squashfs  {path}: {inodes} inodes, {SQUASHFS_COMPRESSORS[compressor]}, "
                        f"{block_size >> 10} KiB blocks")


FORMAT = IncusFormat()
