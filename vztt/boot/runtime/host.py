"""What both runtimes (container.py, vm.py) share: their programs on the host,
signals held during cleanup, the environment of the commands they run inside
a container or guest, and writing a file into the tree they boot."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from vztt.base.errors import RuntimeUnavailable
from vztt.base.proc import require_tool

# The environment of what runs INSIDE (Container.exec, the VM's guest agent): not a
# host tool environment (base.proc.TOOL_ENV), but what a login on the template would see.
EXEC_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "",
}


def require(name: str, package: str = "util-linux") -> str:
    """The program's path; RuntimeUnavailable naming its Debian package if it is missing."""
    return require_tool(name, package, RuntimeUnavailable)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (cleanup must finish);
    they are delivered, as usual, right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_into(root: Path, path: str, text: str, mode: int) -> None:
    """Write `path` (absolute, as the booted system sees it) below `root`, never
    through a symlink the tree has there (it could point out of the tree)."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with open(fd, "w") as f:
        f.write(text)
    os.chmod(target, mode)         # the umask may have taken bits away
