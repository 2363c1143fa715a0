"""The real thing: debian-12-x86_64-minimal from Debian's mirror, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BuiltTemplate, leftovers, one_line_error, run_vztt
from vztt.builder.customize import path_in_root

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def tree(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive unpacked with the real tools, as a container host would."""
    root = tmp_path_factory.mktemp("debian12-tree")
    subprocess.run(f"lz4 -dc {debian12.archive} | tar -x --numeric-owner -p --xattrs --xattrs-include='*' -C {root}",
                   shell=True, check=True)
    return root


def test_archive_has_a_working_system(tree: Path) -> None:
    for path in ("/usr/bin/apt", "/usr/bin/dpkg", "/sbin/init", "/bin/sh", "/usr/sbin/sshd", "/usr/bin/vim.tiny",
                 "/sbin/ip", "/etc/network/interfaces"):
        assert os.path.lexists(path_in_root(tree, path)), path
    assert os.readlink(tree / "bin") == "usr/bin"                       # merged /usr
    assert os.path.realpath(path_in_root(tree, "/sbin/init")).endswith("/lib/systemd/systemd")


def test_every_locked_package_is_installed(debian12: BuiltTemplate, tree: Path) -> None:
    out = subprocess.run(["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W",
                          "-f=${db:Status-Abbrev}|${Package}|${Version}\n"],
                         capture_output=True, text=True, check=True).stdout
    status = {name: (state.strip(), version) for state, name, version in (l.split("|") for l in out.splitlines())}
    locked = {p["name"]: p["version"] for p in debian12.lock["packages"]}
    assert len(locked) > 100
    assert set(status) == set(locked)
    for name, version in locked.items():
        assert status[name] == ("ii", version), name
    for required in ("systemd-sysv", "iproute2", "ifupdown", "openssh-server", "ca-certificates", "less",
                     "vim-tiny", "apt", "usr-is-merged"):
        assert required in locked
    assert "usrmerge" not in locked                                    # usr-is-merged was chosen
    assert debian12.manifest["package_count"] == len(locked)


def test_dpkg_audit_is_clean(tree: Path) -> None:
    proc = subprocess.run(["chroot", str(tree), "dpkg", "--audit"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_build_leftovers_are_cleaned(tree: Path) -> None:
    assert (tree / "etc/machine-id").read_text() == ""
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))            # each container makes its own
    assert (tree / "etc/systemd/system/multi-user.target.wants/vztt-ssh-keygen.service").is_symlink()
    assert not (tree / "usr/sbin/policy-rc.d").exists()
    assert not (tree / "etc/dpkg/dpkg.cfg.d/zz-vztt-build").exists()
    assert not (tree / "var/log/dpkg.log").exists()
    assert not (tree / "var/cache/ldconfig/aux-cache").exists()
    assert [p.name for p in (tree / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert not list((tree / "var/cache/apt").glob("*.bin"))
    assert not list((tree / "var/cache/apt/archives").glob("*.deb"))
    assert list((tree / "tmp").iterdir()) == [] and list((tree / "run").iterdir()) == []
    assert not (tree / "etc/resolv.conf").exists() and not (tree / "etc/hostname").exists()
    sources = (tree / "etc/apt/sources.list").read_text()
    assert " bookworm main" in sources and " bookworm-security main" in sources


def test_manifest_and_lock_agree_with_the_bytes(debian12: BuiltTemplate) -> None:
    m = debian12.manifest
    assert m["archive"]["sha256"] == hashlib.sha256(debian12.archive.read_bytes()).hexdigest()
    assert m["archive"]["size"] == debian12.archive.stat().st_size
    lock_file = debian12.cache / "locks" / f"{debian12.name}.lock.json"
    assert m["lock_digest"] == "sha256:" + hashlib.sha256(lock_file.read_bytes()).hexdigest()
    assert m["source_date_epoch"] == debian12.lock["source_date_epoch"]
    for p in debian12.lock["packages"]:
        assert len(p["sha256"]) == 64 and p["size"] > 0 and p["filename"].startswith("pool/")
        assert p["repository"] in ("main", "updates", "security")
    assert {r["url"] for r in debian12.lock["repositories"]} == {"$DEBIAN_MIRROR", "$DEBIAN_SECURITY_MIRROR"}
    assert set(m["steps"]) >= {"resolve", "fetch", "install", "pack"}
    assert leftovers(debian12.cache) == []


def test_locked_rebuild_downloads_nothing_and_gives_the_same_bytes(debian12: BuiltTemplate) -> None:
    before = hashlib.sha256(debian12.archive.read_bytes()).hexdigest()
    r = run_vztt("build", debian12.name, "--locked", cache=debian12.cache)
    assert r.returncode == 0, r.stderr
    fetch_line = next(l for l in r.stderr.splitlines() if l.strip().startswith("fetch"))
    assert " 0 fetched" in fetch_line, fetch_line
    assert hashlib.sha256(debian12.archive.read_bytes()).hexdigest() == before   # same lock, same bytes
    assert not list(debian12.cache.glob("*-old"))
    assert leftovers(debian12.cache) == []
    listed = run_vztt("list", "--json", cache=debian12.cache).json()
    row = next(x for x in listed if x["name"] == debian12.name)
    assert row["cached"] and row["current"] and row["created"]


def test_stale_lock_is_refused(debian12: BuiltTemplate, tmp_path: Path) -> None:
    lock = json.loads((debian12.cache / "locks" / f"{debian12.name}.lock.json").read_text())
    lock["inputs_digest"] = "sha256:" + "0" * 64
    path = tmp_path / "stale.lock.json"
    path.write_text(json.dumps(lock))
    r = run_vztt("build", debian12.name, "--locked", "--lock", path, cache=debian12.cache)
    assert r.returncode == 4
    assert "made from other package settings of recipe" in one_line_error(r)


def test_interrupted_build_leaves_nothing_and_keeps_the_template(debian12: BuiltTemplate) -> None:
    """SIGTERM in the middle of install: cleaned up, exit 130, the cached template untouched."""
    import signal
    import sys
    import time
    from conftest import PACKAGE_CACHE, REPO
    before = hashlib.sha256(debian12.archive.read_bytes()).hexdigest()
    env = {**os.environ, "VZTT_PACKAGE_CACHE": str(PACKAGE_CACHE)}
    proc = subprocess.Popen([sys.executable, "-m", "vztt", "--cache-dir", str(debian12.cache), "build", debian12.name,
                             "--locked"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    # The image is mounted in the build's private mount namespace, invisible from here:
    # follow the progress lines instead, and strike while packages are being installed.
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip().startswith("fetch"):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "install" in err and "FAILED" in err                 # it was stopped mid-install
    assert hashlib.sha256(debian12.archive.read_bytes()).hexdigest() == before
    assert leftovers(debian12.cache) == []
