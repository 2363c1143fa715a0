"""A crash at every point of promote (store/templates.py), and recover() at the next start.

Promote moves the cached files (archive, a second part, manifest) to -old, the new ones into
place, then removes -old: nine file operations. A real process runs the real promote and is SIGKILLed
just before operation k (k = 0..9; 9 finishes), its file operations counted by a wrapper
that kills the process (the fault injected; nothing is replaced). Then the real command
line reads the cache (`vztt list --json`, which runs recover()): the template is the old
pair or the new pair, byte for byte, never a mix and never gone; no -old file is left.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_vztt
from mirrorkit import tiny_template

NAME = "debian-12-x86_64-minimal"      # a shipped recipe: `vztt list` names it
PART = f"{NAME}.plain.part"           # a second file of the build (as a format with parts has)
OPS = 9                                # 6 renames, 3 unlinks

CRASHER = r"""
import os, signal, sys
from pathlib import Path
from vztt.store.templates import TemplateCache

root, name, crash_before = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
done = 0

def counted(real):
    def op(*a, **kw):
        global done
        if done == crash_before:
            os.kill(os.getpid(), signal.SIGKILL)
        done += 1
        return real(*a, **kw)
    return op

os.replace = counted(os.replace)
Path.unlink = counted(Path.unlink)
cache = TemplateCache(root)
pairs = [(root / ".new-archive", root / f"{name}.plain.tar.lz4"),
         (root / ".new-part", root / f"{name}.plain.part"),
         (root / ".new-manifest", root / f"{name}.manifest.json")]
cache.promote(name, pairs)
"""


def pair(cache: Path) -> tuple[bytes, bytes, bytes] | None:
    a, part, m = cache / f"{NAME}.plain.tar.lz4", cache / PART, cache / f"{NAME}.manifest.json"
    return (a.read_bytes(), part.read_bytes(), m.read_bytes()) if a.exists() and m.exists() and part.exists() \
        else None


@pytest.mark.parametrize("crash_before", range(OPS + 1), ids=[f"op{k}" for k in range(OPS)] + ["finished"])
def test_crash_during_promote(tmp_path: Path, crash_before: int) -> None:
    old_dir, new_dir, cache = tmp_path / "old", tmp_path / "new", tmp_path / "cache"
    for d, what, when in ((old_dir, b"old", "2025"), (cache, b"old", "2025"), (new_dir, b"new, longer", "2026")):
        tiny_template(d, name=NAME, payload=b"the %s build\n" % what, created=f"{when}-06-01T00:00:00+00:00")
        (d / PART).write_bytes(b"part of the %s build\n" % what)
    old, new = pair(old_dir), pair(new_dir)
    assert pair(cache) == old
    (cache / ".new-archive").write_bytes(new[0])      # what the build wrote under temporary names
    (cache / ".new-part").write_bytes(new[1])
    (cache / ".new-manifest").write_bytes(new[2])
    p = subprocess.run([sys.executable, "-c", CRASHER, str(cache), NAME, str(crash_before)], cwd=REPO,
                       capture_output=True, text=True)
    if crash_before < OPS:
        assert p.returncode == -9, p.stderr
    else:
        assert p.returncode == 0, p.stderr
    r = run_vztt("list", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    row = next(row for row in r.json() if row["name"] == NAME)
    assert row["cached"], f"crash before operation {crash_before}: the template is gone"
    found = pair(cache)
    assert found in (old, new), f"crash before operation {crash_before}: a mix of the old and the new pair"
    if crash_before >= 6:             # the new manifest was in place: the new template is committed
        assert found == new
    manifest = json.loads(found[2])
    assert manifest["archive"]["sha256"] == hashlib.sha256(found[0]).hexdigest()
    assert sorted(p.name for p in cache.glob("*-old")) == []
