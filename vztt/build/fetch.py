"""Parallel, verified downloads into the package cache.

Several connections (a requests Session per worker thread), retries with
exponential backoff on connection errors and 5xx answers, resume of a
partial download with a Range request, and a sha256 check before a file
enters the cache. A part file is locked while it grows, so two builds that
want the same package share one download instead of corrupting it.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import requests

from vztt import __version__
from vztt.base.errors import FetchError
from vztt.store.packages import CHUNK, PackageCache

USER_AGENT = f"vztt/{__version__}"


@dataclass(frozen=True)
class Download:
    label: str       # what the user knows it as (package name and version)
    url: str
    sha256: str
    size: int


@dataclass
class FetchStats:
    cached: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    resumed: int = 0


class _Transient(Exception):
    """Worth another try: connection trouble, a 5xx, a short read."""


class Fetcher:
    def __init__(self, cache: PackageCache, jobs: int = 8, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 30.0):
        self.cache = cache
        self.jobs = jobs
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self.stats = FetchStats()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = USER_AGENT
            self._local.session = s
        return s

    def fetch_all(self, items: list[Download], on_done: Callable[[Download], None] | None = None) -> dict[str, Path]:
        """sha256 -> cached path for every item; the first failure stops the rest."""
        unique = list({d.sha256: d for d in items}.values())
        results: dict[str, Path] = {}
        stop = threading.Event()

        def one(d: Download) -> None:
            if stop.is_set():
                return
            results[d.sha256] = self.fetch(d)
            if on_done:
                on_done(d)

        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(one, d) for d in unique]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    stop.set()
                    for other in futures:
                        other.cancel()
                    raise f.exception()  # type: ignore[misc]
        return results

    def fetch(self, d: Download) -> Path:
        hit = self.cache.lookup(d.sha256, d.size)
        if hit is not None:
            with self._stats_lock:
                self.stats.cached += 1
            return hit
        url = urlparse(d.url)
        if url.scheme == "file":
            return self._fetch_file(d, Path(unquote(url.path)))
        part = self.cache.partial(d.sha256)
        with open(part, "ab") as lockfh:
            fcntl.flock(lockfh, fcntl.LOCK_EX)   # another build may be fetching the same file
            hit = self.cache.lookup(d.sha256, d.size)
            if hit is not None:
                return hit
            for attempt in range(self.retries + 1):
                try:
                    path = self._download(d, part)
                    with self._stats_lock:
                        self.stats.downloaded += 1
                    return path
                except _Transient as e:
                    if attempt == self.retries:
                        raise FetchError(f"{d.label}: {d.url}: {e} (gave up after {self.retries + 1} tries)") from None
                    time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _fetch_file(self, d: Download, source: Path) -> Path:
        if not source.is_file():
            raise FetchError(f"{d.label}: {d.url}: no such file (gone from the mirror?)")
        path = self.cache.add_copy(d.sha256, source)
        if path is None:
            raise FetchError(f"{d.label}: {d.url}: sha256 mismatch (the repository does not match its index)")
        with self._stats_lock:
            self.stats.downloaded += 1
            self.stats.bytes_downloaded += d.size
        return path

    def _download(self, d: Download, part: Path) -> Path:
        have = part.stat().st_size
        if have > d.size:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._session().get(d.url, headers=headers, stream=True, timeout=self.timeout) as r:
                if r.status_code == 416 and have == d.size:
                    pass  # we have it all already; verify below
                elif r.status_code >= 500 or r.status_code == 429:
                    raise _Transient(f"HTTP {r.status_code}")
                elif r.status_code not in (200, 206):
                    raise FetchError(f"{d.label}: {d.url}: HTTP {r.status_code} {r.reason} (gone from the mirror?)")
                else:
                    mode = "ab" if r.status_code == 206 else "wb"
                    if r.status_code == 206:
                        with self._stats_lock:
                            self.stats.resumed += 1
                    with open(part, mode) as out:
                        for chunk in r.iter_content(CHUNK):
                            out.write(chunk)
                            with self._stats_lock:
                                self.stats.bytes_downloaded += len(chunk)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise _Transient(type(e).__name__) from None
        size = part.stat().st_size
        if size < d.size:
            raise _Transient(f"short read ({size} of {d.size} bytes)")
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        if size != d.size or h.hexdigest() != d.sha256:
            part.unlink()
            if have:
                raise _Transient("sha256 mismatch after resuming; starting over")
            raise FetchError(f"{d.label}: {d.url}: sha256 mismatch (expected {d.sha256[:16]}..., got {h.hexdigest()[:16]}...)")
        return self.cache.add(d.sha256, part)
