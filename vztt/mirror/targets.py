"""Where a publish writes: a mirror directory, or a WebDAV location.

Both put every file under a temporary name first and only then give it its
name (a rename in a directory, a MOVE over WebDAV), so the index never names a
file that is missing or half written; an upload is hashed on the way and
refused if the cached file no longer matches its manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import quote, urlparse

import requests

from vztt.base.files import atomic_file, atomic_write, temp_name, writer_pid
from vztt.base.http import CHUNK, new_session, read_bounded, status_line
from vztt.mirror.config import is_http, local_path
from vztt.mirror.index import MirrorError


class _HashingReader:
    """A file read for an upload, hashed on the way; `len()` gives requests its Content-Length."""

    def __init__(self, fh: IO[bytes], size: int):
        self.fh, self.size, self.sha = fh, size, hashlib.sha256()
        self.read_bytes = 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.sha.update(data)
        self.read_bytes += len(data)
        return data


def _check_upload(src: Path, got_sha: str, got_size: int, sha256: str, size: int) -> None:
    if got_size != size or got_sha != sha256:
        raise MirrorError(f"{src}: the cached file does not match its manifest (sha256 {got_sha[:16]}..., "
                          f"expected {sha256[:16]}...); rebuild or pull it again before publishing")


class DirTarget:
    """A mirror directory: written through base.files (temporary name + rename, fsync'ed);
    one publisher at a time (flock)."""

    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".vztt-publish.lock", "a+")
        except OSError as e:
            raise MirrorError(f"{self.root}: cannot write to the mirror: {e.strerror}") from None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise MirrorError(f"{self.root}: another publish to this mirror is running") from None
            self._remove_stale_temps()
            yield

    def _remove_stale_temps(self) -> None:
        """Temporary files a killed publish left (`.<name>.tmp-<random>-<pid>`): with the lock
        held no other publish is writing, and no index names them. Links are not followed."""
        for top, dirs, names in os.walk(self.root, followlinks=False):
            for name in names:
                path = Path(top) / name
                if writer_pid(path) is not None and path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)

    def read(self, rel: str, limit: int) -> bytes | None:
        try:
            with open(self.root / rel, "rb") as fh:
                data = fh.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        if len(data) > limit:
            raise MirrorError(f"{self.root / rel}: larger than {limit} bytes")
        return data

    def _final(self, rel: str) -> Path:
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return final

    def put_file(self, rel: str, src: Path, sha256: str, size: int) -> None:
        final = self._final(rel)
        try:
            with open(src, "rb") as fin, atomic_file(final) as fout:
                h, n = hashlib.sha256(), 0
                while data := fin.read(CHUNK):
                    h.update(data)
                    n += len(data)
                    fout.write(data)
                _check_upload(src, h.hexdigest(), n, sha256, size)      # before the rename: no bad file named
        except OSError as e:
            raise MirrorError(f"{final}: cannot write: {e.strerror}") from None

    def put_bytes(self, rel: str, data: bytes) -> None:
        final = self._final(rel)
        try:
            atomic_write(final, data)
        except OSError as e:
            raise MirrorError(f"{final}: cannot write: {e.strerror}") from None

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def delete_dir(self, rel: str) -> None:
        """Remove a build directory once it holds nothing the index names (what is left is ours)."""
        d = self.root / rel
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file():
                    p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()          # the template's directory, when its last build went


class DavTarget:
    """A WebDAV location: PUT to a temporary path, MOVE into place, DELETE.

    Credentials: VZTT_PUBLISH_USER and VZTT_PUBLISH_PASSWORD, else netrc
    (requests reads ~/.netrc or $NETRC), else none."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.base = url.rstrip("/") + "/"
        self.label = self.base
        self.timeout = timeout
        self.session = new_session()
        user = os.environ.get("VZTT_PUBLISH_USER")
        if user:
            self.session.auth = (user, os.environ.get("VZTT_PUBLISH_PASSWORD", ""))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield           # WebDAV LOCK is not something every server has: one publisher at a time, by convention

    def url(self, rel: str) -> str:
        return self.base + quote(rel)

    def _request(self, method: str, rel: str, ok: tuple[int, ...], **kw: Any) -> requests.Response:
        url = kw.pop("url", None) or self.url(rel)
        try:
            r = self.session.request(method, url, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise MirrorError(f"{method} {url}: {type(e).__name__}: {str(e)[:200]}") from None
        if r.status_code not in ok:
            hint = ""
            if r.status_code in (401, 403):
                hint = (f" (credentials: VZTT_PUBLISH_USER/VZTT_PUBLISH_PASSWORD or a netrc entry for "
                        f"{urlparse(url).hostname})")
            elif r.status_code == 405 and method != "GET":
                hint = " (does this location accept WebDAV?)"
            raise MirrorError(f"{method} {status_line(url, r)}{hint}")
        return r

    def read(self, rel: str, limit: int) -> bytes | None:
        with self._request("GET", rel, (200, 404), stream=True) as r:
            if r.status_code == 404:
                return None
            return read_bounded(r, limit, self.url(rel), MirrorError)

    def _mkcols(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self._request("MKCOL", "/".join(parts[:i]) + "/", (201, 301, 405, 409))

    def _move_into_place(self, tmp_rel: str, rel: str) -> None:
        self._request("MOVE", tmp_rel, (201, 204), headers={"Destination": self.url(rel), "Overwrite": "T"})

    def _forget(self, tmp_rel: str) -> None:
        with contextlib.suppress(MirrorError):
            self._request("DELETE", tmp_rel, (200, 204, 404))

    def put_file(self, rel: str, src: Path, sha256: str, size: int) -> None:
        self._mkcols(rel)
        tmp = temp_name(Path(rel)).as_posix()
        with self._forgotten_unless_moved(tmp):
            with open(src, "rb") as fh:
                body = _HashingReader(fh, os.fstat(fh.fileno()).st_size)
                self._request("PUT", tmp, (200, 201, 204), data=body)
            _check_upload(src, body.sha.hexdigest(), body.read_bytes, sha256, size)
            self._move_into_place(tmp, rel)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._mkcols(rel)
        tmp = temp_name(Path(rel)).as_posix()
        with self._forgotten_unless_moved(tmp):
            self._request("PUT", tmp, (200, 201, 204), data=data)
            self._move_into_place(tmp, rel)

    @contextlib.contextmanager
    def _forgotten_unless_moved(self, tmp_rel: str) -> Iterator[None]:
        """A temporary upload is deleted when anything stops it short of its MOVE: a bad
        checksum, an HTTP error, Ctrl-C or SIGTERM (a cancelled CI job) included."""
        try:
            yield
        except BaseException:
            self._forget(tmp_rel)
            raise

    def delete(self, rel: str) -> None:
        self._request("DELETE", rel, (200, 204, 404))

    def delete_dir(self, rel: str) -> None:
        self._request("DELETE", rel.rstrip("/") + "/", (200, 204, 404), headers={"Depth": "infinity"})


Target = DirTarget | DavTarget


def target_for(location: str) -> Target:
    return DavTarget(location) if is_http(location) else DirTarget(local_path(location))
