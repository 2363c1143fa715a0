"""The ploop format: Virtuozzo 7's template cache, `<name>.plain.ploopv2.tar.lz4`.

  image.py       the ploop v2 image: header, BAT, write_image / read_image / read_raw
  disk.py        the disk inside: ploop's GPT and ext4, made without mounting (make_disk)
  descriptor.py  DiskDescriptor.xml (descriptor_for: the one builder)
  cache.py       the cache file: members, package list, reproducible tar.lz4, inspect
  boot.py        the disk's tree for the boot test (read back, mounted read-only)

This package's names below are its API: callers (the build, `vztt create`)
import `vztt.formats.ploop` and use `ploop.write_image`, `ploop.IMAGE_NAME`...
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from pathlib import Path

from vztt.formats import Format, FormatContext, ImageFormatError, Inspection
from vztt.formats.targuard import Limits
from vztt.formats.ploop.boot import disk_tree
from vztt.formats.ploop.cache import (CacheMember, PloopResult, app_cache_name, cache_members, inspect,
                                      is_cache_member, pack_ploop, vzpackages_text, write_tar_lz4)
from vztt.formats.ploop.descriptor import (DESCRIPTOR_NAME, DESCRIPTOR_ROOT, NONE_GUID, TOPDELTA_GUID,
                                           descriptor_for, disk_descriptor_xml, disk_geometry)
from vztt.formats.ploop.disk import (BALLOON_NAME, EXT4_PROFILES, FS_BLOCK, MIN_FS_BYTES, PARTITION_START,
                                     DiskLayout, TreeUsage, e2fsprogs_env, gpt_script, make_disk,
                                     partition_bounds, tree_usage)
from vztt.formats.ploop.image import (CHS, CIF_EMPTY, DEFAULT_CLUSTER, HEADER_SIZE, IMAGE_NAME, SECTOR,
                                      SIGNATURE_DISK_IN_USE, SIGNATURE_V1, SIGNATURE_V2, ImageInfo, ImageStats,
                                      MiB, convert_to_chs, read_image, read_raw, write_image)
from vztt.recipe.recipe import parse_size
from vztt.store.manifest import ArchiveRecord

__all__ = [
    "BALLOON_NAME", "CHS", "CIF_EMPTY", "CacheMember", "DEFAULT_CLUSTER", "DESCRIPTOR_NAME", "DESCRIPTOR_ROOT",
    "DiskLayout", "EXT4_PROFILES", "FORMAT", "FS_BLOCK", "HEADER_SIZE", "IMAGE_NAME", "ImageFormatError",
    "ImageInfo", "ImageStats", "MIN_FS_BYTES", "MiB", "NONE_GUID", "PARTITION_START", "PloopFormat",
    "PloopResult", "SECTOR", "app_cache_name", "SIGNATURE_DISK_IN_USE", "SIGNATURE_V1", "SIGNATURE_V2",
    "TOPDELTA_GUID", "TreeUsage", "cache_members", "convert_to_chs", "descriptor_for", "disk_descriptor_xml",
    "disk_geometry", "e2fsprogs_env", "gpt_script", "inspect", "is_cache_member", "make_disk", "pack_ploop",
    "partition_bounds", "read_image",
    "read_raw", "tree_usage", "vzpackages_text", "write_image", "write_tar_lz4",
]


class PloopFormat(Format):
    """A ploop v2 image of an ext4 disk ("plain" = ext4), DiskDescriptor.xml and
    templates/vzpackages in a tar.lz4, as `vzpkg create cache` makes it."""

    name = "ploop"
    suffix = "plain.ploopv2.tar.lz4"
    summary = "Virtuozzo 7 ploop v2 cache (.plain.ploopv2.tar.lz4)"
    step = "ploop"
    tools = (("mkfs.ext4", "e2fsprogs"), ("sfdisk", "fdisk"), ("losetup", "mount"))
    bootable = True

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        assert ctx.plain is not None, "the ploop disk is filled from the plain archive"
        features = str(ctx.settings["disk.ext4_features"])
        # An app cache holds the OS template's and every application template's timestamp (vztt's tmplset_update_privdir).
        templates = (ctx.app_cache.os_template, *ctx.app_cache.apps) if ctx.app_cache else (ctx.name,)
        pl = pack_ploop(ctx.plain, ctx.out, ctx.work, name=ctx.name, packages=[p.row for p in ctx.packages],
                        templates=templates,
                        disk_size=parse_size(ctx.settings["disk.size"]), ext4_features=features,
                        source_date_epoch=ctx.source_date_epoch, identity=ctx.lock_digest, log=ctx.log)
        return ArchiveRecord(file=self.output_name(ctx), format=self.name, sha256=pl.sha256, size=pl.size,
                             details={"disk_size": pl.disk_size, "clusters": pl.clusters,
                                      "ext4_features": features, "fs_uuid": pl.fs_uuid})

    def guard_limits(self, record: ArchiveRecord, free: int) -> Limits:
        """The cache's few members (root.hds, DiskDescriptor.xml, templates/...), files and
        directories only."""
        return Limits(max_bytes=max(free, 0), max_members=64, types=frozenset({"file", "dir"}),
                      allow=is_cache_member)

    def describe(self, record: ArchiveRecord) -> str:
        d = record.details
        return f"{d['clusters']} MiB of {d['disk_size'] >> 30} GiB disk -> {record.size / 1e6:.0f} MB lz4"

    def output_name(self, ctx: FormatContext) -> str:
        """A layered template's cache is named as vztt names app caches: `<os>_app_<md5>`."""
        if ctx.app_cache is None:
            return self.file_name(ctx.name)
        return self.file_name(app_cache_name(ctx.app_cache.os_template, ctx.app_cache.apps))

    def accepts_file(self, file: str, template: str) -> bool:
        return file == self.file_name(template) or re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9._-]*_app_[0-9a-f]{32}\." + re.escape(self.suffix), file) is not None

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith(".ploopv2.tar.lz4")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        return inspect(path, workdir)

    def bootable_tree(self, files: list[Path], scratch: Path) -> AbstractContextManager[Path]:
        return disk_tree(files[0], scratch)


FORMAT = PloopFormat()
