"""What both runtimes (container.py, vm.py) share: their programs on the host,
signals held during cleanup, and the environment of the commands they run inside
a container or guest. (Files they write into the tree they boot go through
base/inroot.py.)"""

from __future__ import annotations

import contextlib
import signal
import threading
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

