"""Virtuozzo 7's template cache: `<name>.plain.ploopv2.tar.lz4`."""

from __future__ import annotations

from pathlib import Path

from vztt.formats import Format, FormatContext, Inspection
from vztt.store.manifest import ArchiveRecord


class PloopFormat(Format):
    """A ploop v2 image of an ext4 disk ("plain" = ext4), DiskDescriptor.xml and
    templates/vzpackages in a tar.lz4, as `vzpkg create cache` makes it."""

    name = "ploop"
    suffix = "plain.ploopv2.tar.lz4"
    summary = "Virtuozzo 7 ploop v2 cache (.plain.ploopv2.tar.lz4)"

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        from vztt.formats.vzcache import pack_ploop
        features = str(ctx.settings.get("disk.ext4_features", "safe"))
        pl = pack_ploop(ctx.plain, ctx.out, ctx.work, name=ctx.name, packages=[p.row for p in ctx.packages],
                        disk_size=int(ctx.settings["disk_size"]), ext4_features=features,
                        source_date_epoch=ctx.source_date_epoch, identity=ctx.lock_digest, log=ctx.log)
        return ArchiveRecord(file=self.file_name(ctx.name), format=self.name, sha256=pl.sha256, size=pl.size,
                             details={"disk_size": pl.disk_size, "clusters": pl.clusters,
                                      "ext4_features": features, "fs_uuid": pl.fs_uuid})

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith(".ploopv2.tar.lz4")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        from vztt.formats.vzcache import inspect
        return inspect(path, workdir)


FORMAT = PloopFormat()
