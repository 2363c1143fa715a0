"""Unpacking archives nobody vouches for: `.tar.lz4` through a guard in front of GNU tar.

    chunks -> sha256 -> lz4 -d (a process) -> TarGuard -> tar -x (a process)

GNU tar does the extraction (owners, modes, xattrs, ACLs, hard links: what a
root filesystem needs and Python's tarfile cannot restore), but it only ever
sees what passed the guard (formats/targuard.py). A member that fails stops
the stream before tar sees its header; the caller removes the half-made
destination. Editing such a tree afterwards goes through base/inroot.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from vztt.base.errors import EnvironmentProblem
from vztt.base.proc import DEVNULL, PIPE, Popen, kill_tree, spawn, tool_env
from vztt.formats.targuard import GuardStats, Limits, TarGuard, UnsafeArchive

__all__ = ["CHUNK", "ExtractResult", "GuardStats", "Limits", "TarGuard", "UnsafeArchive", "extract_lz4",
           "file_chunks", "scan_lz4"]

CHUNK = 1 << 20


TAR_EXTRACT = ["tar", "--extract", "--file=-", "--numeric-owner", "--same-owner", "--same-permissions",
               "--xattrs", "--xattrs-include=*", "--acls", "--no-overwrite-dir", "--no-unquote",
               "--warning=no-unknown-keyword"]
# tar and lz4 run with the tool environment in the C locale: names pass through as bytes.
TAR_ENV = tool_env(LC_ALL="C")


@dataclass
class ExtractResult:
    sha256: str           # of the compressed input
    size: int             # compressed bytes read
    stats: GuardStats


def _big_pipe(fh: IO[Any]) -> None:
    """1 MiB pipe buffers: tar, lz4 and we run side by side instead of taking turns."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fh.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)


def _last_line(data: bytes, status: int) -> str:
    lines = [l for l in data.decode(errors="replace").strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else f"exit status {status}"


def extract_lz4(chunks: Iterable[bytes], dest: Path | None, limits: Limits, *, what: str = "archive",
                hash_input: bool = True) -> ExtractResult:
    """Unpack a .tar.lz4 arriving as `chunks` into the existing directory `dest`
    (None: no tar, the guard's verdict only; see scan_lz4).

        chunks -> sha256 -> lz4 -d (a process) -> TarGuard -> tar -x (a process)

    The input's sha256 (unless `hash_input` is false: the source checks it) and
    size are returned: the caller compares them with what it expected, and
    removes `dest` on any failure. UnsafeArchive for a
    hostile, damaged or truncated archive: tar never saw the offending member.
    """
    digest = hashlib.sha256()
    size = 0
    guard = TarGuard(limits)
    procs: list[Popen[bytes]] = []
    errors: dict[str, bytes] = {}
    feeder_error: list[BaseException] = []
    threads: list[threading.Thread] = []

    def drain(name: str, stream) -> None:  # type: ignore[no-untyped-def]
        errors[name] = stream.read()

    def feed(stdin) -> None:  # type: ignore[no-untyped-def]
        nonlocal size
        try:
            for chunk in chunks:
                if hash_input:
                    digest.update(chunk)
                size += len(chunk)
                stdin.write(chunk)
        except BrokenPipeError:
            pass                                   # lz4 stopped reading: we say why below
        except BaseException as e:                 # the source failed (network, disk)
            feeder_error.append(e)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    ok = False
    try:
        lz4 = spawn(["lz4", "-dc"], what=what, error=EnvironmentProblem, env=TAR_ENV, stdin=PIPE)
        procs.append(lz4)
        assert lz4.stdin and lz4.stdout and lz4.stderr
        threads = [threading.Thread(target=feed, args=(lz4.stdin,), daemon=True),
                   threading.Thread(target=drain, args=("lz4", lz4.stderr), daemon=True)]
        tar = None
        if dest is not None:
            tar = spawn(TAR_EXTRACT + [f"--directory={dest}"], what=what, error=EnvironmentProblem, env=TAR_ENV,
                        stdin=PIPE, stdout=DEVNULL)
            procs.append(tar)
            assert tar.stdin and tar.stderr
            _big_pipe(tar.stdin)
            threads.append(threading.Thread(target=drain, args=("tar", tar.stderr), daemon=True))
        for fh in (lz4.stdin, lz4.stdout):
            _big_pipe(fh)
        for t in threads:
            t.start()
        try:
            buf = bytearray(CHUNK)                     # reused: no fresh megabyte per read
            view = memoryview(buf)
            while n := lz4.stdout.readinto1(buf):
                passed = guard.feed(view[:n])
                if tar is None or tar.stdin.closed:        # scanning only, or past the end of the tar
                    continue
                _write_all(tar.stdin.fileno(), passed)    # writev only: the buffered file stays empty
                if guard.ended and not tar.stdin.closed:
                    tar.stdin.close()      # tar finishes while the rest (padding) is read and the input checked
            threads[0].join()
            if feeder_error:
                raise feeder_error[0]
            if lz4.wait() != 0:
                threads[1].join()
                raise UnsafeArchive(f"not a valid lz4 stream ({_last_line(errors.get('lz4', b''), lz4.returncode)})")
            guard.finish()
            if tar is not None and not tar.stdin.closed:
                tar.stdin.close()
        except UnsafeArchive as e:
            e.message = f"{what}: {e.message}"
            raise
        except BrokenPipeError:
            pass                                       # tar died: its own message below
        status = tar.wait() if tar is not None else 0
        threads[-1].join()
        if status != 0:
            raise UnsafeArchive(f"{what}: tar failed: {_last_line(errors.get('tar', b''), status)}")
        ok = True
    finally:
        for proc in procs:
            if not ok:      # also unblocks the feeder: nobody reads lz4's output any more
                kill_tree(proc)
            for fh in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    if fh is not None:
                        fh.close()
            proc.wait()
        for t in threads:
            t.join(timeout=10)
    return ExtractResult(sha256=digest.hexdigest() if hash_input else "", size=size, stats=guard.stats)


def scan_lz4(chunks: Iterable[bytes], limits: Limits, *, what: str = "archive") -> ExtractResult:
    """Read a .tar.lz4 through the guard without unpacking it: UnsafeArchive for what
    extract_lz4 would refuse (`vztt pull` checks an archive so before it enters the cache)."""
    return extract_lz4(chunks, None, limits, what=what)


def _write_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """writev, in batches the kernel takes (IOV_MAX), after short writes too."""
    while pieces:
        batch = pieces[:512]
        n = os.writev(fd, batch)
        total = sum(len(p) for p in batch)
        if n == total:
            pieces = pieces[512:]
            continue
        rest: list[bytes | memoryview] = []
        for p in batch:                    # a short write: resume where it stopped
            if n >= len(p):
                n -= len(p)
                continue
            rest.append(memoryview(p)[n:])
            n = 0
        pieces = rest + pieces[512:]


def file_chunks(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """A file's contents in pieces. Opened now, not at the first piece: a file
    renamed over `path` meanwhile (a newer template promoted) does not get mixed in."""
    fh = open(path, "rb")

    def pieces() -> Iterator[bytes]:
        with fh:
            while data := fh.read(chunk):
                yield data
    return pieces()
