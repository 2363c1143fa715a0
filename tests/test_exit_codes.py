"""Exit statuses from the command line that nothing else reaches: 7 for "not root" and for
a missing tool, 10 for a runtime that cannot start. Each is one error line, and the cache
is left as it was.

Not root: the real command as user nobody (setpriv), with Debian's python3 and a readable
copy of the package (as tests/test_cli_errors.py does). A missing tool: vztt looks tools up
on its own fixed PATH, so the tool is hidden for real, in a private mount namespace of the
one command (unshare -m; /dev/null bound over it), not by a PATH the caller sets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import RECIPES, REPO, Result, leftovers, one_line_error
from mirrorkit import tiny_template

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs vztt as another user)")
NOBODY = 65534
NAME = "debian-12-x86_64-minimal"


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory user nobody can read, with the package and the recipes in it."""
    d = Path(tempfile.mkdtemp(prefix="vztt-exit-"))
    os.chmod(d, 0o755)
    shutil.copytree(REPO / "vztt", d / "src" / "vztt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(RECIPES, d / "recipes")
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(shared: Path, cache: Path, *args: str) -> Result:
    p = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-m", "vztt", "--cache-dir", str(cache), "--recipes",
                        str(shared / "recipes"), *args], capture_output=True, text=True, cwd="/", timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shared / "src"), "HOME": "/"})
    return Result(p.returncode, p.stdout, p.stderr)


def owned_by_nobody(cache: Path) -> dict[str, int]:
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(cache)], check=True)
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")}


def test_build_as_a_user_is_7(shared: Path) -> None:
    cache = shared / "cache-build"
    cache.mkdir()
    before = owned_by_nobody(cache)
    r = as_nobody(shared, cache, "build", NAME)
    assert r.returncode == 7, r.stderr
    assert one_line_error(r) == ("vztt: environment error: vztt build needs root (loop devices, mounts, chroot); "
                                 "run it with sudo")
    assert {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")} == before


@pytest.mark.parametrize("command", ["test", "run"])
def test_boot_as_a_user_is_10(shared: Path, command: str) -> None:
    cache = shared / f"cache-{command}"
    tiny_template(cache, name=NAME)            # a cached template to boot: the runtime is what refuses
    before = owned_by_nobody(cache)
    r = as_nobody(shared, cache, command, NAME, *(["--", "true"] if command == "run" else []))
    assert r.returncode == 10, r.stderr
    assert one_line_error(r) == (f"vztt: runtime error: vztt {command} needs root (namespaces, overlayfs, "
                                 "cgroups); run it with sudo")
    assert {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_missing_tool_is_7_before_anything_is_built(tmp_path: Path) -> None:
    mksquashfs = shutil.which("mksquashfs", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert mksquashfs, "squashfs-tools is installed by the Makefile"
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env["VZTT_PACKAGE_CACHE"] = str(tmp_path / "packages")
    script = f'mount --bind /dev/null {mksquashfs} && exec "$@"'
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                        sys.executable, "-m", "vztt", "--cache-dir", str(cache), "build", NAME, "--format", "incus"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    r = Result(p.returncode, p.stdout, p.stderr)
    assert r.returncode == 7, r.stderr
    assert one_line_error(r) == ("vztt: environment error: mksquashfs is missing (format incus): "
                                 "apt-get install squashfs-tools")
    # Refused before anything was resolved, fetched or installed.
    assert not (cache / "locks").exists() and not list(cache.glob(f"{NAME}*")), sorted(cache.rglob("*"))
    assert not (tmp_path / "packages").exists() or not any((tmp_path / "packages").rglob("*.deb"))
    assert leftovers(cache) == []
    assert os.access(mksquashfs, os.X_OK) and Path(mksquashfs).stat().st_size > 0     # the host's is untouched
