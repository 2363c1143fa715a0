"""Downloading over HTTP: the one ranged GET vztt has, with retries, backoff and resume.

Package downloads (build/fetch.py) and template pulls (mirror/pull.py) both
come through here:

- `HttpClient.ranged(url, part, size)` streams a file into its `PartFile`:
  it asks for the rest with a Range request when the part file holds a
  beginning already (from an earlier run, or before a connection broke), checks
  that a 206 starts where it asked, starts over when the server ignores Range
  (200), and retries connection trouble, 5xx and 429 with exponential backoff.
  It yields the bytes the consumer has not had yet, so a consumer that unpacks
  while downloading sees every byte exactly once.
- `HttpClient.get_bounded(url, limit)` fetches a small file whole (an index, a
  signature, a manifest), refusing one larger than `limit`.

Failures are one line. The caller chooses the error class for what the server
does wrong (`HttpClient(error=...)`: FetchError for a package repository,
MirrorError for a template mirror), as base/proc.run does for tools; bytes that
are wrong (too many, too few, a wrong digest) are always a FetchError.

`PartFile` is a download's part file: kept across runs for resuming, locked
(flock) while it grows so two processes that want the same file share one
download, hashed as it is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import requests

from vztt import __version__
from vztt.base.errors import EnvironmentProblem, FetchError, VzttError

USER_AGENT = f"vztt/{__version__}"
CHUNK = 1 << 20
MAX_BACKOFF = 10.0            # seconds between two tries, at most
# What breaks a transfer without saying anything about the file: worth another try.
CONNECTION_TROUBLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class _Transient(Exception):
    """Worth another try: a 5xx or 429, a short read, a 206 from the wrong place."""


def new_session() -> requests.Session:
    """A requests Session that says it is vztt."""
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


def status_line(url: str, r: requests.Response) -> str:
    return f"{url}: HTTP {r.status_code} {r.reason}"


def read_bounded(r: requests.Response, limit: int, where: str, error: type[VzttError]) -> bytes:
    """A streamed response's body, whole; `error` as soon as it passes `limit` bytes."""
    buf = bytearray()
    for chunk in r.iter_content(CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise error(f"{where}: larger than {limit} bytes")
    return bytes(buf)


def _why(e: BaseException) -> str:
    if isinstance(e, _Transient):
        return str(e)
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError) and "refused" in str(e).lower():
        return "connection refused"
    return f"{type(e).__name__}: {str(e)[:200]}"


def _content_range_start(value: str) -> int:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    return int(m.group(1)) if m else -1


class PartFile:
    """A download in progress: the bytes on disk, hashed as they are written, and how
    many of them the consumer has been handed (`delivered`): after a restart from byte
    0, bytes handed on already are written again but not handed on twice."""

    def __init__(self, path: Path, fh: IO[bytes]):
        self.path = path
        self.fh = fh
        self.have = os.fstat(fh.fileno()).st_size     # bytes in the file
        self.hashed = 0
        self.delivered = 0
        self.resumes = 0            # times a server resumed it (206) in this run
        self.received = 0           # bytes that arrived in this run
        self._sha = hashlib.sha256()

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path: Path, size: int) -> Iterator["PartFile"]:
        """The part file at `path`, locked while the with-block runs (another process that
        wants the same file waits, then finds it done or resumes it). A file longer than
        `size` is started afresh; an empty one is removed on the way out."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(path, "a+b")
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:        # the holder before us may have moved or removed it: then lock the new one
                if os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        with fh:
            part = cls(path, fh)
            if part.have > size:
                part.restart()
            try:
                yield part
            finally:
                fh.flush()
                if os.fstat(fh.fileno()).st_size == 0:
                    path.unlink(missing_ok=True)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def kept(self) -> Iterator[bytes]:
        """What the file holds already (an earlier run's bytes): hashed, and handed on."""
        self.fh.seek(0)
        while self.hashed < self.have:
            data = self.fh.read(min(CHUNK, self.have - self.hashed))
            if not data:
                break
            self._sha.update(data)
            self.hashed += len(data)
            self.delivered = self.hashed
            yield data
        self.fh.seek(0, os.SEEK_END)

    def restart(self) -> None:
        """Empty the file: the next bytes are byte 0 again."""
        self.fh.truncate(0)
        self.fh.seek(0)
        self._sha = hashlib.sha256()
        self.have = self.hashed = 0

    def add(self, data: bytes) -> bytes:
        """Append `data`; what of it the consumer has not had yet. A full disk is one line
        (EnvironmentProblem), not a traceback; the bytes written so far stay for a resume."""
        try:          # straight to the file (O_APPEND): no buffered bytes left to fail again at close
            view = memoryview(data)
            while view:
                view = view[os.write(self.fh.fileno(), view):]
        except OSError as e:
            error = EnvironmentProblem if e.errno in (errno.ENOSPC, errno.EDQUOT) else FetchError
            raise error(f"{self.path}: writing the download: {e.strerror}") from None
        self._sha.update(data)
        start = self.have
        self.have += len(data)
        self.hashed = self.have
        self.received += len(data)
        if self.have <= self.delivered:
            return b""
        fresh = data[max(0, self.delivered - start):]
        self.delivered = self.have
        return fresh

    def matches(self, size: int, sha256: str) -> bool:
        self.fh.flush()
        return self.have == size and os.fstat(self.fh.fileno()).st_size == size and self.sha256 == sha256

    def verify(self, size: int, sha256: str, what: str) -> None:
        """FetchError unless the file is `size` bytes with digest `sha256`; a wrong file is
        emptied (and removed when the lock is released): it is never resumed."""
        if self.matches(size, sha256):
            return
        got, digest = self.have, self.sha256
        self.restart()
        detail = (f"size {got}, expected {size}" if got != size
                  else f"sha256 mismatch (got {digest[:16]}..., expected {sha256[:16]}...)")
        raise FetchError(f"{what}: {detail} (damaged or tampered download; removed)")

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())


class HttpClient:
    """GETs with retries: `retries` more tries after the first, `backoff` * 2^n seconds
    apart (at most MAX_BACKOFF). One requests Session per thread (fetch runs several)."""

    def __init__(self, *, error: type[VzttError] = FetchError, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 30.0):
        self.error = error
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def session(self) -> requests.Session:
        """This thread's session."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = new_session()
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._local = threading.local()

    def _again_or_give_up(self, failures: int, retries: int, what: str, e: BaseException) -> None:
        if failures > retries:
            raise self.error(f"{what}: {_why(e)} (gave up after {failures} tries)") from None
        time.sleep(min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF))

    def get_bounded(self, url: str, limit: int, *, retries: int | None = None) -> bytes:
        """A small file, whole; the client's error if it is missing (any answer but 200),
        larger than `limit`, or still failing after the retries."""
        retries = self.retries if retries is None else retries
        failures = 0
        while True:
            try:
                with self.session().get(url, stream=True, timeout=self.timeout) as r:
                    if r.status_code >= 500 or r.status_code == 429:
                        raise _Transient(f"HTTP {r.status_code}")
                    if r.status_code != 200:
                        raise self.error(status_line(url, r))
                    return read_bounded(r, limit, url, self.error)
            except (*CONNECTION_TROUBLE, _Transient) as e:
                failures += 1
                self._again_or_give_up(failures, retries, url, e)

    def ranged(self, url: str, part: PartFile, size: int, *, what: str = "") -> Iterator[bytes]:
        """Bring `part` (see PartFile.kept for what it held) up to `size` bytes from `url`,
        yielding the bytes the consumer has not had yet. Errors begin with `what` (the url
        if not given). The caller checks the digest (PartFile.verify)."""
        what = what or url
        failures = 0
        while part.have < size:
            headers = {"Range": f"bytes={part.have}-"} if part.have else {}
            try:
                with self.session().get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                    if r.status_code == 206:
                        start = _content_range_start(r.headers.get("Content-Range", ""))
                        if start != part.have:
                            raise _Transient(f"the server resumed at byte {start}, not {part.have}")
                        part.resumes += 1
                    elif r.status_code == 200:
                        part.restart()          # no Range support: from the start (the consumer skips)
                    elif r.status_code == 416:
                        raise FetchError(f"{what}: the file on the server ends before byte {part.have + 1}; "
                                         f"{size} bytes were expected (truncated on the server?)")
                    elif r.status_code >= 500 or r.status_code == 429:
                        raise _Transient(f"HTTP {r.status_code}")
                    else:
                        gone = " (gone from the mirror?)" if r.status_code in (404, 410) else ""
                        raise self.error(f"{what}: HTTP {r.status_code} {r.reason}{gone}")
                    for data in r.iter_content(CHUNK):
                        if part.have + len(data) > size:
                            raise FetchError(f"{what}: the server sends more than the {size} bytes expected")
                        fresh = part.add(data)
                        if fresh:
                            yield fresh
                    if part.have < size:
                        raise _Transient(f"connection closed after {part.have} of {size} bytes")
            except (*CONNECTION_TROUBLE, _Transient) as e:
                failures += 1
                part.fh.flush()         # what arrived stays for the next try (or the next run)
                self._again_or_give_up(failures, self.retries, what, e)

    def download(self, url: str, part: PartFile, size: int, *, what: str = "") -> None:
        """ranged() for a caller that only wants the file."""
        for _ in self.ranged(url, part, size, what=what):
            pass
