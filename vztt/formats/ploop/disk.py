"""The disk inside a ploop image: GPT and ext4 as ploop makes them, made without mounting.

A Virtuozzo 7 cache holds an image of a disk that ploop made by mounting an
empty ploop device and copying into it; we can't (no ploop module here), so
`make_disk` lays out the same bytes in a sparse raw file: the GPT ploop's
`parted mkpart primary` leaves (`gpt_script`, written by sfdisk), an ext4
with ploop's mkfs options filled from a tree by `mkfs.ext4 -d` at the
partition's offset, then tune2fs as ploop's make_fs, and the balloon file
ploop's mount insists on (with debugfs). image.py turns the raw file into
the ploop image.

Format references (checked against the sources): ploop's lib/fsutils.c (GPT
and mkfs options), lib/ploop.c (balloon file).
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.base.files import replace_into_place, temp_name
from vztt.base.proc import Log, run, summarize, tool_env, which
from vztt.formats.ploop.image import DEFAULT_CLUSTER, SECTOR, MiB, round_up

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
# Words in mkfs.ext4's complaint when the tree did not fit the filesystem.
_NO_ROOM = ("allocat", "space", "inode")

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
        blocks += max(1, round_up(sum(8 + round_up(len(e.name), 4) for e in entries), FS_BLOCK) // FS_BLOCK)
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
                n = round_up(min(st.st_size, st.st_blocks * 512), FS_BLOCK) // FS_BLOCK
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
    return round_up(int(max(by_blocks, by_inodes, MIN_FS_BYTES)), MiB)


def _derive(base: str, what: str) -> str:
    # Stable per-purpose identifiers from one UUID: same input, same bytes.
    return str(uuidlib.uuid5(uuidlib.UUID(base), what))


def e2fsprogs_env(timestamp: int | None) -> dict[str, str]:
    """The tool environment for e2fsprogs: the C locale (messages are parsed) and, with
    a timestamp, e2fsprogs' hook for fixed superblock and inode times (reproducible
    builds). Built from TOOL_ENV alone, so nothing of the caller's (MKE2FS_CONFIG,
    MKE2FS_DEVICE_SECTSIZE...) can make one run differ from the next."""
    extra = {"E2FSPROGS_FAKE_TIME": str(timestamp)} if timestamp is not None else {}
    return tool_env(LC_ALL="C", LANG="C", **extra)


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


def partition_bounds(disk_size: int) -> tuple[int, int] | None:
    """(last sector, bytes) of partition 1 on a ploop disk of `disk_size` bytes (whole
    clusters), as ploop's create_gpt_partition lays it out: from one cluster in to one
    cluster (rounded down) before the end, where the backup GPT lives. None if the disk
    is too small for a partition."""
    block = DEFAULT_CLUSTER // SECTOR
    end_excl = (disk_size // SECTOR - block) // block * block
    if end_excl <= PARTITION_START + block:
        return None
    return end_excl - 1, (end_excl - PARTITION_START) * SECTOR


def make_disk(tree: Path, raw: Path, disk_size: int, *, headroom: float = 0.25,
              ext4_features: str = "safe", label: str = "", uuid: str | None = None,
              hash_seed: str | None = None, timestamp: int | None = None,
              log: Log | None = None) -> DiskLayout:
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
    disk_size = round_up(int(disk_size), DEFAULT_CLUSTER)
    bounds = partition_bounds(disk_size)
    if bounds is None:
        raise BuildError(f"{raw}: disk size {disk_size} bytes is too small for a ploop disk")
    part_end, part_bytes = bounds

    balloon = os.lstat(tree / BALLOON_NAME) if os.path.lexists(tree / BALLOON_NAME) else None
    if balloon is not None and not (stat.S_ISREG(balloon.st_mode) and balloon.st_size == 0):
        raise BuildError(f"{tree / BALLOON_NAME}: ploop's balloon file must be an empty regular file")
    usage = tree_usage(tree)
    fs_size = min(_fs_size_for(usage, headroom), part_bytes // FS_BLOCK * FS_BLOCK)
    if fs_size < MIN_FS_BYTES:
        raise BuildError(f"{raw}: partition of {part_bytes // MiB} MiB is below the {MIN_FS_BYTES // MiB} MiB "
                         f"an ext4 with ploop's 128 MiB journal needs; raise the disk size")

    env = e2fsprogs_env(timestamp)
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(raw)               # the tools write it by name; renamed into place when whole
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
            run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", tmp], what=f"{raw}: sfdisk", env=env,
                log=log, input=gpt_script(disk_guid, part_guid, part_end))
            no_room = _mkfs(tree, tmp, fs_size, ext_opts, fs_uuid, label, ext4_features, env, log,
                            what=f"{raw}: mkfs.ext4")
            if no_room is None:
                break
            # Our size estimate was short (odd trees: many xattrs, huge
            # directories): grow within the partition and try again.
            if fs_size >= cap:
                raise BuildError(f"{no_room} (the tree does not fit in a {disk_size // MiB} MiB disk)")
            fs_size = min(cap, round_up(fs_size * 3 // 2, MiB))
        # ploop's make_fs runs exactly this after mkfs; tune2fs has no offset
        # option but e2fsprogs takes "file?offset=N" for any device name.
        run(["tune2fs", "-o", "user_xattr,acl", "-c0", "-i0", "-e", "remount-ro", device],
            what=f"{raw}: tune2fs", env=env, log=log)
        _add_balloon(device, balloon is not None, timestamp, env, log, what=f"{raw}: balloon file",
                     extra=_time_commands(tree, timestamp) if timestamp is not None else [])
        replace_into_place(tmp, raw)
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
          profile: str, env: dict[str, str], log: Log | None, *, what: str) -> str | None:
    """ploop's make_fs options, written at an offset into the raw file, filled from `tree`.
    None when it worked; the error line when the tree did not fit (the caller grows the
    filesystem); BuildError for any other failure."""
    def argv(source: str) -> list[str]:
        a = ["mkfs.ext4", "-F", "-q", "-t", "ext4", "-j", "-b", str(FS_BLOCK), "-I", "256",
             "-i", str(INODE_RATIO), "-J", f"size={JOURNAL_MiB}", "-E", ",".join(ext_opts),
             "-U", fs_uuid, "-L", label, "-d", source]
        if profile == "safe":
            a += ["-O", "^metadata_csum,^64bit"]
        return a + [str(target), f"{fs_size // 1024}k"]

    if os.geteuid() == 0 and which("unshare"):
        # mkfs -d copies each file's atime, and reading the file moves that
        # atime on the host: the first build from a fresh tree would differ
        # from the second. Through a private read-only noatime bind mount
        # nothing moves, nothing in the tree can be changed, and mounts inside
        # the tree (a forgotten /proc) are not descended into. The mount dies
        # with the namespace, whatever happens.
        view = Path(tempfile.mkdtemp(prefix="vztt-tree-"))
        try:
            proc = run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                        'mount --bind -- "$1" "$2" && mount -o remount,bind,ro,noatime -- "$2" && shift 2 && exec "$@"',
                        "sh", str(tree), str(view), *argv(str(view))], what=what, env=env, log=log, check=False)
        finally:
            view.rmdir()
    else:
        proc = run(argv(str(tree)), what=what, env=env, log=log, check=False)
    if proc.returncode == 0:
        return None
    output = proc.stdout + proc.stderr
    problem = f"{what}: {summarize(output) or 'exit status ' + str(proc.returncode)}"
    if any(w in output.lower() for w in _NO_ROOM):
        return problem
    raise BuildError(problem + (f" (log: {log.path})" if log and log.path else ""))


def gpt_script(disk_guid: str, part_guid: str, part_end: int) -> str:
    """sfdisk's input for ploop's GPT: one partition from PARTITION_START to `part_end`."""
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
                 log: Log | None, *, what: str, extra: list[str] = ()) -> None:
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
        proc = run(["debugfs", "-w", "-f", "-", device], what=what, env=env, log=log, input=script)
        out = proc.stdout + proc.stderr
    # debugfs reports command errors on stderr but exits 0.
    bad = [l for l in out.splitlines() if l.strip() and not l.startswith(("debugfs ", "debugfs:", "Allocated inode"))]
    if bad:
        raise BuildError(f"{what}: {bad[0].strip()}")
