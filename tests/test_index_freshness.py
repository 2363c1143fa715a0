"""A mirror's signed index must be fresh (issue #13, defect 1): an older index,
validly signed, served again (a rollback), an index past its `expires` (a
frozen mirror), and one without `expires`, are refused by `vztt pull` and
`vztt create`; the highest serial seen per mirror and key is kept in the cache.

Small hand-made templates, published with the real `vztt publish` (gpg) and
pulled through a real nginx on loopback.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import one_line_error, run_vztt
from mirrorkit import Keys, keys, sign, snapshot, temp_files, tiny_template, web
from nginx import Nginx

__all__ = ["keys", "web"]      # module fixtures, imported

TINY = "tiny-1-x86_64"


def index_of(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


def rewrite_index(root: Path, keys: Keys, change) -> None:  # type: ignore[no-untyped-def]
    """Change the index and sign it again with the publisher's key: what the key holder
    could have signed (or did sign, long ago)."""
    doc = index_of(root)
    change(doc)
    (root / "index.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    sign(keys, keys.publisher, root / "index.json")


def recorded_serials(cache: Path) -> list[dict]:
    """What the host remembers of the mirrors' indexes (the files under <cache>/.mirrors/)."""
    return [json.loads(p.read_text()) for p in sorted((cache / ".mirrors").glob("*.json"))]


def templates_of(cache: Path) -> dict:
    """The cache's templates (not its locks, serial records or partial downloads)."""
    return {k: v for k, v in snapshot(cache).items() if not k.startswith((".locks", ".downloads", ".mirrors"))}


@pytest.fixture
def twice(tmp_path: Path, keys: Keys, web: Nginx) -> dict:
    """A mirror nginx serves, published twice (serial 1, then 2, a newer build), and
    the signed index + signature of serial 1 kept aside, as an attacker would."""
    publisher = tmp_path / "publisher"
    served = web.mirror_root / tmp_path.name
    first = tiny_template(publisher, payload=b"build one\n", created="2026-01-01T00:00:00+00:00")
    r = run_vztt("publish", "--to", served, cache=publisher, env=keys.env())
    assert r.returncode == 0, r.stderr
    old = tmp_path / "old-index"
    old.mkdir()
    for f in ("index.json", "index.json.asc"):
        shutil.copy2(served / f, old / f)
    second = tiny_template(publisher, payload=b"build two\n", created="2026-02-01T00:00:00+00:00")
    r = run_vztt("publish", "--to", served, "--json", cache=publisher, env=keys.env())
    assert r.returncode == 0 and r.json()["serial"] == 2, r.stderr
    return {"served": served, "url": web.url("mirror") + tmp_path.name + "/", "old": old,
            "first": first, "second": second}


def test_a_rolled_back_index_is_refused(twice: dict, keys: Keys, tmp_path: Path) -> None:
    host = tmp_path / "host"
    r = run_vztt("pull", TINY, "--from", twice["url"], "--json", cache=host, env=keys.env())
    assert r.returncode == 0, r.stderr
    newer = r.json()["build"]
    manifest = json.loads((host / f"{TINY}.manifest.json").read_text())
    assert manifest["pulled"]["index_serial"] == 2
    assert (host / f"{TINY}.plain.tar.lz4").read_bytes() == \
        (twice["served"] / index_of(twice["served"])["templates"][TINY]["builds"][0]["archives"]["plain"]["path"]
         ).read_bytes()

    # The attack: the older, validly signed index and its signature, served again.
    for f in ("index.json", "index.json.asc"):
        shutil.copy2(twice["old"] / f, twice["served"] / f)
    assert index_of(twice["served"])["serial"] == 1
    before = templates_of(host)
    r = run_vztt("pull", TINY, "--from", twice["url"], cache=host, env=keys.env())
    assert r.returncode == 5, r.stderr
    line = one_line_error(r)
    assert "serial 1" in line and "serial 2" in line and twice["url"] in line, line
    assert templates_of(host) == before and temp_files(host) == []
    manifest = json.loads((host / f"{TINY}.manifest.json").read_text())
    assert manifest["pulled"]["index_serial"] == 2 and manifest["pulled"]["build"] == newer
    (seen,) = recorded_serials(host)
    assert seen["serial"] == 2 and seen["signer"] == keys.publisher and seen["mirror"] == twice["url"]
    # `vztt create` asks the mirror through the same check (here: the template is not cached).
    other = tmp_path / "other-host"
    shutil.copytree(host / ".mirrors", other / ".mirrors")
    r = run_vztt("create", TINY, tmp_path / "ct", "--layout", "dir", "--from", twice["url"], cache=other,
                 env=keys.env())
    assert r.returncode == 5 and "serial 1" in one_line_error(r), r.stderr
    assert not (tmp_path / "ct").exists() and not (other / f"{TINY}.manifest.json").exists()


def test_an_expired_or_undated_index_is_refused(twice: dict, keys: Keys, tmp_path: Path) -> None:
    host = tmp_path / "host"
    expires = datetime.fromisoformat(index_of(twice["served"])["expires"])
    assert timedelta(days=29) < expires - datetime.now(timezone.utc) <= timedelta(days=30)    # the default
    # A frozen mirror: an index whose validity ran out (signed by the right key).
    rewrite_index(twice["served"], keys, lambda d: d.update(expires="2026-01-02T00:00:00+00:00"))
    r = run_vztt("pull", TINY, "--from", twice["url"], cache=host, env=keys.env())
    assert r.returncode == 5, r.stderr
    line = one_line_error(r)
    assert "expired" in line and "2026-01-02" in line and twice["url"] in line, line
    assert templates_of(host) == {} and recorded_serials(host) == []
    # An index without `expires` gives no freshness guarantee: refused as well.
    rewrite_index(twice["served"], keys, lambda d: d.pop("expires"))
    r = run_vztt("pull", TINY, "--from", twice["url"], cache=host, env=keys.env())
    assert r.returncode == 5 and "no expiry" in one_line_error(r), r.stderr
    # A malformed one is a malformed index.
    rewrite_index(twice["served"], keys, lambda d: d.update(expires="next tuesday"))
    r = run_vztt("pull", TINY, "--from", twice["url"], cache=host, env=keys.env())
    assert r.returncode == 5 and "expires" in one_line_error(r), r.stderr
    assert templates_of(host) == {}


def test_publish_sets_and_refreshes_the_expiry(tmp_path: Path, keys: Keys) -> None:
    cache, dest = tmp_path / "publisher", tmp_path / "mirror"
    tiny_template(cache)
    r = run_vztt("publish", "--to", dest, "--expires", "12h", "--json", cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    left = datetime.fromisoformat(index_of(dest)["expires"]) - datetime.now(timezone.utc)
    assert timedelta(hours=11) < left <= timedelta(hours=12)
    # Nothing new and more than half the validity left: nothing written.
    r = run_vztt("publish", "--to", dest, "--expires", "20h", "--json", cache=cache, env=keys.env())
    assert r.returncode == 0 and not r.json()["index_written"] and index_of(dest)["serial"] == 1, r.stderr
    # Less than half of it left: the same index signed again, with a new serial and expiry.
    r = run_vztt("publish", "--to", dest, "--expires", "30d", "--json", cache=cache, env=keys.env())
    assert r.returncode == 0 and r.json()["index_written"], r.stderr
    index = index_of(dest)
    assert index["serial"] == 2 and r.json()["published"] == []
    assert datetime.fromisoformat(index["expires"]) - datetime.now(timezone.utc) > timedelta(days=29)
    # A mirror written by a vztt that set no expiry is signed again at the next publish.
    rewrite_index(dest, keys, lambda d: d.pop("expires"))
    r = run_vztt("publish", "--to", dest, "--json", cache=cache, env=keys.env())
    assert r.returncode == 0 and r.json()["index_written"] and "expires" in index_of(dest), r.stderr
    for bad in ("soon", "0d", "-3h", "12"):
        r = run_vztt("publish", "--to", dest, "--expires", bad, cache=cache, env=keys.env())
        assert r.returncode == 2 and "--expires" in one_line_error(r), (bad, r.stderr)
    assert index_of(dest)["serial"] == 3
