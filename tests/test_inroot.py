"""Writing into a tree vztt did not make (base/inroot.py) and its users: links in the
tree, planted where vztt writes, removes or cleans, never lead out of it.

Each test plants links in a root tree that point at a "host" directory beside
it, holding sentinel files, then runs the real writer (inroot itself, the
build's customize step, the VM's guest files) and checks two outcomes: the
host directory is byte for byte as it was, and the write landed in the tree
where the booted system will see it (links resolved chroot-style).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vztt.base import inroot
from vztt.boot.runtime.guest import AGENT_PATH, INIT_PATH, UNIT_NAME, prepare_tree
from vztt.builder.customize import clean_root, write_files
from vztt.recipe.recipe import FileSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners and setuid bits need root")


def snapshot(d: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under d: its mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        body: bytes | str = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else b""
        out[str(p.relative_to(d))] = (st.st_mode, body)
    return out


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """What stands for the host's files: sentinels that must stay as they are."""
    h = tmp_path / "host"
    (h / "etc").mkdir(parents=True)
    (h / "etc" / "hosts").write_text("host's hosts\n")
    (h / "etc" / "machine-id").write_text("host's machine id\n")
    (h / "tmp").mkdir()
    (h / "tmp" / "keep-me").write_text("host's file\n")
    return h


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def inside(root: Path, host_path: Path) -> Path:
    """Where an absolute link to host_path leads when resolved inside root."""
    return root / str(host_path).lstrip("/")


def test_a_link_at_the_name_is_replaced_not_written_through(root: Path, host: Path) -> None:
    before = snapshot(host)
    (root / "etc" / "hosts").symlink_to(host / "etc" / "hosts")
    inroot.write_in_root(root, "/etc/hosts", b"image's hosts\n", 0o4755, 1234, 5678)
    assert snapshot(host) == before
    st = (root / "etc" / "hosts").lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4755      # setuid kept after the chown
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (root / "etc" / "hosts").read_bytes() == b"image's hosts\n"
    assert [n for n in os.listdir(root / "etc") if n != "hosts"] == []          # no temporary file left


def test_links_on_the_way_resolve_inside_the_root(root: Path, host: Path, tmp_path: Path) -> None:
    """An absolute link to a directory, a relative one that climbs with `..`, one to nothing:
    all stay in the root (what is missing is made there, as the booted system would see it)."""
    before = snapshot(host)
    nowhere = tmp_path / "nowhere"
    (root / "etc" / "dangling").symlink_to(nowhere)
    inroot.write_in_root(root, "etc/dangling/file", b"three\n")
    assert not nowhere.exists() and inside(root, nowhere / "file").read_bytes() == b"three\n"
    (root / "etc" / "absolute").symlink_to(host / "etc")
    (root / "etc" / "climbing").symlink_to("../../../../../../../../" + str(host / "tmp").lstrip("/"))
    inroot.write_in_root(root, "etc/absolute/hosts", b"one\n")
    inroot.write_in_root(root, "etc/climbing/new/deeper/file", b"two\n")
    assert snapshot(host) == before
    assert inside(root, host / "etc" / "hosts").read_bytes() == b"one\n"
    assert inside(root, host / "tmp" / "new" / "deeper" / "file").read_bytes() == b"two\n"
    assert inroot.read_in_root(root, "etc/absolute/hosts") == b"one\n"


def test_dotdot_stops_at_the_root(root: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    inroot.write_in_root(root, "../../../escaped", b"x\n")
    inroot.write_in_root(root, "etc/../../../../etc/escaped2", b"y\n")
    after = snapshot(tmp_path)
    assert set(after) - set(before) == {"root/escaped", "root/etc/escaped2"}
    with pytest.raises(inroot.UnsafePath):
        inroot.write_in_root(root, "etc/..", b"z\n")


def test_what_cannot_be_written_is_one_error(root: Path, tmp_path: Path) -> None:
    (root / "etc" / "loop1").symlink_to("loop2")
    (root / "etc" / "loop2").symlink_to("/etc/loop1")
    with pytest.raises(inroot.UnsafePath, match="too many levels of symbolic links"):
        inroot.write_in_root(root, "etc/loop1/file", b"x")
    (root / "etc" / "adir").mkdir()
    with pytest.raises(inroot.UnsafePath, match="directory is in the way"):
        inroot.write_in_root(root, "etc/adir", b"x")
    (root / "etc" / "afile").write_text("")
    with pytest.raises(inroot.UnsafePath, match="not a directory"):
        inroot.write_in_root(root, "etc/afile/x", b"x")


def test_remove_clear_list_and_stat_stay_inside(root: Path, host: Path) -> None:
    before = snapshot(host)
    (root / "var" / "lib").mkdir(parents=True)
    (root / "var" / "lib" / "dbus").symlink_to(host / "etc")
    (root / "tmp").symlink_to(host / "tmp")
    (root / "run").symlink_to("../" * 8 + str(host / "tmp").lstrip("/"))
    inroot.remove_in_root(root, "var/lib/dbus/machine-id")
    inroot.remove_in_root(root, "var/lib/dbus", recursive=True)            # the link itself goes
    inroot.clear_in_root(root, "tmp")
    inroot.clear_in_root(root, "run")
    assert inroot.list_in_root(root, "tmp") == [] and inroot.list_in_root(root, "etc") == []
    assert inroot.stat_in_root(root, "tmp/keep-me") is None
    assert snapshot(host) == before
    assert not (root / "var" / "lib" / "dbus").is_symlink() and (root / "tmp").is_symlink()
    (root / "run").unlink()
    (root / "run" / "sub").mkdir(parents=True)
    (root / "run" / "sub" / "f").write_text("")
    (root / "run" / "lock").write_text("")
    inroot.clear_in_root(root, "run", keep=("lock",))
    assert os.listdir(root / "run") == ["lock"]


def test_recipe_files_through_planted_links(root: Path, host: Path) -> None:
    """The build's files step: a setuid file under a directory link, a file over a file link."""
    before = snapshot(host)
    (root / "etc" / "tools").symlink_to(host / "etc")
    (root / "etc" / "hosts").symlink_to(host / "etc" / "hosts")
    write_files(root, (FileSpec("/etc/tools/helper", b"#!/bin/sh\n", 0o4755, 0, 0),
                       FileSpec("/etc/hosts", b"127.0.0.1 localhost\n", 0o644, 0, 0)))
    assert snapshot(host) == before
    helper = inside(root, host / "etc" / "helper")
    assert helper.read_bytes() == b"#!/bin/sh\n" and stat.S_IMODE(helper.stat().st_mode) == 0o4755
    assert not (root / "etc" / "hosts").is_symlink()


def test_cleaning_does_not_empty_a_host_directory(root: Path, host: Path) -> None:
    """clean_root empties /run and /tmp of the image: a link there leads nowhere else."""
    before = snapshot(host)
    (root / "tmp").symlink_to(host / "tmp")
    (root / "run").symlink_to("../" * 8 + str(host / "tmp").lstrip("/"))
    (root / "etc" / "machine-id").write_text("built\n")
    os.chmod(root / "etc" / "machine-id", 0o444)
    clean_root(root)
    assert snapshot(host) == before
    assert (root / "etc" / "machine-id").read_bytes() == b""
    assert stat.S_IMODE((root / "etc" / "machine-id").stat().st_mode) == 0o444


def test_vm_guest_files_stay_in_the_tree(root: Path, host: Path) -> None:
    """The VM's additions (hostname, agent, unit, init wrapper) into a tree whose /etc and
    /usr are links out of it."""
    before = snapshot(host)
    os.rmdir(root / "etc")
    (root / "etc").symlink_to(host / "etc")
    (root / "usr").symlink_to(host / "tmp")
    inside(root, host / "etc").mkdir(parents=True)
    inside(root, host / "tmp").mkdir(parents=True)
    prepare_tree(root, "guest", "2.6.32")
    assert snapshot(host) == before
    assert inside(root, host / "etc" / "hostname").read_text() == "guest\n"
    assert inside(root, host / "etc" / "systemd" / "system" / UNIT_NAME).is_file()
    for path in (AGENT_PATH, INIT_PATH):
        target = inside(root, host / "tmp") / path.removeprefix("/usr/")
        assert target.is_file() and os.access(target, os.X_OK), path
