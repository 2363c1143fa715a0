"""Waiting for a flock: the cache's locks (a template being built, the shared package cache)."""

from __future__ import annotations

import errno
import fcntl
import time
from typing import IO, Any, Callable

from vztt.base.errors import VzttError

POLL = 0.2          # seconds between attempts


def wait_for_flock(fh: IO[Any], *, exclusive: bool, timeout: float, busy: Callable[[], VzttError],
                   on_wait: Callable[[], None] | None = None) -> None:
    """flock `fh`, trying again every POLL seconds for up to `timeout` seconds (0: once);
    then raise what `busy()` says (it names who holds the lock). `on_wait` is called
    once, as soon as the lock turns out to be held (to say whom we wait for)."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise busy() from None
            if on_wait is not None and not told:
                on_wait()
                told = True
            time.sleep(POLL)
