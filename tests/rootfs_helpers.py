"""A Debian root tree with systemd, built once and cached, for tests that boot.

`debian_rootfs()` returns a bookworm minbase tree with systemd-sysv and
iproute2 under /var/tmp/vztt-test-rootfs. It is built with mmdebstrap from the
host's own apt sources (no mirror argument), into a temporary directory that is
renamed into place only when complete, so an interrupted build is never used.
The tree is treated as read-only by the tests (they boot it through overlayfs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# VZTT_TEST_ROOTFS_CACHE: another place (a fresh machine's first run, in a test of the tests).
CACHE = Path(os.environ.get("VZTT_TEST_ROOTFS_CACHE") or "/var/tmp/vztt-test-rootfs")
SUITE = "bookworm"
INCLUDE = ("systemd-sysv", "iproute2")


TREE = CACHE / f"{SUITE}-minbase-{'-'.join(INCLUDE)}"


def rootfs_cached() -> bool:
    """Whether debian_rootfs() can answer without the network."""
    return TREE.is_dir()


def debian_rootfs() -> Path:
    """Path of the cached tree, building it first if needed (~30 s, root only)."""
    tree = TREE
    if tree.is_dir():
        return tree
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".{tree.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root",
             "--include=" + ",".join(INCLUDE), SUITE, str(partial)],
            check=True, stdin=subprocess.DEVNULL,
        )
        # The host's hostname leaks into the tree; the runtime writes its own.
        (partial / "etc/hostname").unlink(missing_ok=True)
        partial.rename(tree)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return tree


if __name__ == "__main__":
    print(debian_rootfs())
