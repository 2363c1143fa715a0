"""The shipped layered template debian-12-x86_64-nginx, built for real from
Debian's mirror on the session's cached debian-12-x86_64-minimal, and its
boot test fetching the page over loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import BuiltTemplate, leftovers, run_vztt
from minidist import read_archive

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="vztt build needs root"), pytest.mark.network]

NGINX = "debian-12-x86_64-nginx"


@pytest.mark.network
def test_nginx_layer_on_the_cached_debian12(debian12: BuiltTemplate, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # The session's base, as promoted (hard links: nothing here writes to them).
    for f in (f"{debian12.name}.manifest.json", f"{debian12.name}.plain.tar.lz4"):
        os.link(debian12.cache / f, cache / f)
    r = run_vztt("build", NGINX, "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    doc = r.json()
    checks = {c["name"]: c for c in doc["boot_test"]["checks"]}
    assert doc["boot_test"]["result"] == "passed"
    # the page, fetched over loopback inside the booted template; the base's own checks ran too
    assert checks["smoke:nginx-page"]["result"] == "passed"
    assert {"smoke:os-release", "smoke:apt-works", "loopback", "package-db"} <= set(checks)

    base = debian12.manifest
    lock = json.loads((cache / "locks" / f"{NGINX}.lock.json").read_text())
    assert lock["base"] == {"name": debian12.name, "build_id": base["build_id"], "lock_digest": base["lock_digest"],
                            "archive_sha256": base["archive"]["sha256"]}
    names = {p["name"] for p in lock["packages"]}
    assert "nginx" in names and not names & {p["name"] for p in base["packages"]}, names
    a = read_archive(cache / f"{NGINX}.plain.tar.lz4", ("./var/www/html/index.html",))
    assert "served by vztt's nginx template" in a.text("./var/www/html/index.html")
    assert "./usr/sbin/nginx" in a.members and "./etc/systemd/system/multi-user.target.wants/nginx.service" in a.members
    assert leftovers(cache) == []
