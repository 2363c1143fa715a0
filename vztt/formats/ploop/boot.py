"""The tree in a ploop cache, for the boot test: what Virtuozzo gets is what is booted.

The cache's `root.hds` is taken out of the `.tar.lz4` through the tar guard
(formats/safetar.py: the cache may come from a mirror), read back by our own
reader (image.read_raw: every BAT entry checked) into a sparse raw disk, and
partition 1 is mounted read-only (`noload`: not even a journal replay) for
the runtime to lay its overlay on. Everything lives below the caller's
scratch directory, in its private mount namespace: the loop device is
detached and the mount undone on the way out, and a killed run's are removed
by the next run's stale-work cleanup.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from vztt.base.mounts import Mounts
from vztt.formats import ImageFormatError
from vztt.formats.ploop.cache import is_cache_member
from vztt.formats.ploop.image import IMAGE_NAME, read_raw
from vztt.formats.ploop.resize import partition_device
from vztt.formats.safetar import Limits, extract_lz4, file_chunks

MAX_MEMBERS = 64


@contextlib.contextmanager
def disk_tree(cache_file: Path, scratch: Path) -> Iterator[Path]:
    """Partition 1 of the cache's disk, mounted read-only at scratch/root."""
    unpacked = scratch / "cache"
    unpacked.mkdir()
    limits = Limits(max_bytes=shutil.disk_usage(scratch).free, max_members=MAX_MEMBERS,
                    types=frozenset({"file", "dir"}), allow=is_cache_member)
    extract_lz4(file_chunks(cache_file), unpacked, limits, what=str(cache_file), hash_input=False)
    hds = unpacked / IMAGE_NAME
    if not hds.is_file():
        raise ImageFormatError(f"{cache_file}: no {IMAGE_NAME} in this ploop cache")
    raw = scratch / "disk.raw"
    info = read_raw(hds, raw)
    hds.unlink()
    root = scratch / "root"
    with partition_device(raw, info.disk_size) as device, Mounts() as mounts:
        mounts.mount(device, root, fstype="ext4", options="ro,noload")
        yield root
