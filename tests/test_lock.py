"""Lock files: round trip, canonical digest, diff, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from vztt.base.errors import ResolveError
from vztt.recipe.lock import Lock, LockedPackage, LockedRepository, diff


def pkg(name: str, version: str, sha: str = "a" * 64) -> LockedPackage:
    return LockedPackage(name=name, version=version, arch="amd64", size=10, sha256=sha,
                         filename=f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb", repository="main")


def lock(*packages: LockedPackage) -> Lock:
    return Lock(recipe="t", inputs_digest="sha256:x", distro="debian", release="bookworm", arch="amd64",
                source_date_epoch=1700000000,
                repositories=(LockedRepository("main", "$DEBIAN_MIRROR", "bookworm", ("main",), "f" * 64),),
                packages=packages, request=("?essential",))


def test_round_trip_and_canonical_digest(tmp_path: Path) -> None:
    a = lock(pkg("zlib1g", "1:1.2.13"), pkg("bash", "5.2.15-2+b2"))
    b = lock(pkg("bash", "5.2.15-2+b2"), pkg("zlib1g", "1:1.2.13"))
    assert a.to_json() == b.to_json() and a.digest == b.digest      # order does not matter
    path = tmp_path / "x" / "t.lock.json"
    a.write(path)
    back = Lock.read(path)
    assert back.to_json() == a.to_json()
    assert back.repositories[0].url == "$DEBIAN_MIRROR"              # mirror-independent
    assert not list(path.parent.glob(".*tmp*"))


def test_diff() -> None:
    old = lock(pkg("a", "1"), pkg("b", "1"), pkg("c", "1"))
    new = lock(pkg("a", "1"), pkg("b", "2"), pkg("d", "1"))
    d = diff(old, new)
    assert d.lines() == ["+ d 1", "- c 1", "~ b 1 -> 2"]
    assert diff(old, old).empty
    rebuilt = lock(pkg("a", "1", sha="b" * 64), pkg("b", "1"), pkg("c", "1"))
    assert [o.name for o, _ in diff(old, rebuilt).changed] == ["a"]  # same version, new bytes


@pytest.mark.parametrize("text,message", [
    ("not json", "not a valid lock file"),
    ('{"format": 99}', "lock format 99 is not 1"),
    ('{"format": 1, "recipe": "t"}', "not a valid lock file .*KeyError"),
])
def test_bad_lock(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "t.lock.json"
    p.write_text(text)
    with pytest.raises(ResolveError, match=message):
        Lock.read(p)
    with pytest.raises(ResolveError, match="no lock file; run `vztt resolve`"):
        Lock.read(tmp_path / "missing.json")
