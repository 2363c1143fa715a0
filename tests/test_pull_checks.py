"""What `vztt pull` checks beyond signatures and digests (issue #13): the archive
passes the same guard `vztt create` unpacks through before it enters the
cache; a refused streaming create keeps no part file of the bad archive; a
plain archive's `tar_size` is required; free space is checked before anything
is downloaded; two pulls of one template say who waits for whom.

Hand-made templates published with the real `vztt publish`, served by a real
nginx on loopback.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lz4.frame
import pytest

from conftest import PACKAGE_CACHE, REPO, one_line_error, run_vztt
from mirrorkit import Keys, Member, install_template, keys, sign, small_tree, snapshot, tar_bytes, temp_files, \
    tiny_template, web
from nginx import Nginx

__all__ = ["keys", "web"]

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="create needs root")
TINY = "tiny-1-x86_64"
# A symlink out of the tree, then a file written through it: what the guard refuses.
ESCAPE = [Member("./", tarfile.DIRTYPE), Member("etc", tarfile.SYMTYPE, link="/tmp/vztt-escape-target"),
          Member("etc/passwd", data=b"root::0:0::/root:/bin/sh\n")]


def index_of(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


def published(tmp_path: Path, keys: Keys, web: Nginx, members: list[Member], *, tar_size: bool = True) -> tuple[Path, str]:
    """A template of these members published (by the real `vztt publish`) where nginx serves it."""
    raw = tar_bytes(members)
    cache = tmp_path / "publisher"
    install_template(cache, TINY, lz4.frame.compress(raw), tar_size=len(raw) if tar_size else None)
    served = web.mirror_root / tmp_path.name
    r = run_vztt("publish", "--to", served, cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    return served, web.url("mirror") + tmp_path.name + "/"


def cache_content(cache: Path) -> dict:
    """The templates of a cache (its lock and mirror records aside; partial downloads are checked apart)."""
    return {k: v for k, v in snapshot(cache).items() if not k.startswith((".locks", ".mirrors", ".downloads"))}


def test_pull_refuses_an_archive_create_would_refuse(tmp_path: Path, keys: Keys, web: Nginx) -> None:
    served, url = published(tmp_path, keys, web, ESCAPE)
    host = tmp_path / "host"
    tiny_template(host, payload=b"the build in place\n")
    before = cache_content(host)
    r = run_vztt("pull", TINY, "--from", url, cache=host, env=keys.env())
    assert r.returncode == 6, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: archive error: ") and "etc/passwd" in line, line
    assert cache_content(host) == before            # the old build stays; no part file of the bad one
    assert list((host / ".downloads").iterdir()) == [] and temp_files(host) == []


@ROOT
def test_a_refused_streaming_create_keeps_no_part_file(tmp_path: Path, keys: Keys, web: Nginx) -> None:
    served, url = published(tmp_path, keys, web, ESCAPE)
    host = tmp_path / "host"
    r = run_vztt("create", TINY, tmp_path / "ct", "--layout", "dir", "--from", url, cache=host, env=keys.env())
    assert r.returncode == 6 and one_line_error(r).startswith("vztt: archive error: "), r.stderr
    assert not (tmp_path / "ct").exists()
    sha = index_of(served)["templates"][TINY]["builds"][0]["archives"]["plain"]["sha256"]
    assert not (host / ".downloads" / f"{sha}.part").exists()
    assert list((host / ".downloads").iterdir()) == [] and not (host / f"{TINY}.manifest.json").exists()


def test_tar_size_is_required_and_space_checked_before_download(tmp_path: Path, keys: Keys, web: Nginx) -> None:
    served, url = published(tmp_path, keys, web, small_tree())
    good = index_of(served)
    host = tmp_path / "host"

    def rewrite(change) -> None:  # type: ignore[no-untyped-def]
        doc = json.loads(json.dumps(good))
        change(doc["templates"][TINY]["builds"][0]["archives"]["plain"])
        (served / "index.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        sign(keys, keys.publisher, served / "index.json")

    # No tar_size: nothing bounds the unpacking; refused even though it is signed.
    rewrite(lambda rec: rec.pop("tar_size"))
    r = run_vztt("pull", TINY, "--from", url, cache=host, env=keys.env())
    assert r.returncode == 5 and "tar_size" in one_line_error(r), r.stderr
    # 10^15 bytes: refused at once against the free space, and the archive never asked for.
    rewrite(lambda rec: rec.update(size=10 ** 15))
    log_before = len(web.access_log())
    r = run_vztt("pull", TINY, "--from", url, cache=host, env=keys.env())
    assert r.returncode == 7, r.stderr
    line = one_line_error(r)
    assert "MB free" in line and str(host) in line, line
    asked = [l for l in web.access_log()[log_before:] if "/templates/" in l]
    assert asked == [], asked
    assert cache_content(host) == {} and not list(host.glob(".downloads/*"))
    # Publish refuses to make such an index from a cache entry without tar_size.
    bare = tmp_path / "bare"
    raw = tar_bytes(small_tree())
    install_template(bare, TINY, lz4.frame.compress(raw))
    r = run_vztt("publish", "--to", tmp_path / "m2", cache=bare, env=keys.env())
    assert r.returncode == 3 and "tar_size" in one_line_error(r), r.stderr
    assert not (tmp_path / "m2" / "index.json").exists()


def test_a_waiting_pull_says_whom_it_waits_for(tmp_path: Path, keys: Keys, web: Nginx) -> None:
    served, url = published(tmp_path, keys, web, small_tree(os.urandom(200_000)))
    host = tmp_path / "host"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env.update(keys.env(), VZTT_PACKAGE_CACHE=str(PACKAGE_CACHE))
    argv = [sys.executable, "-m", "vztt", "--cache-dir", str(host), "pull", TINY, "--from", url]
    first = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = host / ".locks" / f"{TINY}.lock"
    deadline = time.monotonic() + 30
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)           # holds the template's lock, as a slow download would
    try:
        second = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert second.stderr is not None
        # The first thing it says, while it waits (not after the wait: then it would say nothing for long).
        ready, _, _ = select.select([second.stderr], [], [], 30)
        said = second.stderr.readline() if ready else ""
        assert f"pid {first.pid}" in said and "vztt" in said and "pull" in said and TINY in said, said
        assert second.poll() is None               # and it is still waiting
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, err1 + said + err2
    assert "already in the cache" in out2
