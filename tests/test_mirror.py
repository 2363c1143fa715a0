"""Publishing to a mirror and pulling from it (issue #7), against a real nginx on
loopback: a directory it serves, and a WebDAV location it accepts PUT, MOVE and
DELETE on. The real debian-12 template (conftest's `debian12`) goes both ways;
small hand-made templates cover retention, refusals and hostile mirrors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, BuiltTemplate, one_line_error, run_vztt
from mirrorkit import (DAV_ENV, NAME, CuttingProxy, Keys, copy_mirror, keys, sign, snapshot, temp_files,
                       tiny_template, web)
from nginx import DAV_PASSWORD, DAV_USER, Nginx
from vztt.mirror import index as mirror_mod
from vztt.base.errors import EXIT_CODES

__all__ = ["keys", "web"]      # module fixtures, imported

TINY = "tiny-1-x86_64"


def index_of(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


@pytest.fixture(scope="module")
def published(debian12: BuiltTemplate, keys: Keys, web: Nginx) -> dict:
    """debian-12 published to the served directory and, through WebDAV, to the second location."""
    r1 = run_vztt("publish", NAME, "--to", web.mirror_root, "--json", cache=debian12.cache, env=keys.env())
    assert r1.returncode == 0, r1.stderr
    r2 = run_vztt("publish", NAME, "--to", web.url("dav"), "--json", cache=debian12.cache,
                  env=keys.env(**DAV_ENV))
    assert r2.returncode == 0, r2.stderr
    return {"dir": r1.json(), "dav": r2.json()}


# -- the round trip ------------------------------------------------------------------------

@pytest.mark.network          # the real debian-12 build (conftest's `debian12`)
@pytest.mark.slow
def test_publish_to_a_directory_and_to_webdav(debian12: BuiltTemplate, published: dict, web: Nginx) -> None:
    for root in (web.mirror_root, web.dav_root):
        index = index_of(root)
        assert index["format"] == 1 and index["serial"] == 1
        (build,) = index["templates"][NAME]["builds"]
        m = debian12.manifest
        assert build["archives"]["plain"]["sha256"] == m["archive"]["sha256"]
        assert build["archives"]["plain"]["size"] == m["archive"]["size"]
        assert build["lock_digest"] == m["lock_digest"] and build["package_count"] == m["package_count"]
        assert build["boot_test"] == "passed" and build["formats"] == m["formats"]
        assert build["created"] == m["created"] and build["id"] == mirror_mod.build_id(m)
        archive = root / build["archives"]["plain"]["path"]
        assert archive == root / "templates" / NAME / build["id"] / f"{NAME}.plain.tar.lz4"
        assert archive.read_bytes() == debian12.archive.read_bytes()
        assert (root / "index.json.asc").read_text().startswith("-----BEGIN PGP SIGNATURE-----")
        assert temp_files(root) == []
    # The WebDAV publish went through temporary names and MOVE, with credentials.
    methods = [line.split('"')[1].split()[0] for line in web.access_log() if "/dav/" in line]
    assert {"PUT", "MOVE"} <= set(methods)
    assert all(" 401 " not in line for line in web.access_log() if '"PUT ' in line or '"MOVE ' in line)


@pytest.mark.network          # the real debian-12 build (conftest's `debian12`)
@pytest.mark.slow
def test_pull_back_from_both_locations(debian12: BuiltTemplate, published: dict, keys: Keys, web: Nginx,
                                       tmp_path: Path) -> None:
    for location in ("mirror", "dav"):
        cache = tmp_path / location
        r = run_vztt("pull", NAME, "--from", web.url(location), "--json", cache=cache, env=keys.env())
        assert r.returncode == 0, r.stderr
        doc = r.json()
        assert doc["signer"] == keys.publisher and not doc["up_to_date"]
        pulled = cache / f"{NAME}.plain.tar.lz4"
        assert pulled.read_bytes() == debian12.archive.read_bytes()
        manifest = json.loads((cache / f"{NAME}.manifest.json").read_text())
        assert manifest.pop("pulled")["from"] == web.url(location)
        assert manifest == debian12.manifest
        assert sorted(p.name for p in cache.iterdir()) == [".downloads", ".locks", ".mirrors",
                                                           f"{NAME}.manifest.json", f"{NAME}.plain.tar.lz4"]
        assert list((cache / ".downloads").iterdir()) == []
        # Again: nothing to download.
        again = run_vztt("pull", NAME, "--from", web.url(location), "--json", cache=cache, env=keys.env())
        assert again.returncode == 0 and again.json()["up_to_date"] and again.json()["bytes_downloaded"] == 0


@pytest.mark.network          # the real debian-12 build (conftest's `debian12`)
@pytest.mark.slow
def test_publish_again_uploads_nothing(debian12: BuiltTemplate, published: dict, keys: Keys, web: Nginx) -> None:
    before = len(web.access_log())
    r = run_vztt("publish", "--to", web.url("dav"), "--json", cache=debian12.cache, env=keys.env(**DAV_ENV))
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["unchanged"] == [NAME] and doc["published"] == [] and not doc["index_written"]
    new = web.access_log()[before:]
    assert not [l for l in new if '"PUT ' in l or '"MOVE ' in l or '"DELETE ' in l], new
    assert index_of(web.dav_root)["serial"] == 1


def test_webdav_credentials_from_netrc_and_their_absence(tmp_path: Path, keys: Keys, web: Nginx) -> None:
    cache = tmp_path / "cache"
    tiny_template(cache)
    url = web.url("dav") + "netrc-test/"
    r = run_vztt("publish", "--to", url, cache=cache, env=keys.env())
    assert r.returncode == 5
    line = one_line_error(r)
    assert "401" in line and "VZTT_PUBLISH_USER" in line
    assert not (web.dav_root / "netrc-test" / "index.json").exists()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {DAV_USER} password {DAV_PASSWORD}\n")
    netrc.chmod(0o600)
    r = run_vztt("publish", "--to", url, cache=cache, env=keys.env(NETRC=str(netrc)))
    assert r.returncode == 0, r.stderr
    root = web.dav_root / "netrc-test"
    (first,) = index_of(root)["templates"][TINY]["builds"]
    assert first["boot_test"] == "passed"
    # A newer build with --keep 1: the old one is DELETEd over WebDAV, after the new index is in place.
    tiny_template(cache, payload=b"newer\n", created="2026-02-01T00:00:00+00:00")
    r = run_vztt("publish", "--to", url, "--keep", "1", "--json", cache=cache, env=keys.env(NETRC=str(netrc)))
    assert r.returncode == 0, r.stderr
    assert r.json()["removed"] == [f"{TINY} {first['id']}"]
    (second,) = index_of(root)["templates"][TINY]["builds"]
    assert second["id"] != first["id"] and (root / second["archives"]["plain"]["path"]).is_file()
    assert not (root / "templates" / TINY / first["id"]).exists()
    log = web.access_log()
    deletes = [i for i, l in enumerate(log) if '"DELETE ' in l and first["id"] in l]
    index_move = max(i for i, l in enumerate(log) if '"MOVE ' in l and "netrc-test/.index.json.tmp" in l)
    assert deletes and min(deletes) > index_move
    assert temp_files(root) == []


# -- what may be published --------------------------------------------------------------------

def test_untested_and_failed_templates_are_refused(tmp_path: Path, keys: Keys) -> None:
    assert dict(EXIT_CODES)[11].startswith("publish refused")
    assert re.search(r"^\s+11\s+publish refused", run_vztt("--help").stdout, re.M)
    cache, dest = tmp_path / "cache", tmp_path / "mirror"
    tiny_template(cache, boot_test="skipped")
    r = run_vztt("publish", "--to", dest, cache=cache, env=keys.env())
    assert r.returncode == 11
    assert "--allow-untested" in one_line_error(r)
    assert not (dest / "index.json").exists() and not (dest / "templates").exists()
    r = run_vztt("publish", "--to", dest, "--allow-untested", "--json", cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    assert index_of(dest)["templates"][TINY]["builds"][0]["boot_test"] == "skipped"
    tiny_template(cache, "tiny-2-x86_64", boot_test="failed")
    r = run_vztt("publish", "tiny-2-x86_64", "--to", dest, "--allow-untested", cache=cache, env=keys.env())
    assert r.returncode == 11 and "failed" in one_line_error(r)
    assert "tiny-2-x86_64" not in index_of(dest)["templates"]


def test_publish_needs_a_signing_key_it_has(tmp_path: Path, keys: Keys) -> None:
    cache = tmp_path / "cache"
    tiny_template(cache)
    r = run_vztt("publish", "--to", tmp_path / "m", "--sign-key", "nobody@example.invalid", cache=cache,
                 env=keys.env())
    assert r.returncode == 7 and "no secret key" in one_line_error(r)
    assert not (tmp_path / "m" / "index.json").exists()


def test_retention_keeps_the_newest_builds(tmp_path: Path, keys: Keys) -> None:
    cache, dest = tmp_path / "cache", tmp_path / "mirror"
    ids = []
    for day in (1, 2, 3):
        m = tiny_template(cache, payload=f"build {day}\n".encode(), created=f"2026-01-0{day}T00:00:00+00:00")
        ids.append(mirror_mod.build_id(m))
        r = run_vztt("publish", "--to", dest, "--keep", "2", "--json", cache=cache, env=keys.env())
        assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["removed"] == [f"{TINY} {ids[0]}"] and doc["serial"] == 3
    builds = index_of(dest)["templates"][TINY]["builds"]
    assert [b["id"] for b in builds] == [ids[2], ids[1]]
    assert not (dest / "templates" / TINY / ids[0]).exists()
    for b in builds:
        assert (dest / b["archives"]["plain"]["path"]).is_file() and (dest / b["manifest"]["path"]).is_file()
    assert temp_files(dest) == []


# -- hostile mirrors ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_mirror(tmp_path: Path, keys: Keys) -> Path:
    cache, dest = tmp_path / "publisher", tmp_path / "mirror"
    tiny_template(cache, payload=os.urandom(300_000))
    r = run_vztt("publish", "--to", dest, cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture
def host_cache(tmp_path: Path) -> Path:
    """A container host's cache holding an older build of the template: what must not change."""
    cache = tmp_path / "host"
    tiny_template(cache, payload=b"the old build\n", created="2025-06-01T00:00:00+00:00")
    return cache


def _pull_fails(cache: Path, source: str | Path, keys: Keys, code: int = 5) -> str:
    def content() -> dict:      # the templates; not the lock files, the serials seen, nor a partial download kept
        return {k: v for k, v in snapshot(cache).items() if not k.startswith((".locks", ".downloads", ".mirrors"))}

    before = content()
    r = run_vztt("pull", TINY, "--from", str(source), cache=cache, env=keys.env())
    assert r.returncode == code, r.stderr
    assert content() == before
    assert temp_files(cache) == []
    return one_line_error(r)


def test_tampered_index_is_refused(tiny_mirror: Path, host_cache: Path, keys: Keys, web: Nginx) -> None:
    served = copy_mirror(tiny_mirror, web.mirror_root / "tampered")
    index = index_of(served)
    index["templates"][TINY]["builds"][0]["boot_test"] = "passed-ish"
    (served / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    line = _pull_fails(host_cache, web.url("mirror") + "tampered/", keys)
    assert "signature error" in line and "bad signature" in line


def test_signature_from_an_untrusted_key_is_refused(tiny_mirror: Path, host_cache: Path, keys: Keys) -> None:
    sign(keys, keys.intruder, tiny_mirror / "index.json")
    line = _pull_fails(host_cache, tiny_mirror, keys)
    assert "not among the trusted keys" in line and keys.intruder[-16:] in line
    # And the armored form of the right key is accepted as a keyring.
    sign(keys, keys.publisher, tiny_mirror / "index.json")
    r = run_vztt("pull", TINY, "--from", tiny_mirror, "--keyring", keys.trusted_armored, cache=host_cache,
                 env=keys.env())
    assert r.returncode == 0, r.stderr


def test_wrong_sha256_and_truncated_downloads(tiny_mirror: Path, host_cache: Path, keys: Keys, web: Nginx) -> None:
    build = index_of(tiny_mirror)["templates"][TINY]["builds"][0]
    rel = build["archives"]["plain"]["path"]
    data = (tiny_mirror / rel).read_bytes()
    wrong = copy_mirror(tiny_mirror, web.mirror_root / "wrong")
    (wrong / rel).write_bytes(bytes(reversed(data)))          # same size, other bytes
    line = _pull_fails(host_cache, web.url("mirror") + "wrong/", keys)
    assert "sha256" in line and "tampered" in line
    short = copy_mirror(tiny_mirror, web.mirror_root / "short")
    (short / rel).write_bytes(data[: len(data) // 2])
    line = _pull_fails(host_cache, web.url("mirror") + "short/", keys)
    assert "truncated" in line or "ends before" in line
    # Once the mirror is right again, the pull finishes from what it kept: one ranged GET
    # (206) from the first missing byte, nginx sending only the rest.
    (short / rel).write_bytes(data)
    log_before = len(web.access_log())
    r = run_vztt("pull", TINY, "--from", web.url("mirror") + "short/", "--json", cache=host_cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    assert (host_cache / f"{TINY}.plain.tar.lz4").read_bytes() == data
    assert r.json()["resumed"] == 1, r.stdout
    gets = [re.search(r'"GET (\S+) [^"]*" (\d{3}) (\d+)', l) for l in web.access_log()[log_before:]]
    archive_gets = [(int(m[2]), int(m[3])) for m in gets if m and m[1].endswith("/short/" + rel)]
    assert archive_gets == [(206, len(data) - len(data) // 2)], archive_gets


def test_a_dropped_connection_is_resumed(tiny_mirror: Path, tmp_path: Path, keys: Keys, web: Nginx) -> None:
    served = copy_mirror(tiny_mirror, web.mirror_root / "flaky")
    proxy = CuttingProxy(web.port, cut_after=150_000)
    try:
        cache = tmp_path / "host"
        r = run_vztt("pull", TINY, "--from", proxy.url("mirror") + "flaky/", "--json", cache=cache, env=keys.env())
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    assert proxy.cuts == 1 and r.json()["resumed"] >= 1
    rel = index_of(served)["templates"][TINY]["builds"][0]["archives"]["plain"]["path"]
    assert (cache / f"{TINY}.plain.tar.lz4").read_bytes() == (served / rel).read_bytes()
    ranged = [l for l in web.access_log() if "/flaky/templates/" in l and '" 206 ' in l]
    assert ranged, web.access_log()[-5:]


def test_the_next_mirror_is_tried(tiny_mirror: Path, tmp_path: Path, keys: Keys, web: Nginx) -> None:
    dead = "http://127.0.0.1:9/nothing/"      # discard port: connection refused
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    cache = tmp_path / "host"
    r = run_vztt("pull", TINY, "--from", dead, "--from", empty, "--from", tiny_mirror, "--json", cache=cache,
                 env=keys.env())
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["mirror"] == str(tiny_mirror) and len(doc["failed_mirrors"]) == 2
    r = run_vztt("pull", TINY, "--from", dead, "--from", empty, cache=tmp_path / "other", env=keys.env())
    assert r.returncode == 5
    assert "every mirror failed" in one_line_error(r)


def test_build_offline_and_unknown_template(tiny_mirror: Path, tmp_path: Path, keys: Keys) -> None:
    cache = tmp_path / "host"
    r = run_vztt("pull", TINY, "--offline", cache=cache, env=keys.env())
    assert r.returncode == 3 and "--offline" in one_line_error(r)
    bid = index_of(tiny_mirror)["templates"][TINY]["builds"][0]["id"]
    r = run_vztt("pull", TINY, "--from", tiny_mirror, "--build", "20200101T000000Z-0123456789ab", cache=cache,
                 env=keys.env())
    assert r.returncode == 5 and bid in one_line_error(r)
    r = run_vztt("pull", TINY, "--from", tiny_mirror, "--build", bid, cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    r = run_vztt("pull", TINY, "--offline", "--json", cache=cache, env=keys.env())
    assert r.returncode == 0 and r.json()["build"] == bid
    r = run_vztt("pull", "no-such-template", "--from", tiny_mirror, cache=cache, env=keys.env())
    assert r.returncode == 5 and "no template no-such-template" in one_line_error(r)


# -- concurrency -----------------------------------------------------------------------------------

@pytest.mark.network          # the real debian-12 build (conftest's `debian12`)
@pytest.mark.slow
def test_two_pulls_at_once_leave_one_good_copy(debian12: BuiltTemplate, published: dict, keys: Keys, web: Nginx,
                                               tmp_path: Path) -> None:
    cache = tmp_path / "host"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env.update(keys.env())
    argv = [sys.executable, "-m", "vztt", "--cache-dir", str(cache), "pull", NAME, "--from", web.url("mirror"),
            "--json"]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    docs = [json.loads(o[0]) for o in outs]
    assert sorted(d["up_to_date"] for d in docs) == [False, True]      # one downloaded, the other found it
    archive = cache / f"{NAME}.plain.tar.lz4"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == debian12.manifest["archive"]["sha256"]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        f"{NAME}.manifest.json", f"{NAME}.plain.tar.lz4"]
    assert temp_files(cache) == [] and list((cache / ".downloads").iterdir()) == []


# -- pieces, without the command line -------------------------------------------------------------------

def test_index_paths_are_checked_even_when_signed() -> None:
    good = {"format": 1, "templates": {TINY: {"builds": [{
        "id": "20260101T000000Z-0123456789ab",
        "manifest": {"path": "templates/x/m.json", "sha256": "0" * 64, "size": 1},
        "archives": {"plain": {"path": "templates/x/a.tar.lz4", "sha256": "0" * 64, "size": 1, "tar_size": 10240}}}]}}}
    mirror_mod.parse_index(json.dumps(good).encode(), "index")
    for bad in ("../etc/passwd", "/etc/passwd", "templates/../../x", "http://elsewhere/x", "a//b", ""):
        doc = json.loads(json.dumps(good))
        doc["templates"][TINY]["builds"][0]["archives"]["plain"]["path"] = bad
        with pytest.raises(mirror_mod.MirrorError):
            mirror_mod.parse_index(json.dumps(doc).encode(), "index")


def test_readme_documents_the_mirror_layout() -> None:
    readme = (REPO / "README.md").read_text()
    for needle in ("index.json.asc", "vztt publish", "vztt pull", "vztt create", "--allow-untested", "| 11 |"):
        assert needle in readme, needle
