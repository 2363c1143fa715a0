"""Parallel, verified downloads into the package cache.

Several connections (base.http: a requests Session per worker thread, retries
with exponential backoff on connection errors and 5xx answers, resume of a
partial download with a Range request), and a sha256 check before a file
enters the cache. A part file is locked while it grows, so two builds that
want the same package share one download instead of corrupting it.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from vztt.base.errors import FetchError
from vztt.base.http import HttpClient, PartFile
from vztt.store.packages import Download, PackageCache


@dataclass
class FetchStats:
    cached: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    resumed: int = 0


class Fetcher:
    def __init__(self, cache: PackageCache, jobs: int = 8, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 30.0):
        self.cache = cache
        self.jobs = jobs
        self.http = HttpClient(error=FetchError, retries=retries, backoff=backoff, timeout=timeout)
        self._stats_lock = threading.Lock()
        self.stats = FetchStats()

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
        with PartFile.locked(self.cache.partial(d.sha256), d.size) as part:
            hit = self.cache.lookup(d.sha256, d.size)     # another build fetched it while we waited
            if hit is not None:
                return hit
            what = f"{d.label}: {d.url}"
            for _ in part.kept():                          # what an earlier run left, hashed
                pass
            pieced = part.have > 0
            self.http.download(d.url, part, d.size, what=what)
            if (pieced or part.resumes) and not part.matches(d.size, d.sha256):
                # Pieces that do not fit together (the file changed between them): once more, whole.
                part.restart()
                self.http.download(d.url, part, d.size, what=what)
            part.verify(d.size, d.sha256, what)
            path = self.cache.add(d.sha256, part.path)
            with self._stats_lock:
                self.stats.downloaded += 1
                self.stats.bytes_downloaded += part.received
                self.stats.resumed += part.resumes
            return path

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
