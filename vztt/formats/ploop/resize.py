"""Resizing and personalizing a ploop disk without the ploop kernel module
(for `vztt create --layout ploop`).

The image is expanded to a sparse raw disk (only its allocated clusters are
written; formats.ploop.image.read_raw), the GPT is rewritten for the new size
(new disk and partition GUIDs, partition 1 from 1 MiB to one cluster before
the end, as ploop lays it out), the filesystem is checked (e2fsck -f) and
resized with resize2fs to fill the partition, given a new UUID with tune2fs,
personalized through a loop mount of the partition, and converted back into a
ploop v2 image with a new DiskDescriptor.xml. Debian's `ploop check` and
`qemu-img` accept the result.

Errors are one line of the class the caller gives (`error=`), as base.proc.run's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from vztt.base import proc
from vztt.base.errors import BuildError, VzttError
from vztt.base.mounts import Mounts
from vztt.formats.ploop.disk import FS_BLOCK, PARTITION_START, gpt_script, partition_bounds
from vztt.formats.ploop.descriptor import DESCRIPTOR_NAME, descriptor_for
from vztt.formats.ploop.image import IMAGE_NAME, SECTOR, read_image, write_image

# The tools this module runs, and the Debian package of each (for require_tool).
TOOLS = (("losetup", "mount"), ("sfdisk", "fdisk"), ("e2fsck", "e2fsprogs"), ("resize2fs", "e2fsprogs"),
         ("tune2fs", "e2fsprogs"))


def ploop_partition(disk_size: int, error: type[VzttError] = BuildError) -> tuple[int, int]:
    """(last sector, bytes) of partition 1 on a ploop disk of `disk_size`, as ploop lays it out."""
    bounds = partition_bounds(disk_size)
    if bounds is None:
        raise error(f"a ploop disk of {disk_size} bytes is too small")
    return bounds


@contextlib.contextmanager
def partition_device(raw: Path, disk_size: int, error: type[VzttError] = BuildError) -> Iterator[str]:
    """Partition 1 of a raw ploop disk as a loop device, for e2fsprogs and mount.
    (resize2fs on `file?offset=` sizes the file as if the filesystem started at 0.)
    A killed run leaves it to the next run's stale-work cleanup, which detaches
    loop devices backed by files under <cache>/.work."""
    _, part_bytes = ploop_partition(disk_size, error)
    dev = proc.run(["losetup", "--find", "--show", "--offset", str(PARTITION_START * SECTOR),
                    "--sizelimit", str(part_bytes), raw], what=f"{raw}: losetup", error=error,
                   inherit_env=False).stdout.strip()
    try:
        yield dev
    finally:
        proc.run(["losetup", "--detach", dev], what=f"{raw}: losetup --detach", inherit_env=False, check=False)


def fill_partition(raw: Path, disk_size: int, error: type[VzttError] = BuildError, *,
                   partition_of: int | None = None, what: str = "resize2fs") -> None:
    """Check the ext4 in partition 1 and resize it to fill the partition of a `disk_size`
    disk (the partition as it is now is that of a `partition_of` disk, if given)."""
    _, part_bytes = ploop_partition(disk_size, error)
    with partition_device(raw, partition_of or disk_size, error) as dev:
        proc.run(["e2fsck", "-f", "-y", dev], what=f"{raw}: e2fsck", error=error, inherit_env=False, ok=(0, 1))
        proc.run(["resize2fs", dev, str(part_bytes // FS_BLOCK)], what=f"{raw}: {what}", error=error,
                 inherit_env=False)


def resize_raw(raw: Path, disk_size: int, error: type[VzttError] = BuildError) -> None:
    """Grow (or shrink) a raw ploop disk to `disk_size`: GPT rewritten (new GUIDs),
    ext4 checked and resized to fill partition 1."""
    part_end, _ = ploop_partition(disk_size, error)
    current = os.stat(raw).st_size
    if disk_size < current:                   # shrink the filesystem while the old partition still holds it
        fill_partition(raw, disk_size, error, partition_of=current,
                       what=f"resize2fs (shrink to {disk_size >> 20} MiB)")
    with open(raw, "r+b") as fh:
        fh.truncate(disk_size)
    script = gpt_script(str(uuid.uuid4()), str(uuid.uuid4()), part_end)
    proc.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "--wipe", "never", "--wipe-partitions", "never",
              raw], what=f"{raw}: sfdisk", error=error, inherit_env=False, input=script)
    if disk_size >= current:
        fill_partition(raw, disk_size, error)


@contextlib.contextmanager
def mounted_partition(raw: Path, mnt: Path, disk_size: int, fs_uuid: str,
                      error: type[VzttError] = BuildError) -> Iterator[Path]:
    """Partition 1 given the filesystem UUID `fs_uuid`, then mounted on `mnt` for the
    with-block (to personalize the tree in it)."""
    with partition_device(raw, disk_size, error) as dev:
        proc.run(["tune2fs", "-U", fs_uuid, dev], what=f"{raw}: tune2fs -U", error=error, inherit_env=False)
        mounts = Mounts()
        try:
            try:
                mounts.mount(dev, mnt, fstype="ext4", options="noatime")
            except BuildError as e:
                raise error(str(e)) from None
            yield mnt
        finally:
            mounts.unmount_all()


def write_private_area(raw: Path, dest: Path, vzpackages: bytes | None) -> None:
    """raw disk (resized, personalized; removed) -> dest/root.hdd/{root.hds, DiskDescriptor.xml}
    and dest/templates/vzpackages: a container's private area as Virtuozzo 7 keeps it."""
    hdd = dest / "root.hdd"
    hdd.mkdir(exist_ok=True)
    hds = hdd / IMAGE_NAME
    write_image(raw, hds)
    raw.unlink()
    info = read_image(hds)
    (hdd / DESCRIPTOR_NAME).write_text(descriptor_for(info))
    os.chmod(hds, 0o600)
    if vzpackages is not None:
        (dest / "templates").mkdir(exist_ok=True)
        (dest / "templates" / "vzpackages").write_bytes(vzpackages)
