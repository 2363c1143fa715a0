"""The mirror's pages for browsers (issue 20): `vztt publish` writes index.html
and a page per template; nginx serves them and headless Chromium renders
them. The tests read the DOM Chromium built (not our HTML as we wrote it) and
keep screenshots under build/test-artifacts/.

Builds are made by hand (small archives, manifests with package lists and
boot-test times), three publishes in a row, so that a template has several
builds to chart and compare.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import lz4.frame
import pytest
import requests

from chromium import Dom, png_size, render
from conftest import REPO, run_vztt
from mirrorkit import Keys, install_template, keys, small_tree, tar_bytes, web
from nginx import Nginx
from sbomcheck import problems

__all__ = ["keys", "web"]

ARTIFACTS = REPO / "build" / "test-artifacts"
DEBIAN, UBUNTU, ROCKY = "debian-12-x86_64-minimal", "ubuntu-24.04-x86_64-minimal", "rockylinux-9-x86_64-minimal"

DEB_PACKAGES = {"apt": "2.6.1", "base-files": "12.4+deb12u8", "bash": "5.2.15-2+b7", "coreutils": "9.1-1",
                "dpkg": "1.21.22", "iproute2": "6.1.0-3", "less": "590-2.1~deb12u2", "libc6": "2.36-9+deb12u9",
                "libssl3": "3.0.15-1~deb12u1", "openssh-server": "1:9.2p1-2+deb12u3", "systemd": "252.33-1~deb12u1",
                "systemd-sysv": "252.33-1~deb12u1", "vim-tiny": "2:9.0.1378-2", "zlib1g": "1:1.2.13.dfsg-1"}
RPM_PACKAGES = {"bash": "5.1.8-9.el9", "glibc": "2.34-100.el9_4.2", "openssh-server": "8.7p1-38.el9", "rpm": "4.16.1.3-29.el9",
                "systemd": "252-32.el9_4", "dnf": "4.14.0-9.el9"}

# Three nightly builds: what changes from one to the next.
ROUNDS = [
    {"created": "2026-11-20T02:17:00+00:00", "payload": 300_000, "boot": (0.61, 1.31), "changes": {}},
    {"created": "2026-11-21T02:17:00+00:00", "payload": 340_000, "boot": (0.55, 1.18),
     "changes": {"curl": "7.88.1-10+deb12u8", "libssl3": "3.0.15-1~deb12u2"}},
    {"created": "2026-11-22T02:17:00+00:00", "payload": 330_000, "boot": (0.57, 1.24),
     "changes": {"vim-tiny": None, "openssh-server": "1:9.2p1-2+deb12u4"}},
]


def _packages(base: dict[str, str], upto: int) -> dict[str, str]:
    """The Debian package set after `upto` rounds of changes (the rpm one does not change)."""
    packages = dict(base)
    for r in ROUNDS[1:upto + 1] if base is DEB_PACKAGES else []:
        for name, version in r["changes"].items():
            packages.pop(name) if version is None else packages.__setitem__(name, version)
    return packages


def make_build(cache: Path, name: str, n: int, distro: tuple[str, str, str], base: dict[str, str],
               boot: str = "passed") -> None:
    """A hand-made build of `name` (round n) in the cache: plain and ploop archives, a full manifest."""
    r = ROUNDS[n]
    seed = random.Random(f"{name}-{n}")
    raw = tar_bytes(small_tree(seed.randbytes(r["payload"])))
    archive = lz4.frame.compress(raw)
    sha = hashlib.sha256(archive).hexdigest()
    stamp = r["created"][:10].replace("-", "") + "T021700Z"
    manifest = install_template(cache, name, archive, tar_size=len(raw), boot_test=boot, created=r["created"],
                                build_id=f"{stamp}-{sha[:8]}")
    ploop = seed.randbytes(r["payload"] + 40_000)
    (cache / f"{name}.plain.ploopv2.tar.lz4").write_bytes(ploop)
    manifest["archives"]["ploop"] = {"file": f"{name}.plain.ploopv2.tar.lz4", "format": "ploop",
                                     "sha256": hashlib.sha256(ploop).hexdigest(), "size": len(ploop)}
    manifest["formats"] = ["plain", "ploop"]
    arch = "amd64" if distro[0] in ("debian", "ubuntu") else "x86_64"
    packages = _packages(base, n)
    manifest["packages"] = [{"name": p, "arch": arch, "version": v, "source": p, "licenses": ["GPL-2+"],
                             "sha256": hashlib.sha256(f"{p}{v}".encode()).hexdigest()}
                            for p, v in sorted(packages.items())]
    manifest["package_count"] = len(packages)
    manifest["distro"], manifest["release"], manifest["version"] = distro
    manifest["vztt_version"] = "0.1.0"
    if boot == "passed":
        manifest["boot_test"] = {"result": "passed", "boot_seconds": r["boot"][0], "ready_seconds": r["boot"][1],
                                 "seconds": r["boot"][1] + 0.9, "checks": []}
    (cache / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, keys: Keys, web: Nginx) -> dict:
    """Three rounds of builds, each published to the directory nginx serves; the index after the last."""
    cache = tmp_path_factory.mktemp("browse-cache")
    for n in range(len(ROUNDS)):
        make_build(cache, DEBIAN, n, ("debian", "bookworm", "12"), DEB_PACKAGES)
        make_build(cache, UBUNTU, n, ("ubuntu", "noble", "24.04"), DEB_PACKAGES)
        make_build(cache, ROCKY, n, ("rockylinux", "9", "9"), RPM_PACKAGES, boot="skipped")
        r = run_vztt("publish", "--to", web.mirror_root, "--url", web.url("mirror"), "--allow-untested",
                     "--keep", "0", cache=cache, env=keys.env())
        assert r.returncode == 0, r.stderr
    return json.loads((web.mirror_root / "index.json").read_text())


def test_front_page(mirror: dict, web: Nginx) -> None:
    shot = ARTIFACTS / "mirror-front.png"
    dom = Dom(render(web.url("mirror") + "index.html", shot))
    assert png_size(shot) == (1280, 900) and shot.stat().st_size > 20_000
    rows = {r.attrs["data-template"]: r for r in dom.find("tr") if "data-template" in r.attrs}
    assert sorted(rows) == sorted([DEBIAN, UBUNTU, ROCKY])
    newest = mirror["templates"][DEBIAN]["builds"][0]
    row = rows[DEBIAN]
    assert row.cell("build") == newest["id"] and row.cell("date") == "2026-11-22 02:17 UTC"
    sizes = row.cell("sizes")
    for fmt in ("plain", "ploop"):
        assert f"{fmt} {newest['archives'][fmt]['size'] / 1e3:.0f} kB" in sizes, sizes
    assert row.cell("packages") == str(newest["package_count"]) == "14"
    assert row.cell("boot") == "passed boot 0.57 s, checks done 1.24 s, test 2.14 s"
    assert row.cell("command") == f"vztt create {DEBIAN} /vz/private/101 --from {web.url('mirror')}"
    assert rows[ROCKY].cell("boot") == "skipped"
    links = {a.attrs["href"] for a in dom.find("a")}
    assert f"templates/{DEBIAN}/" in links and newest["archives"]["plain"]["path"] in links


def test_template_page(mirror: dict, web: Nginx) -> None:
    shot = ARTIFACTS / "mirror-template.png"
    dom = Dom(render(web.url("mirror") + f"templates/{DEBIAN}/", shot))
    assert png_size(shot) == (1280, 900)
    builds = mirror["templates"][DEBIAN]["builds"]
    assert [r.attrs["data-build"] for r in dom.find("tr") if "data-build" in r.attrs] == [b["id"] for b in builds]
    charts = dom.find("figure", class_="chart")
    assert [c.attrs["class"] for c in charts] == ["chart size", "chart packages", "chart boot"]
    for chart in charts:                   # one point per build, joined by a line
        svg = [e for e in chart.children if e.tag == "svg"]
        assert len(svg) == 1
        assert [e.tag for e in svg[0].children].count("circle") == 3 and any(e.tag == "polyline" for e in svg[0].children)
    points = [" ".join(t.text.split()) for t in dom.find("title") if ":" in t.text]
    assert f"{builds[0]['id']}: 14" in points and f"{builds[2]['id']}: 1.31 s" in points
    changes = [" ".join(li.text.split()) for li in dom.find("li")]
    assert "+ curl 7.88.1-10+deb12u8" in changes
    assert "~ libssl3 3.0.15-1~deb12u1 → 3.0.15-1~deb12u2" in changes
    assert "- vim-tiny 2:9.0.1378-2" in changes
    assert "~ openssh-server 1:9.2p1-2+deb12u3 → 1:9.2p1-2+deb12u4" in changes


def test_pages_link_only_to_the_mirror(mirror: dict, web: Nginx, tmp_path: Path) -> None:
    """No script and no asset from elsewhere; every link resolves on the mirror to the bytes the index names."""
    pages = [web.mirror_root / "index.html", *sorted((web.mirror_root / "templates").glob("*/index.html"))]
    assert len(pages) == 4
    for page in pages:
        html = page.read_text()
        assert "<script" not in html and " src=" not in html
        assert all(not h.startswith(("http:", "https:", "//")) for h in _hrefs(html)), page
    newest = mirror["templates"][DEBIAN]["builds"][0]
    for kind, rec in newest["sbom"].items():
        got = requests.get(web.url("mirror") + rec["path"], timeout=30)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == rec["sha256"]
        path = tmp_path / Path(rec["path"]).name
        path.write_bytes(got.content)
        assert problems(path) == [], kind
    rocky = mirror["templates"][ROCKY]["builds"][0]["sbom"]["cyclonedx"]
    purls = [c["purl"] for c in requests.get(web.url("mirror") + rocky["path"], timeout=30).json()["components"]]
    assert "pkg:rpm/rocky/bash@5.1.8-9.el9?arch=x86_64&distro=rocky-9" in purls


def _hrefs(html: str) -> list[str]:
    return [e.attrs["href"] for e in Dom(html).find("a")]
