"""Faults injected into real `vztt pull` and `vztt publish` runs, loopback only.

The mirror is a signed mirror of a small synthetic template (2 MB of random bytes, so a
download takes a moment), served by the suite's nginx, with faultkit.FaultProxy in front:
connections reset (RST) mid-index and mid-archive, 500s, a slow link to kill a pull
during. Publish: killed mid-way, two at once into one directory, an index someone else
changed. A full disk: a small loop-mounted filesystem as the host's cache. Each test
checks from outside: the exit status, one error line, the host's previous template
byte-identical, no temporary file, lock, process or mount left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import one_line_error, run_vztt  # noqa: E402
from faultkit import FaultProxy, Rule, Watched, record, traces  # noqa: E402
from mirrorkit import Keys, copy_mirror, keys, snapshot, temp_files, tiny_template, web  # noqa: E402
from nginx import Nginx  # noqa: E402

__all__ = ["keys", "web"]      # module fixtures, imported

TINY = "tiny-1-x86_64"
ARCHIVE = f"{TINY}.plain.tar.lz4"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    d = tmp_path_factory.mktemp("faults-mirror")
    cache, dest = d / "publisher", d / "mirror"
    tiny_template(cache, payload=os.urandom(2_000_000))
    r = run_vztt("publish", "--to", dest, cache=cache, env=keys.env())
    assert r.returncode == 0, r.stderr
    return dest


@pytest.fixture
def served(mirror: Path, web: Nginx, request: pytest.FixtureRequest) -> Path:
    return copy_mirror(mirror, web.mirror_root / re.sub(r"\W", "-", request.node.name))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host's cache holding an older build: what a failed pull must leave as it was."""
    cache = tmp_path / "host"
    tiny_template(cache, payload=b"the old build\n", created="2025-06-01T00:00:00+00:00")
    return cache


def content(cache: Path) -> dict:
    return {k: v for k, v in snapshot(cache).items() if not k.startswith((".locks", ".downloads", ".mirrors"))}


def archive_of(served: Path) -> bytes:
    index = json.loads((served / "index.json").read_text())
    return (served / index["templates"][TINY]["builds"][0]["archives"]["plain"]["path"]).read_bytes()


def pull(cache: Path, url: str, keys: Keys, *extra: str):  # type: ignore[no-untyped-def]
    return run_vztt("pull", TINY, "--from", url, *extra, cache=cache, env=keys.env(), timeout=300)


@pytest.mark.parametrize("what,rule", [
    ("index", lambda: Rule("index.json", "reset", after=200)),
    # past vztt's 1 MiB read size: an RST drops the chunk being read, so a reset sooner restarts
    ("archive", lambda: Rule("/templates/", "reset", after=1_500_000)),
    ("archive", lambda: Rule("/templates/", "500", times=2)),
], ids=["reset-mid-index", "reset-mid-archive", "500-twice"])
def test_transient_fault_is_retried(served: Path, host: Path, keys: Keys, web: Nginx, what: str, rule) -> None:  # type: ignore[no-untyped-def]
    r_ = rule()
    proxy = FaultProxy(web.port, [r_])
    try:
        r = pull(host, proxy.url("mirror") + served.name + "/", keys, "--json")
    finally:
        proxy.close()
    assert r_.hits == r_.times, proxy.requests
    if what == "archive" and r_.action == "reset":    # resumed from the first byte it lacked
        assert [g for p, g in zip(proxy.requests, proxy.ranges) if "/templates/" in p and p.endswith(ARCHIVE)] \
            == [None, "bytes=1048576-"], list(zip(proxy.requests, proxy.ranges))
    assert r.returncode == 0, r.stderr
    assert (host / ARCHIVE).read_bytes() == archive_of(served)
    assert traces(host) == [] and temp_files(host) == []
    fault = {"reset": "connection reset", "500": "HTTP 500 x2"}[r_.action]
    resumed = r.json().get("resumed", 0)
    record(f"pull: {fault}", f"download {what}", "retried, exit 0" + (f", resumed {resumed}x" if resumed else ""))


def test_500_for_good_fails_cleanly(served: Path, host: Path, keys: Keys, web: Nginx) -> None:
    before = content(host)
    proxy = FaultProxy(web.port, [Rule("/templates/", "500", times=100)])
    try:
        r = pull(host, proxy.url("mirror") + served.name + "/", keys)
    finally:
        proxy.close()
    assert r.returncode == 5, r.stderr
    line = one_line_error(r)
    assert "HTTP 500" in line and "gave up after" in line, line
    assert content(host) == before and temp_files(host) == [] and traces(host) == []
    record("pull: HTTP 500 always", "download archive", "exit 5, one line, old template intact")


def test_other_file_same_length_is_refused(served: Path, host: Path, keys: Keys) -> None:
    data = archive_of(served)
    index = json.loads((served / "index.json").read_text())
    (served / index["templates"][TINY]["builds"][0]["archives"]["plain"]["path"]).write_bytes(os.urandom(len(data)))
    before = content(host)
    r = pull(host, str(served), keys)
    assert r.returncode == 5, r.stderr
    assert "sha256" in one_line_error(r)
    assert content(host) == before and temp_files(host) == [] and traces(host) == []
    record("pull: other bytes, right length", "download archive", "exit 5 (sha256), old template intact")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_pull_killed_mid_download(served: Path, host: Path, keys: Keys, web: Nginx, sig: int) -> None:
    before = content(host)
    slow = Rule("/templates/", "slow", times=1, delay=0.02)        # ~2.5 s for the archive
    proxy = FaultProxy(web.port, [slow])
    url = proxy.url("mirror") + served.name + "/"
    try:
        w = Watched(["--cache-dir", host, "pull", TINY, "--from", url], env=keys.env())
        w.wait_step("index")
        parts = host / ".downloads"
        while not (parts.is_dir() and any(p.stat().st_size > 100_000 for p in parts.iterdir())):
            assert w.proc.poll() is None, w.lines
            time.sleep(0.01)
        w.signal(sig)
        code = w.wait(timeout=60)
        assert "download" not in w.steps(), w.lines
        assert content(host) == before                          # the old template, as it was
        if sig == signal.SIGINT:
            assert code == 130 and len(w.errors()) == 1, w.lines
        else:
            assert code == -9
        r = pull(host, url, keys, "--json")                      # the next pull finishes the job
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    assert (host / ARCHIVE).read_bytes() == archive_of(served)
    assert traces(host) == [] and temp_files(host) == []
    assert not (host / ".downloads").exists() or list((host / ".downloads").iterdir()) == []
    resumed = r.json()["resumed"]
    record(f"{signal.Signals(sig).name} pull", "download", f"exit {code}, old template intact; next pull exit 0"
           + (f", resumed the kept part ({resumed}x 206)" if resumed else ", started afresh"))


def test_publish_killed_then_republished(tmp_path: Path, keys: Keys) -> None:
    """SIGKILL of publish while it uploads; the mirror's signed index is never torn, the next
    publish finishes."""
    src = tmp_path / "src"
    tiny_template(src, payload=os.urandom(20_000_000))               # uploading takes a moment
    dest = tmp_path / "mirror"
    tiny_template(tmp_path / "first", name="other-1-x86_64", payload=b"x")
    assert run_vztt("publish", "--to", dest, cache=tmp_path / "first", env=keys.env()).returncode == 0
    index_before = ((dest / "index.json").read_bytes(), (dest / "index.json.asc").read_bytes())
    w = Watched(["--cache-dir", src, "publish", "--to", dest], env=keys.env())
    w.wait_step("index")
    w.signal(signal.SIGKILL)
    assert w.wait(timeout=60) == -9
    landed = "upload" if "upload" not in w.steps() else "after upload"
    assert ((dest / "index.json").read_bytes(), (dest / "index.json.asc").read_bytes()) == index_before or \
        landed != "upload"
    r = run_vztt("publish", "--to", dest, cache=src, env=keys.env())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.rglob("*") if ".tmp" in p.name) == []
    host = tmp_path / "host"
    assert run_vztt("pull", TINY, "--from", dest, cache=host, env=keys.env()).returncode == 0
    assert (host / ARCHIVE).read_bytes() == (src / ARCHIVE).read_bytes()
    record("SIGKILL publish", landed, "index unchanged; next publish exit 0, pull of it exit 0")


def test_two_publishes_into_one_directory(tmp_path: Path, keys: Keys) -> None:
    a, b, dest = tmp_path / "a", tmp_path / "b", tmp_path / "mirror"
    tiny_template(a, payload=os.urandom(20_000_000))
    tiny_template(b, name="other-1-x86_64", payload=os.urandom(20_000_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env.update(keys.env())
    procs = [subprocess.Popen([sys.executable, "-m", "vztt", "--cache-dir", str(c), "publish", "--to", str(dest)],
                              cwd=Path(__file__).resolve().parent.parent.parent, env=env, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True) for c in (a, b)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 0], [0, 5]), results
    if codes == [0, 5]:
        err = next(e for c, e in results if c == 5)
        assert "another publish to this mirror is running" in err, err
    # The index is whole and signed, and names exactly what the winner(s) published.
    for (code, _), (name, cache) in zip(results, ((TINY, a), ("other-1-x86_64", b))):
        host = tmp_path / f"host-{name}"
        r = run_vztt("pull", name, "--from", dest, cache=host, env=keys.env())
        if code == 0:
            assert r.returncode == 0, r.stderr
            assert (host / f"{name}.plain.tar.lz4").read_bytes() == (cache / f"{name}.plain.tar.lz4").read_bytes()
        else:
            assert r.returncode == 5 and f"no template {name} on this mirror" in one_line_error(r), r.stderr
    index = json.loads((dest / "index.json").read_text())
    assert len(index["templates"]) == codes.count(0)
    record("two publishes, one directory", "index", "one exit 0, the other exit 5 'another publish ... running'"
           if codes == [0, 5] else "both exit 0 (one after the other)")


def test_publish_refuses_to_resign_a_changed_index(mirror: Path, tmp_path: Path, keys: Keys) -> None:
    dest = copy_mirror(mirror, tmp_path / "mirror")
    index = json.loads((dest / "index.json").read_text())
    index["templates"][TINY]["builds"][0]["boot_test"] = "passed-ish"          # someone else's edit
    (dest / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    before = snapshot(dest)
    src = tmp_path / "src"
    tiny_template(src, name="other-1-x86_64", payload=b"new\n")
    r = run_vztt("publish", "--to", dest, cache=src, env=keys.env())
    assert r.returncode == 5, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: signature error: ") and "index.json" in line, line
    assert {k: v for k, v in snapshot(dest).items() if k != ".vztt-publish.lock"} == \
        {k: v for k, v in before.items() if k != ".vztt-publish.lock"}
    record("index changed by someone else", "publish", "exit 5, not re-signed, mirror untouched")


@contextlib.contextmanager
def small_fs(tmp_path: Path, size: str) -> Iterator[Path]:
    """An ext4 of `size` on a loop device, mounted; unmounted (and the loop device gone) after."""
    img, mnt = tmp_path / "small.img", tmp_path / "small"
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        for _ in range(100):          # the autoclear loop device goes a moment after the umount
            loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
            if str(img) not in loops:
                break
            time.sleep(0.1)
        assert str(img) not in loops, loops


def test_no_room_is_refused_before_the_download(served: Path, tmp_path: Path, keys: Keys) -> None:
    with small_fs(tmp_path, "3M") as mnt:
        cache = mnt / "cache"
        tiny_template(cache, payload=b"the old build\n", created="2025-06-01T00:00:00+00:00")
        before = content(cache)
        r = pull(cache, str(served), keys)
        assert r.returncode == 7, r.stderr
        assert re.search(r"MB free, .* needs about \d+ MB", one_line_error(r)), r.stderr
        assert content(cache) == before and temp_files(cache) == [] and traces(cache) == []
    record("disk full (3 MB loop fs as cache)", "pull: space check", "exit 7, one line, nothing downloaded")


def test_disk_fills_during_the_download(served: Path, tmp_path: Path, keys: Keys, web: Nginx) -> None:
    """The space check passes; then something else fills the filesystem mid-download: ENOSPC."""
    with small_fs(tmp_path, "96M") as mnt:
        cache = mnt / "cache"
        tiny_template(cache, payload=b"the old build\n", created="2025-06-01T00:00:00+00:00")
        before = content(cache)
        proxy = FaultProxy(web.port, [Rule("/templates/", "slow", times=1, delay=0.03)])
        filler = mnt / "filler"
        try:
            w = Watched(["--cache-dir", cache, "pull", TINY, "--from", proxy.url("mirror") + served.name + "/"],
                        env=keys.env())
            parts = cache / ".downloads"
            while not (parts.is_dir() and any(p.stat().st_size > 100_000 for p in parts.iterdir())):
                assert w.proc.poll() is None, w.lines
                time.sleep(0.01)
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"], capture_output=True)
            code = w.wait(timeout=120)
        finally:
            proxy.close()
        assert code in (5, 6, 7), "\n".join(w.lines)
        assert len(w.errors()) == 1 and "No space left on device" in w.errors()[0], w.lines
        assert content(cache) == before and temp_files(cache) == [] and traces(cache) == []
        filler.unlink()
        r = pull(cache, str(served), keys)
        assert r.returncode == 0, r.stderr
        assert (cache / ARCHIVE).read_bytes() == archive_of(served)
    record("disk fills mid-download (96 MB loop fs)", "pull: download", f"exit {code}, one line naming ENOSPC, "
           "old template intact; next pull exit 0")


def test_pull_while_publish_replaces_the_index(mirror: Path, tmp_path: Path, keys: Keys) -> None:
    """Pulls in a loop while publishes replace the index (signature, then index: two renames):
    every pull succeeds with the right bytes; none sees a torn pair."""
    import threading
    dest = copy_mirror(mirror, tmp_path / "mirror")
    want = archive_of(dest)
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def pulls() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            host = tmp_path / f"host{i}"
            r = pull(host, str(dest), keys)
            ok = r.returncode == 0 and (host / ARCHIVE).read_bytes() == want
            results.append((0 if ok else (r.returncode or -1), r.stderr[-300:]))
            shutil.rmtree(host, ignore_errors=True)

    t = threading.Thread(target=pulls)
    t.start()
    try:
        for i in range(4):
            src = tmp_path / f"src{i}"
            tiny_template(src, name=f"other{i}-1-x86_64", payload=os.urandom(1000))
            r = run_vztt("publish", "--to", dest, cache=src, env=keys.env())
            assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        t.join(timeout=300)
    assert len(results) >= 3, results
    assert [r for r in results if r[0] != 0] == []
    record("pull while publish replaces the index", "index", f"{len(results)} pulls during 4 publishes: all exit 0, right bytes")
