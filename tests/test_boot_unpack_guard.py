"""`vztt test` and `vztt run` unpack the cached archive through the guarded unpacker
(formats/safetar.py), as `vztt create` does, never with plain tar: the cache may hold an
archive from a mirror, and a boot test's tree is a tmpfs mounted without nodev.

The archive holds a block device node (the disk /dev/sda) that plain tar, as root,
would create; the guard refuses it before tar sees it.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import lz4.frame
import pytest

from conftest import leftovers, one_line_error, run_vztt
from mirrorkit import Member, install_template, small_tree, tar_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="booting templates needs root")
NAME = "debian-12-x86_64-minimal"     # a shipped recipe: test and run boot NAME's cached archive


@pytest.mark.parametrize("command", ["test", "run"])
def test_a_block_device_in_the_cached_archive_is_refused(tmp_path: Path, command: str) -> None:
    cache = tmp_path / "cache"
    members = small_tree() + [Member("dev", tarfile.DIRTYPE),
                              Member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0)]
    install_template(cache, NAME, lz4.frame.compress(tar_bytes(members)))
    r = run_vztt(command, NAME, *(["--", "true"] if command == "run" else []), cache=cache, timeout=300)
    assert r.returncode == 6, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: archive error: ") and "dev/sda" in line, line
    assert leftovers(cache) == []
    assert not list((cache / ".containers").glob("*/*")) if (cache / ".containers").exists() else True
