"""The nspawn format: `<name>.tar.xz` for systemd (`machinectl pull-tar`,
`systemd-pull tar`, `importctl`), then `systemd-nspawn --boot` or machinectl.

It is the plain archive's tar, xz'd (multi-threaded, reproducible:
formats/compress.py). On a mirror it sits in its build's directory as
`<name>.tar.xz`, beside `SHA256SUMS` and its detached signature
`SHA256SUMS.gpg`, which `systemd-pull --verify=signature` checks against the
keys in /etc/systemd/import-pubring.gpg. Those two are written by
`vztt publish`, signed with the publishing key (mirror/hostindex.py): a build
needs no key, and one signature covers everything a build directory holds.
"""

from __future__ import annotations

from pathlib import Path

from vztt.base.errors import BuildError
from vztt.formats import FormatContext, Inspection, Part
from vztt.formats.compress import CHUNK, XzWriter
from vztt.formats.hostmeta import HostFormat
from vztt.formats.plain import count_tree, reading, xz_tar_members
from vztt.formats.tarstream import plain_stream
from vztt.store.manifest import ArchiveRecord
from vztt.store.packages import sha256_file

TARBALL = Part("nspawn.tar.xz", "{name}.tar.xz")


class NspawnFormat(HostFormat):
    """The root tree as a .tar.xz, for systemd-pull / machinectl pull-tar and systemd-nspawn."""

    name = "nspawn"
    suffix = TARBALL.suffix
    parts = (TARBALL,)
    summary = "systemd: <name>.tar.xz (+ SHA256SUMS, SHA256SUMS.gpg on a mirror) for machinectl pull-tar"
    step = "nspawn"
    tools = (("xz", "xz-utils"),)
    shares_files = False        # systemd-pull looks for SHA256SUMS beside the tarball

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        meta, compression = self.image(ctx)
        try:
            with XzWriter(ctx.out, compression, self.name) as xz, plain_stream(ctx.plain) as src:
                while chunk := src.read(CHUNK):
                    xz.write(chunk)
        except RuntimeError as e:          # lz4: a damaged plain archive
            raise BuildError(f"format {self.name}: {ctx.plain}: {e}") from None
        return ArchiveRecord(file=self.file_name(ctx.name), format=self.name, sha256=sha256_file(ctx.out),
                             size=ctx.out.stat().st_size, tar_size=xz.bytes_in,
                             details={"compression": compression.xz, "host": meta.index_fields()})

    def describe(self, record: ArchiveRecord) -> str:
        return f"{(record.tar_size or 0) / 1e6:.0f} MB tar -> {record.size / 1e6:.0f} MB " \
               f"{record.details.get('compression', 'xz')}"

    def recognizes(self, path: Path) -> bool:
        # Registry order puts lxc and incus first: their .tar.xz files are theirs.
        return path.name.endswith(".tar.xz")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        result = Inspection(path=Path(path), format=self.name)
        with reading(result.path, ".tar.xz"):
            count_tree(xz_tar_members(result.path), result)
        return result


FORMAT = NspawnFormat()
