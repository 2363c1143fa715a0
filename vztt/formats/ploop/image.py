"""The ploop v2 image format: a raw disk as header, BAT and data clusters.

`write_image` turns a raw disk into an image holding only its non-zero
clusters; `read_image` validates an image trusting nothing in it (the
inspector); `read_raw` expands one back into a sparse raw disk.

Format reference (checked against the sources): ploop's
include/ploop1_image.h (header, CHS, BAT).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.base.files import atomic_file
from vztt.formats import ImageFormatError

SECTOR = 512
MiB = 1 << 20
DEFAULT_CLUSTER = 1 * MiB          # ploop's default block (2048 sectors)
IMAGE_NAME = "root.hds"            # the image's name in a cache and in a container's root.hdd

# --- ploop v2 header (include/ploop1_image.h) --------------------------------
SIGNATURE_V2 = b"WithouFreSpacExt"
SIGNATURE_V1 = b"WithoutFreeSpace"
PRL_IMAGE_COMPRESSED = 2           # m_Type: "expanded" image with a BAT
SIGNATURE_DISK_IN_USE = 0x746F6E59  # m_DiskInUse while open; 0 when closed (spec 2.0)
CIF_EMPTY = 0x1                    # m_Flags: no data was ever written
# sig, type, heads, cylinders, sectors(=cluster sectors), BAT entries,
# size in sectors (u64 in v2), in-use, first block offset, flags, ext offset
_HEADER = struct.Struct("<16sIIIIIQIIIQ")
HEADER_SIZE = _HEADER.size         # 64; the BAT starts right after it
assert HEADER_SIZE == 64 and array("I").itemsize == 4   # BAT entries are u32


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


# --- CHS (ConvertToCHS in ploop1_image.h) -----------------------------------

@dataclass(frozen=True)
class CHS:
    cylinders: int
    heads: int
    sectors: int


def convert_to_chs(size_sectors: int) -> CHS:
    """ploop's ConvertToCHS: the geometry stored in the header and the XML."""
    if 1032192 < size_sectors < 16777216:
        # ATA-2 "magic" middle range: 16 heads x 63 sectors.
        return CHS(size_sectors // (63 * 16), 16, 63)
    sectors = next((s for s in (63, 32, 16, 8) if size_sectors % s == 0), None)
    if sectors is not None:
        rest = size_sectors // sectors
        heads = next((h for h in (16, 8, 4, 2) if rest % h == 0), None)
        if heads is not None:
            return CHS(rest // heads, heads, sectors)
    return CHS(size_sectors, 1, 1)   # pure LBA


# --- raw disk -> ploop v2 image ---------------------------------------------

@dataclass(frozen=True)
class ImageStats:
    path: Path
    disk_size: int                 # virtual size in bytes (whole clusters)
    cluster_size: int
    bat_entries: int
    clusters_written: int
    zero_clusters_skipped: int     # inside data extents, all zeros
    bytes_read: int
    file_size: int
    seconds: float


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of data in a sparse file, via SEEK_DATA/SEEK_HOLE."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:      # no data after pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):   # no hole support: all data
                return extents + [(pos, size)]
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        pos = end
    return extents


def _header_bytes(disk_sectors: int, cluster_sectors: int, nbat: int, first_block: int, flags: int) -> bytes:
    chs = convert_to_chs(disk_sectors)
    return _HEADER.pack(SIGNATURE_V2, PRL_IMAGE_COMPRESSED, chs.heads, chs.cylinders, cluster_sectors,
                        nbat, disk_sectors, 0, first_block, flags, 0)


def _bat_clusters(nbat: int, cluster: int) -> int:
    return round_up(HEADER_SIZE + 4 * nbat, cluster) // cluster


def write_image(raw: Path, hds: Path, cluster_size: int = DEFAULT_CLUSTER) -> ImageStats:
    """Convert a raw disk into a ploop v2 image holding only its non-zero clusters.

    Only the raw file's data extents are read, and clusters that are all
    zeros are left unallocated (they read back as zeros). The header and BAT
    clusters are written as real zeros, never holes: ploop refuses sparse
    images. The image appears under `hds` only when complete.
    """
    raw, hds = Path(raw), Path(hds)
    if cluster_size < 4096 or cluster_size & (cluster_size - 1) or cluster_size > 64 * MiB:
        raise BuildError(f"{hds}: cluster size {cluster_size} is not a power of two between 4 KiB and 64 MiB")
    t0 = time.monotonic()
    cluster_sectors = cluster_size // SECTOR
    try:
        rfd = os.open(raw, os.O_RDONLY)
    except OSError as e:
        raise BuildError(f"{raw}: cannot open: {e.strerror}") from None
    try:
        raw_size = os.fstat(rfd).st_size
        if raw_size == 0:
            raise BuildError(f"{raw}: empty disk")
        disk_bytes = round_up(raw_size, cluster_size)    # ploop rounds up to whole clusters
        nbat = disk_bytes // cluster_size
        if nbat > 0xFFFFFFFF:
            raise BuildError(f"{raw}: {raw_size} bytes is beyond what a ploop v2 BAT addresses")
        header_clusters = _bat_clusters(nbat, cluster_size)
        bat = array("I", bytes(4 * nbat))
        zero = bytes(cluster_size)
        buf = bytearray(cluster_size)
        view = memoryview(buf)
        written = skipped = read_bytes = 0
        next_cluster = header_clusters
        with atomic_file(hds, 0o600) as out:
            wfd = out.fileno()                       # written with pwrite only: the buffered file stays empty
            last = -1
            for start, end in _data_extents(rfd, raw_size):
                first_c = max(start // cluster_size, last + 1)
                for c in range(first_c, round_up(end, cluster_size) // cluster_size):
                    last = c
                    off = c * cluster_size
                    n = os.preadv(rfd, [view], off)
                    read_bytes += n
                    if n < cluster_size:               # the raw's last partial cluster
                        view[n:] = zero[: cluster_size - n]
                    if buf == zero:
                        skipped += 1
                        continue
                    # v2 BAT entries are file offsets in clusters.
                    bat[c] = next_cluster
                    _pwrite_all(wfd, view, next_cluster * cluster_size)
                    next_cluster += 1
                    written += 1
            if sys.byteorder != "little":
                bat.byteswap()
            head = bytearray(header_clusters * cluster_size)     # real zeros, no holes
            head[:HEADER_SIZE] = _header_bytes(disk_bytes // SECTOR, cluster_sectors, nbat,
                                               header_clusters * cluster_sectors, 0 if written else CIF_EMPTY)
            head[HEADER_SIZE:HEADER_SIZE + 4 * nbat] = bat.tobytes()
            _pwrite_all(wfd, memoryview(head), 0)
            file_size = next_cluster * cluster_size
            os.ftruncate(wfd, file_size)
    except OSError as e:
        raise BuildError(f"{hds}: writing the ploop image failed: {e.strerror or e}") from None
    finally:
        os.close(rfd)
    return ImageStats(path=hds, disk_size=disk_bytes, cluster_size=cluster_size, bat_entries=nbat,
                      clusters_written=written, zero_clusters_skipped=skipped, bytes_read=read_bytes,
                      file_size=file_size, seconds=time.monotonic() - t0)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


# --- the inspector -------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    path: Path
    version: int                   # 2
    heads: int
    cylinders: int
    cluster_size: int              # bytes
    bat_entries: int
    disk_sectors: int
    in_use: int
    first_block_sectors: int
    flags: int
    ext_offset: int
    file_size: int
    clusters_allocated: int
    bat: tuple[int, ...] = field(repr=False)   # per virtual cluster: file cluster, 0 = zeros

    @property
    def disk_size(self) -> int:
        return self.disk_sectors * SECTOR

    @property
    def header_clusters(self) -> int:
        return self.first_block_sectors * SECTOR // self.cluster_size


def read_image(hds: Path) -> ImageInfo:
    """Read and validate a ploop v2 image; anything wrong is one ImageFormatError line."""
    hds = Path(hds)

    def bad(problem: str) -> ImageFormatError:
        return ImageFormatError(f"{hds}: {problem}")

    try:
        with open(hds, "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            head = fh.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                raise bad(f"truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte ploop header")
            (sig, typ, heads, cyls, csect, nbat, dsect, in_use, first, flags, ext) = _HEADER.unpack(head)
            if sig == SIGNATURE_V1:
                raise bad("ploop v1 image (signature WithoutFreeSpace); only v2 is supported")
            if sig != SIGNATURE_V2:
                raise bad(f"not a ploop v2 image: signature {sig!r}, expected {SIGNATURE_V2.decode()!r}")
            if typ != PRL_IMAGE_COMPRESSED:
                raise bad(f"unsupported image type/version {typ} (expected {PRL_IMAGE_COMPRESSED})")
            if csect == 0 or csect & (csect - 1) or csect < 8:
                raise bad(f"cluster size of {csect} sectors is not a power of two of at least 8")
            cluster = csect * SECTOR
            if dsect == 0 or dsect % csect:
                raise bad(f"disk size of {dsect} sectors is not a positive multiple of the {csect}-sector cluster")
            if nbat != dsect // csect:
                raise bad(f"BAT has {nbat} entries but a {dsect}-sector disk needs {dsect // csect}")
            hclusters = _bat_clusters(nbat, cluster)
            if first != hclusters * csect:
                raise bad(f"first data block at sector {first}, expected {hclusters * csect} "
                          f"(header and BAT in {hclusters} cluster(s))")
            if in_use != 0:
                raise bad(f"image is marked in use (0x{in_use:08x}): not closed cleanly")
            if size < hclusters * cluster:
                raise bad(f"truncated: {size} bytes, the header and BAT need {hclusters * cluster}")
            if size % cluster:
                raise bad(f"size {size} is not a multiple of the cluster size {cluster}")
            raw_bat = fh.read(4 * nbat)
            if len(raw_bat) != 4 * nbat:
                raise bad("truncated while reading the BAT")
    except OSError as e:
        raise bad(f"cannot read: {e.strerror or e}") from None
    bat = array("I")
    bat.frombytes(raw_bat)
    if sys.byteorder != "little":
        bat.byteswap()
    nclusters = size // cluster
    owner: dict[int, int] = {}
    for i, v in enumerate(bat):
        if v == 0:
            continue
        if v < hclusters:
            raise bad(f"BAT entry {i} points into the header/BAT area (cluster {v})")
        if v >= nclusters:
            raise bad(f"BAT entry {i} points past the end of the file (cluster {v}, file has {nclusters})")
        if v in owner:
            raise bad(f"BAT entries {owner[v]} and {i} both point at cluster {v}")
        owner[v] = i
    if ext and (ext % SECTOR or ext >= size):
        raise bad(f"format extension offset {ext} is outside the file")
    return ImageInfo(path=hds, version=2, heads=heads, cylinders=cyls, cluster_size=cluster, bat_entries=nbat,
                     disk_sectors=dsect, in_use=in_use, first_block_sectors=first, flags=flags, ext_offset=ext,
                     file_size=size, clusters_allocated=len(owner), bat=tuple(bat))


def read_raw(hds: Path, out_raw: Path) -> ImageInfo:
    """Expand a ploop v2 image back into a (sparse) raw disk."""
    info = read_image(hds)
    out_raw = Path(out_raw)
    cluster = info.cluster_size
    try:
        with open(hds, "rb") as src, atomic_file(out_raw) as dst:
            dst.truncate(info.disk_size)
            buf = bytearray(cluster)
            view = memoryview(buf)
            for i, v in enumerate(info.bat):
                if v:
                    n = os.preadv(src.fileno(), [view], v * cluster)
                    if n != cluster:
                        raise ImageFormatError(f"{hds}: short read of cluster {v}")
                    _pwrite_all(dst.fileno(), view, i * cluster)
    except OSError as e:
        raise BuildError(f"{out_raw}: expanding {hds} failed: {e.strerror or e}") from None
    return info
