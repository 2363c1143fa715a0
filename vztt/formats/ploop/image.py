"""Virtuozzo-compatible ploop v2 template caches, made without a ploop kernel.

A Virtuozzo 7 "plain.ploopv2" cache is a tar of `root.hds` (a ploop v2
image), `DiskDescriptor.xml` and `templates/` (the package list). Virtuozzo
makes the image by mounting an empty ploop device and copying into it; we
can't (no ploop module here), so we lay out the same bytes ourselves:

1. `make_disk`: a sparse raw disk with the GPT and ext4 filesystem ploop
   would make (`mkfs.ext4 -E offset=... -d TREE` populates it unmounted).
2. `write_image`: raw disk -> ploop v2 image (header, BAT, data clusters).
3. `disk_descriptor_xml`, `vzpackages_text`, `cache_members`: the rest of the
   cache, named the way vztt names it.
4. `read_image` / `read_raw`: an inspector that trusts nothing in the file,
   and the inverse conversion used to check round trips.

Format references (checked against the sources): ploop's
include/ploop1_image.h (header, CHS, BAT), lib/fsutils.c (GPT and mkfs
options), lib/xml.c (DiskDescriptor.xml), lib/ploop.c (balloon file); vztt's
src/ploop.c and src/util.c (cache members, vzpackages format).
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from vztt.base.errors import BuildError, VzttError
from vztt.formats import ImageFormatError

SECTOR = 512
MiB = 1 << 20
DEFAULT_CLUSTER = 1 * MiB          # ploop's default block (2048 sectors)

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

# --- the disk inside (lib/ploop.h, lib/fsutils.c, lib/xml.c) -----------------
TOPDELTA_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
NONE_GUID = "{00000000-0000-0000-0000-000000000000}"
BALLOON_NAME = ".balloon-c3a5ae3d-ce7f-43c4-a1ea-c61e2b4504e8"
PARTITION_START = 2048             # sectors: ploop puts partition 1 at one cluster
JOURNAL_MiB = 128                  # ploop: "-Jsize=128" so online resize can reach 16T
INODE_RATIO = 16384                # ploop: "-i16384"
FS_BLOCK = 4096
# ploop: resize=min(16T / blocksize, 2^32-1): reserve GDT blocks for 16T growth.
RESIZE_BLOCKS = min((16 << 40) // FS_BLOCK, 0xFFFFFFFF)
# mke2fs refuses a journal bigger than half the free blocks; below this a
# 128 MiB journal does not fit.
MIN_FS_BYTES = 288 * MiB
IMAGE_NAME = "root.hds"
DESCRIPTOR_NAME = "DiskDescriptor.xml"
# ploop's own DiskDescriptor root on Virtuozzo 7 and later (older ploop wrote
# Parallels_disk_image; its reader accepts either).
DESCRIPTOR_ROOT = "Virtuozzo_disk_image"

# "safe": the feature set of the e2fsprogs 1.42 era that Virtuozzo 7 hosts
# (3.10 kernels, e2fsprogs 1.42.9 for ploop resize/fsck) handle: no
# metadata_csum, no 64bit, nothing newer (orphan_file, metadata_csum_seed...).
# Pinning the whole profile also keeps the host's /etc/mke2fs.conf out of the
# bytes we produce.
_SAFE_MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,uninit_bg,dir_nlink,extra_isize
	}
"""
EXT4_PROFILES = ("safe", "modern")


class _LogLike(Protocol):
    def write(self, text: str) -> None: ...


# --- small helpers ----------------------------------------------------------

def _run(argv: Sequence[str | os.PathLike[str]], *, what: str, env: dict[str, str] | None = None,
         log: _LogLike | None = None, input: str | None = None) -> str:
    """Run a tool; failure becomes one BuildError line (the tool's last words)."""
    args = [str(a) for a in argv]
    if log is not None:
        log.write("$ " + shlex.join(args))
    try:
        proc = subprocess.run(args, env=env, input=input, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise BuildError(f"{what}: {args[0]} is not installed") from None
    out = (proc.stdout or "") + (proc.stderr or "")
    if log is not None and out:
        log.write(out)
    if proc.returncode != 0:
        lines = [l.strip() for l in out.splitlines() if l.strip()]
        raise BuildError(f"{what}: {' | '.join(lines[-3:])[:500] or f'exit status {proc.returncode}'}")
    return out


def _tool_env(timestamp: int | None) -> dict[str, str]:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    # Scrub what could make e2fsprogs behave differently from run to run.
    for k in ("MKE2FS_CONFIG", "MKE2FS_DEVICE_SECTSIZE", "MKE2FS_DEVICE_PHYS_SECTSIZE",
              "E2FSPROGS_FAKE_TIME", "MKE2FS_FIRST_META_BG", "MKE2FS_SYNC"):
        env.pop(k, None)
    if timestamp is not None:
        # e2fsprogs' hook for fixed superblock/inode times (reproducible builds).
        env["E2FSPROGS_FAKE_TIME"] = str(timestamp)
    return env


def _resolve_timestamp(timestamp: int | None) -> int | None:
    """Explicit argument, else SOURCE_DATE_EPOCH, else E2FSPROGS_FAKE_TIME, else None (now)."""
    if timestamp is not None:
        return int(timestamp)
    for var in ("SOURCE_DATE_EPOCH", "E2FSPROGS_FAKE_TIME"):
        val = os.environ.get(var, "").strip()
        if val:
            try:
                return int(val)
            except ValueError:
                raise BuildError(f"{var}={val!r} is not a number of seconds") from None
    return None


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _replace_atomically(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    try:  # make the rename itself durable
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


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


# --- 1. the raw disk ---------------------------------------------------------

@dataclass(frozen=True)
class TreeUsage:
    """What the tree needs on ext4 with 4 KiB blocks (an estimate, on the high side)."""

    inodes: int
    data_bytes: int


@dataclass(frozen=True)
class DiskLayout:
    raw: Path
    disk_size: int                 # bytes, whole disk (GPT), a multiple of 1 MiB
    partition_start: int           # sector of partition 1 (2048)
    partition_end: int             # last sector of partition 1 (inclusive)
    fs_size: int                   # bytes of the ext4 filesystem (<= partition)
    fs_uuid: str
    hash_seed: str
    disk_guid: str
    partition_guid: str
    ext4_features: str             # "safe" | "modern"
    label: str
    timestamp: int | None
    usage: TreeUsage

    @property
    def partition_offset(self) -> int:
        return self.partition_start * SECTOR

    @property
    def partition_size(self) -> int:
        return (self.partition_end + 1 - self.partition_start) * SECTOR


def tree_usage(tree: Path) -> TreeUsage:
    """Walk the tree (never following links) and estimate its ext4 footprint."""
    seen: set[tuple[int, int]] = set()
    inodes = 1
    blocks = 1
    stack = [tree]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise BuildError(f"{d}: cannot read directory: {e.strerror}") from None
        # A directory: its entries (8 bytes + name rounded to 4) in 4K blocks.
        blocks += max(1, _round_up(sum(8 + _round_up(len(e.name), 4) for e in entries), FS_BLOCK) // FS_BLOCK)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            if key in seen:           # a hard link costs a directory entry only
                continue
            seen.add(key)
            inodes += 1
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                # -d keeps holes, so a sparse file costs what it has allocated
                n = _round_up(min(st.st_size, st.st_blocks * 512), FS_BLOCK) // FS_BLOCK
                # extent tree blocks for big fragmented files, xattr block
                blocks += n + n // 256 + 1
            elif e.is_symlink():
                blocks += 1 if st.st_size > 59 else 0   # fast symlinks live in the inode
    return TreeUsage(inodes=inodes, data_bytes=blocks * FS_BLOCK)


def _fs_size_for(usage: TreeUsage, headroom: float) -> int:
    """ext4 size for the tree plus headroom, inodes included (ratio 1 per 16K)."""
    data = usage.data_bytes * (1 + headroom)
    # 5% root reserve, inode tables (256 B per 16 KiB), group descriptors and
    # resize reserve (~4 MiB per backup group), 128 MiB journal, slack.
    by_blocks = data / 0.95 * 1.03 + JOURNAL_MiB * MiB + 24 * MiB
    by_inodes = (usage.inodes * (1 + headroom) + 64) * INODE_RATIO
    return _round_up(int(max(by_blocks, by_inodes, MIN_FS_BYTES)), MiB)


def _derive(base: str, what: str) -> str:
    # Stable per-purpose identifiers from one UUID: same input, same bytes.
    return str(uuidlib.uuid5(uuidlib.UUID(base), what))


def make_disk(tree: Path, raw: Path, disk_size: int, *, headroom: float = 0.25,
              ext4_features: str = "safe", label: str = "", uuid: str | None = None,
              hash_seed: str | None = None, timestamp: int | None = None,
              log: _LogLike | None = None) -> DiskLayout:
    """Make `raw`: a sparse disk of `disk_size` bytes with ploop's GPT and an
    ext4 filesystem holding `tree` plus the balloon file, without mounting.

    The filesystem is sized for the tree plus `headroom` (capped at the
    partition); Virtuozzo grows it to the container's disk size on creation.
    With `uuid` and `timestamp` (or SOURCE_DATE_EPOCH) fixed, the same tree
    gives the same bytes.
    """
    tree = Path(tree)
    raw = Path(raw)
    if ext4_features not in EXT4_PROFILES:
        raise BuildError(f"ext4_features must be one of {', '.join(EXT4_PROFILES)}, not {ext4_features!r}")
    if not tree.is_dir():
        raise BuildError(f"{tree}: not a directory")
    if headroom < 0:
        raise BuildError(f"headroom must not be negative: {headroom}")
    timestamp = _resolve_timestamp(timestamp)
    try:
        fs_uuid = str(uuidlib.UUID(uuid)) if uuid else str(uuidlib.uuid4())
        seed = str(uuidlib.UUID(hash_seed)) if hash_seed else _derive(fs_uuid, "ext4 hash seed")
    except ValueError:
        raise BuildError(f"not a UUID: {uuid if uuid else hash_seed!r}") from None
    disk_guid = _derive(fs_uuid, "gpt disk")
    part_guid = _derive(fs_uuid, "gpt partition 1")

    # ploop rounds the device up to whole clusters; so do we, so the image
    # header and the GPT agree on where the disk ends.
    disk_size = _round_up(int(disk_size), DEFAULT_CLUSTER)
    size_sectors = disk_size // SECTOR
    block = DEFAULT_CLUSTER // SECTOR
    # ploop's create_gpt_partition: start at one cluster, end one cluster
    # (rounded down) before the end of the disk; the tail holds the backup GPT.
    end_excl = (size_sectors - block) // block * block
    if end_excl <= PARTITION_START + block:
        raise BuildError(f"{raw}: disk size {disk_size} bytes is too small for a ploop disk")
    part_end = end_excl - 1
    part_bytes = (end_excl - PARTITION_START) * SECTOR

    balloon = os.lstat(tree / BALLOON_NAME) if os.path.lexists(tree / BALLOON_NAME) else None
    if balloon is not None and not (stat.S_ISREG(balloon.st_mode) and balloon.st_size == 0):
        raise BuildError(f"{tree / BALLOON_NAME}: ploop's balloon file must be an empty regular file")
    usage = tree_usage(tree)
    fs_size = min(_fs_size_for(usage, headroom), part_bytes // FS_BLOCK * FS_BLOCK)
    if fs_size < MIN_FS_BYTES:
        raise BuildError(f"{raw}: partition of {part_bytes // MiB} MiB is below the {MIN_FS_BYTES // MiB} MiB "
                         f"an ext4 with ploop's 128 MiB journal needs; raise the disk size")

    env = _tool_env(timestamp)
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_name(f".{raw.name}.tmp-{os.getpid()}")
    conf: Path | None = None
    try:
        if ext4_features == "safe":
            fd, name = tempfile.mkstemp(prefix="vztt-mke2fs-", suffix=".conf")
            conf = Path(name)
            with os.fdopen(fd, "w") as fh:
                fh.write(_SAFE_MKE2FS_CONF)
            env = {**env, "MKE2FS_CONFIG": str(conf)}
        device = f"{tmp}?offset={PARTITION_START * SECTOR}"   # e2fsprogs' unix_io option
        ext_opts = [f"offset={PARTITION_START * SECTOR}", "lazy_itable_init=1", f"resize={RESIZE_BLOCKS}",
                    f"hash_seed={seed}", "nodiscard",
                    # the file is new and sparse: the journal already reads as zeros
                    "lazy_journal_init=1"]
        cap = part_bytes // FS_BLOCK * FS_BLOCK
        while True:
            # A fresh sparse file each attempt: nothing of a failed one remains.
            with open(tmp, "wb") as fh:
                fh.truncate(disk_size)
            # sfdisk writes the same GPT as sgdisk/parted here but, unlike
            # sgdisk, without a global sync() and a one-second sleep.
            _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", tmp], what=f"{raw}: sfdisk", env=env,
                 log=log, input=_gpt_script(disk_guid, part_guid, part_end))
            try:
                _mkfs(tree, tmp, fs_size, ext_opts, fs_uuid, label, ext4_features, env, log,
                      what=f"{raw}: mkfs.ext4")
                break
            except BuildError as e:
                # Our size estimate was short (odd trees: many xattrs, huge
                # directories): grow within the partition and try again.
                if not any(w in str(e).lower() for w in ("allocat", "space", "inode")):
                    raise
                if fs_size >= cap:
                    raise BuildError(f"{e} (the tree does not fit in a {disk_size // MiB} MiB disk)") from None
                fs_size = min(cap, _round_up(fs_size * 3 // 2, MiB))
        # ploop's make_fs runs exactly this after mkfs; tune2fs has no offset
        # option but e2fsprogs takes "file?offset=N" for any device name.
        _run(["tune2fs", "-o", "user_xattr,acl", "-c0", "-i0", "-e", "remount-ro", device],
             what=f"{raw}: tune2fs", env=env, log=log)
        _add_balloon(device, balloon is not None, timestamp, env, log, what=f"{raw}: balloon file",
                     extra=_time_commands(tree, timestamp) if timestamp is not None else [])
        _replace_atomically(tmp, raw)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if conf is not None:
            conf.unlink(missing_ok=True)
    return DiskLayout(raw=raw, disk_size=disk_size, partition_start=PARTITION_START, partition_end=part_end,
                      fs_size=fs_size, fs_uuid=fs_uuid, hash_seed=seed, disk_guid=disk_guid,
                      partition_guid=part_guid, ext4_features=ext4_features, label=label,
                      timestamp=timestamp, usage=usage)


def _mkfs(tree: Path, target: Path, fs_size: int, ext_opts: list[str], fs_uuid: str, label: str,
          profile: str, env: dict[str, str], log: _LogLike | None, *, what: str) -> None:
    """ploop's make_fs options, written at an offset into the raw file, filled from `tree`."""
    def argv(source: str) -> list[str]:
        a = ["mkfs.ext4", "-F", "-q", "-t", "ext4", "-j", "-b", str(FS_BLOCK), "-I", "256",
             "-i", str(INODE_RATIO), "-J", f"size={JOURNAL_MiB}", "-E", ",".join(ext_opts),
             "-U", fs_uuid, "-L", label, "-d", source]
        if profile == "safe":
            a += ["-O", "^metadata_csum,^64bit"]
        return a + [str(target), f"{fs_size // 1024}k"]

    if os.geteuid() == 0 and shutil.which("unshare"):
        # mkfs -d copies each file's atime, and reading the file moves that
        # atime on the host: the first build from a fresh tree would differ
        # from the second. Through a private read-only noatime bind mount
        # nothing moves, nothing in the tree can be changed, and mounts inside
        # the tree (a forgotten /proc) are not descended into. The mount dies
        # with the namespace, whatever happens.
        view = Path(tempfile.mkdtemp(prefix="vztt-tree-"))
        try:
            _run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                  'mount --bind -- "$1" "$2" && mount -o remount,bind,ro,noatime -- "$2" && shift 2 && exec "$@"',
                  "sh", str(tree), str(view), *argv(str(view))], what=what, env=env, log=log)
        finally:
            view.rmdir()
    else:
        _run(argv(str(tree)), what=what, env=env, log=log)


def _gpt_script(disk_guid: str, part_guid: str, part_end: int) -> str:
    # Partition type "Linux filesystem data" and name "primary": what ploop's
    # `parted mkpart primary` leaves.
    return ("label: gpt\n"
            f"label-id: {disk_guid}\n"
            "unit: sectors\n"
            "first-lba: 34\n\n"
            f"start={PARTITION_START}, size={part_end + 1 - PARTITION_START}, "
            f"type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={part_guid}, name=\"primary\"\n")


def _time_commands(tree: Path, timestamp: int) -> list[str]:
    """debugfs commands that make every inode's atime and ctime its mtime (at most `timestamp`).

    mkfs -d copies atime and ctime from the tree, and the kernel sets ctime to
    the moment the tree was written: without this, two builds of the same lock
    would differ in every inode. (A name with a newline cannot be given to debugfs.)
    """
    cmds = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(path, tree)
            if "\n" in rel:
                continue
            quoted = rel.replace('"', '""')     # libss quoting: backslashes are literal, "" is a quote
            t = min(int(os.lstat(path).st_mtime), timestamp)
            cmds += [f'sif "{quoted}" atime @{t}', f'sif "{quoted}" ctime @{t}']
    return cmds


def _add_balloon(device: str, exists: bool, timestamp: int | None, env: dict[str, str],
                 log: _LogLike | None, *, what: str, extra: list[str] = ()) -> None:
    """The empty 0600 file ploop's mount insists on, written with debugfs.

    It goes in after mkfs rather than into the tree so the caller's tree is
    never touched; every inode field debugfs would take from the clock or
    from the source file is set explicitly. A balloon the tree brought along
    (copied by mkfs) gets the same owner, mode and times.
    """
    ts = timestamp if timestamp is not None else int(time.time())
    path = "/" + BALLOON_NAME
    with tempfile.NamedTemporaryFile(prefix="vztt-balloon-") as empty:
        cmds = [] if exists else [f"write {empty.name} {BALLOON_NAME}"]
        cmds += [f"sif {path} mode 0100600", f"sif {path} uid 0", f"sif {path} gid 0",
                *(f"sif {path} {f} @{ts}" for f in ("atime", "mtime", "ctime", "crtime")), *extra]
        script = "\n".join(cmds) + "\n"
        out = _run(["debugfs", "-w", "-f", "-", device], what=what, env=env, log=log, input=script)
    # debugfs reports command errors on stderr but exits 0.
    bad = [l for l in out.splitlines() if l.strip() and not l.startswith(("debugfs ", "debugfs:", "Allocated inode"))]
    if bad:
        raise BuildError(f"{what}: {bad[0].strip()}")


# --- 2. raw disk -> ploop v2 image -------------------------------------------

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
    return _round_up(HEADER_SIZE + 4 * nbat, cluster) // cluster


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
    tmp = hds.with_name(f".{hds.name}.tmp-{os.getpid()}")
    try:
        rfd = os.open(raw, os.O_RDONLY)
    except OSError as e:
        raise BuildError(f"{raw}: cannot open: {e.strerror}") from None
    try:
        raw_size = os.fstat(rfd).st_size
        if raw_size == 0:
            raise BuildError(f"{raw}: empty disk")
        disk_bytes = _round_up(raw_size, cluster_size)    # ploop rounds up to whole clusters
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
        hds.parent.mkdir(parents=True, exist_ok=True)
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            last = -1
            for start, end in _data_extents(rfd, raw_size):
                first_c = max(start // cluster_size, last + 1)
                for c in range(first_c, _round_up(end, cluster_size) // cluster_size):
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
            os.fsync(wfd)
        finally:
            os.close(wfd)
        _replace_atomically(tmp, hds)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{hds}: writing the ploop image failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


# --- 3. DiskDescriptor.xml ---------------------------------------------------

def disk_descriptor_xml(disk_size_sectors: int, cylinders: int, heads: int, sectors: int,
                        blocksize_sectors: int = DEFAULT_CLUSTER // SECTOR, *,
                        image_file: str = IMAGE_NAME, root_element: str = "Parallels_disk_image") -> str:
    """DiskDescriptor.xml as ploop's ploop_store_diskdescriptor() writes it.

    Element names and order follow lib/xml.c; so does the layout (libxml2's
    xmlDocFormatDump: `<?xml version="1.0"?>`, two-space indent). ploop writes
    the root as `Parallels_disk_image` and its reader ignores the root's name.
    `sectors` is written as given; ploop writes Disk_size / (Cylinders * Heads),
    which `disk_geometry()` computes.
    """
    for name, v in (("disk_size_sectors", disk_size_sectors), ("cylinders", cylinders), ("heads", heads),
                    ("sectors", sectors), ("blocksize_sectors", blocksize_sectors)):
        if not isinstance(v, int) or v <= 0:
            raise BuildError(f"DiskDescriptor.xml: {name} must be a positive integer, not {v!r}")
    if not root_element.isidentifier() or any(c in image_file for c in "<>&\"'\n"):
        raise BuildError("DiskDescriptor.xml: bad root element or image file name")
    return (
        '<?xml version="1.0"?>\n'
        f"<{root_element}>\n"
        "  <Disk_Parameters>\n"
        f"    <Disk_size>{disk_size_sectors}</Disk_size>\n"
        f"    <Cylinders>{cylinders}</Cylinders>\n"
        f"    <Heads>{heads}</Heads>\n"
        f"    <Sectors>{sectors}</Sectors>\n"
        "    <Padding>0</Padding>\n"
        "  </Disk_Parameters>\n"
        "  <StorageData>\n"
        "    <Storage>\n"
        "      <Start>0</Start>\n"
        f"      <End>{disk_size_sectors}</End>\n"
        f"      <Blocksize>{blocksize_sectors}</Blocksize>\n"
        "      <Image>\n"
        f"        <GUID>{TOPDELTA_GUID}</GUID>\n"
        "        <Type>Compressed</Type>\n"
        f"        <File>{image_file}</File>\n"
        "      </Image>\n"
        "    </Storage>\n"
        "  </StorageData>\n"
        "  <Snapshots>\n"
        f"    <TopGUID>{TOPDELTA_GUID}</TopGUID>\n"
        "    <Shot>\n"
        f"      <GUID>{TOPDELTA_GUID}</GUID>\n"
        f"      <ParentGUID>{NONE_GUID}</ParentGUID>\n"
        "    </Shot>\n"
        "  </Snapshots>\n"
        f"</{root_element}>\n"
    )


def disk_geometry(disk_size_sectors: int) -> CHS:
    """The (cylinders, heads, sectors) ploop puts in DiskDescriptor.xml."""
    chs = convert_to_chs(disk_size_sectors)
    return CHS(chs.cylinders, chs.heads, disk_size_sectors // (chs.cylinders * chs.heads))


def descriptor_for(info: "ImageInfo") -> str:
    """DiskDescriptor.xml for an image, from its header: the one way vztt makes one
    (template caches and containers' root.hdd alike)."""
    geo = disk_geometry(info.disk_sectors)
    return disk_descriptor_xml(info.disk_sectors, geo.cylinders, geo.heads, geo.sectors,
                               info.cluster_size // SECTOR, root_element=DESCRIPTOR_ROOT)


# --- 4. package list and cache members ---------------------------------------

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
                  timestamp: str, mtime: int, dot_prefix: bool = True) -> list[CacheMember]:
    """The members of a plain.ploopv2 cache tar, in vztt's order.

    vztt runs `tar -c --numeric-owner ... | lz4` in the ploop directory:
    Virtuozzo 7's vztt archives "." (members `./root.hds`, `./templates/...`,
    `./DiskDescriptor.xml`), later versions name `root.hds templates
    DiskDescriptor.xml` (no `./`). vztt's package-list reader extracts
    `-O ./templates/vzpackages`, and GNU tar matches member names literally,
    so the `./` form (the default here) is the one every vztt reader finds.
    Owner is root (0/0) for all; the tar writer sets it.
    """
    if not template_name or "/" in template_name or template_name in (".", ".."):
        raise BuildError(f"cache: bad template name {template_name!r}")
    p = "./" if dot_prefix else ""
    image = Path(image)
    return [
        CacheMember(f"{p}{IMAGE_NAME}", "file", 0o600, mtime, source=image),
        CacheMember(f"{p}templates/", "dir", 0o755, mtime),
        CacheMember(f"{p}templates/vzpackages", "file", 0o644, mtime, data=vzpackages.encode()),
        CacheMember(f"{p}templates/{template_name}/", "dir", 0o755, mtime),
        CacheMember(f"{p}templates/{template_name}/timestamp", "file", 0o644, mtime, data=timestamp.encode()),
        CacheMember(f"{p}{DESCRIPTOR_NAME}", "file", 0o644, mtime, data=disk_descriptor.encode()),
    ]


# --- 5. the inspector --------------------------------------------------------

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
    tmp = out_raw.with_name(f".{out_raw.name}.tmp-{os.getpid()}")
    cluster = info.cluster_size
    try:
        with open(hds, "rb") as src, open(tmp, "wb") as dst:
            dst.truncate(info.disk_size)
            buf = bytearray(cluster)
            view = memoryview(buf)
            for i, v in enumerate(info.bat):
                if v:
                    n = os.preadv(src.fileno(), [view], v * cluster)
                    if n != cluster:
                        raise ImageFormatError(f"{hds}: short read of cluster {v}")
                    _pwrite_all(dst.fileno(), view, i * cluster)
            os.fsync(dst.fileno())
        _replace_atomically(tmp, out_raw)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{out_raw}: expanding {hds} failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info
