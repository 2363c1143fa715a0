"""Downloads and the package cache, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirrorkit import CuttingProxy  # noqa: E402
from nginx import Nginx  # noqa: E402

from vztt.base.errors import FetchError
from vztt.builder.fetch import Fetcher
from vztt.store.packages import Download
from vztt.store.packages import PackageCache


class Server:
    """Serves `files` with Range support; can fail or cut connections on demand."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()        # send half the body, then drop the connection
        self.fail_times: dict[str, int] = {}   # answer 503 this many times first
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path
                server.requests.append((path, self.headers.get("Range")))
                if server.fail_times.get(path, 0) > 0:
                    server.fail_times[path] -= 1
                    self.send_error(503)
                    return
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.cut_once:
                    server.cut_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name: str, data: bytes) -> Download:
        self.files["/" + name] = data
        return Download(label=name, url=f"{self.url}/{name}", sha256=hashlib.sha256(data).hexdigest(), size=len(data))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    s = Server()
    yield s
    s.close()


def test_parallel_fetch_then_all_cached(tmp_path: Path, server: Server) -> None:
    items = [server.add(f"p{i}.deb", os.urandom(50_000 + i)) for i in range(20)]
    f = Fetcher(PackageCache(tmp_path), jobs=6)
    paths = f.fetch_all(items)
    assert f.stats.downloaded == 20
    for d in items:
        assert hashlib.sha256(paths[d.sha256].read_bytes()).hexdigest() == d.sha256
    server.requests.clear()
    again = Fetcher(PackageCache(tmp_path))
    again.fetch_all(items)
    assert again.stats.cached == 20 and server.requests == []        # nothing downloaded twice


@pytest.fixture
def nginx(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The suite's real nginx (Debian's): its Range handling is the one mirrors have."""
    with Nginx(tmp_path / "web") as web:
        yield web


def test_resume_after_a_dropped_connection(tmp_path: Path, nginx: Nginx) -> None:
    data = os.urandom(1_000_000)
    (nginx.mirror_root / "big.deb").write_bytes(data)
    proxy = CuttingProxy(nginx.port, cut_after=300_000)        # drops the first response midway
    try:
        d = Download(label="big", url=proxy.url("mirror") + "big.deb", sha256=hashlib.sha256(data).hexdigest(),
                     size=len(data))
        f = Fetcher(PackageCache(tmp_path / "c"), backoff=0.01)
        path = f.fetch(d)
    finally:
        proxy.close()
    assert path.read_bytes() == data and proxy.cuts == 1
    assert f.stats.resumed == 1
    # nginx's own log: the whole file asked for once (200, cut), then exactly the rest (206):
    # the resumed request started at the first byte the part file lacked.
    sent = [(int(m[1]), int(m[2])) for l in nginx.access_log()
            if (m := re.search(r'"GET /mirror/big.deb [^"]*" (\d{3}) (\d+)', l))]
    assert [code for code, _ in sent] == [200, 206], sent
    kept = len(data) - sent[1][1]
    assert 0 < kept <= 300_000, sent          # what the cut let through (less the response headers)


def test_retry_on_server_errors(tmp_path: Path, server: Server) -> None:
    d = server.add("flaky.deb", b"x" * 1000)
    server.fail_times["/flaky.deb"] = 2
    assert Fetcher(PackageCache(tmp_path), backoff=0.01).fetch(d).read_bytes() == b"x" * 1000
    server.fail_times["/flaky.deb"] = 10
    with pytest.raises(FetchError, match=r"flaky.deb: http://127.0.0.1:\d+/flaky.deb: HTTP 503 \(gave up after 3 tries\)"):
        Fetcher(PackageCache(tmp_path / "other"), retries=2, backoff=0.01).fetch(d)


def test_wrong_checksum_never_enters_the_cache(tmp_path: Path, server: Server) -> None:
    good = server.add("p.deb", b"the real package")
    server.files["/p.deb"] = b"an evil package!"                     # same size, other bytes
    cache = PackageCache(tmp_path)
    with pytest.raises(FetchError, match="p.deb: .*sha256 mismatch"):
        Fetcher(cache, backoff=0.01).fetch(good)
    assert cache.lookup(good.sha256) is None
    assert not list((tmp_path / "tmp").glob("*.part"))


def test_missing_file_is_a_clear_error(tmp_path: Path, server: Server) -> None:
    d = Download(label="gone 1.0", url=f"{server.url}/gone.deb", sha256="0" * 64, size=3)
    with pytest.raises(FetchError, match=r"gone 1.0: .*/gone.deb: HTTP 404 .*gone from the mirror"):
        Fetcher(PackageCache(tmp_path)).fetch(d)


def test_corrupt_cached_file_is_dropped_and_fetched_again(tmp_path: Path, server: Server) -> None:
    d = server.add("c.deb", os.urandom(10_000))
    cache = PackageCache(tmp_path)
    path = Fetcher(cache).fetch(d)
    with open(path, "r+b") as fh:        # bit rot, or a bad disk: same size, other bytes
        fh.seek(100)
        fh.write(b"\0\1\2")
    assert cache.lookup(d.sha256, d.size) is None and not path.exists()
    path = Fetcher(cache).fetch(d)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == d.sha256


def test_file_urls(tmp_path: Path) -> None:
    src = tmp_path / "mirror" / "x.deb"
    src.parent.mkdir()
    src.write_bytes(b"local package")
    d = Download("x", f"file://{src}", hashlib.sha256(b"local package").hexdigest(), 13)
    assert Fetcher(PackageCache(tmp_path / "c")).fetch(d).read_bytes() == b"local package"
    bad = Download("y", f"file://{src}", "1" * 64, 13)
    with pytest.raises(FetchError, match="y: file://.*x.deb: sha256 mismatch"):
        Fetcher(PackageCache(tmp_path / "c")).fetch(bad)
