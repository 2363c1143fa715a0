"""A build that writes fewer formats than the cached template has (issue #13):
`--format ploop` keeps the cached plain archive when it comes from the same
lock (the manifest keeps naming it); a format from another lock is removed,
and one line says so. Two real `--locked --no-test` builds of debian-12
(conftest's `debian12`: its lock and the shared package cache, nothing
downloaded), each in a cache of its own that starts as a copy of the
session's template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import BuiltTemplate, leftovers, run_vztt

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="building needs root")]


def cache_with_plain(debian12: BuiltTemplate, cache: Path, lock_digest: str | None = None) -> dict:
    """A cache holding debian-12's plain archive (a hard link), its manifest and lock; the
    manifest says it was built from `lock_digest` if given (another lock)."""
    name = debian12.name
    (cache / "locks").mkdir(parents=True)
    manifest = debian12.manifest
    plain = manifest["archives"]["plain"]["file"]
    os.link(debian12.cache / plain, cache / plain)
    shutil.copyfile(debian12.cache / "locks" / f"{name}.lock.json", cache / "locks" / f"{name}.lock.json")
    manifest = {**manifest, "formats": ["plain"], "archive": manifest["archives"]["plain"],
                "archives": {"plain": manifest["archives"]["plain"]}}
    if lock_digest:
        manifest["lock_digest"] = lock_digest
    (cache / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def test_a_ploop_build_keeps_the_plain_archive_of_the_same_lock(debian12: BuiltTemplate, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = cache_with_plain(debian12, cache)
    plain = cache / old["archives"]["plain"]["file"]
    r = run_vztt("build", debian12.name, "--locked", "--format", "ploop", "--no-test", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((cache / f"{debian12.name}.manifest.json").read_text())
    assert manifest["formats"] == ["plain", "ploop"] and manifest["lock_digest"] == old["lock_digest"]
    assert manifest["archives"]["plain"] == old["archives"]["plain"]
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == old["archives"]["plain"]["sha256"]
    ploop = cache / manifest["archives"]["ploop"]["file"]
    assert hashlib.sha256(ploop.read_bytes()).hexdigest() == manifest["archives"]["ploop"]["sha256"]
    assert "removed" not in r.stderr
    assert leftovers(cache) == []


def test_a_plain_build_removes_a_ploop_cache_of_another_lock(debian12: BuiltTemplate, tmp_path: Path) -> None:
    # The cached template: plain and ploop, from another lock than debian-12's (the ploop
    # file's bytes do not matter: it is only to be removed, never read).
    cache = tmp_path / "cache"
    old = cache_with_plain(debian12, cache, lock_digest="sha256:" + "0" * 64)
    ploop = cache / f"{debian12.name}.plain.ploopv2.tar.lz4"
    ploop.write_bytes(b"a ploop cache of another lock\n")
    record = {"file": ploop.name, "format": "ploop", "sha256": hashlib.sha256(ploop.read_bytes()).hexdigest(),
              "size": ploop.stat().st_size, "disk_size": 10 << 30, "clusters": 1}
    old.update(formats=["plain", "ploop"], archives={**old["archives"], "ploop": record})
    (cache / f"{debian12.name}.manifest.json").write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    r = run_vztt("build", debian12.name, "--locked", "--format", "plain", "--no-test", cache=cache)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((cache / f"{debian12.name}.manifest.json").read_text())
    assert manifest["formats"] == ["plain"] and not ploop.exists()
    said = [l for l in r.stderr.splitlines() if "removed" in l]
    assert len(said) == 1 and ploop.name in said[0] and "another lock" in said[0], r.stderr
    plain = cache / manifest["archives"]["plain"]["file"]
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == manifest["archives"]["plain"]["sha256"]
    assert leftovers(cache) == []
