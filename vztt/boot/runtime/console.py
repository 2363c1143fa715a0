"""The container's console: a pty whose output is copied to the console log."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import BinaryIO


class ConsoleLog(threading.Thread):
    """Copies the console pty's output to a file until stopped. We keep the
    slave open too, so reads never fail between the container's opens."""

    def __init__(self, master: int, slave: int, log: BinaryIO):
        super().__init__(name="vztt-console", daemon=True)
        self.master, self.slave, self.log = master, slave, log
        self._stop_event = threading.Event()

    def run(self) -> None:
        # Signals for the main thread only: see host.signals_deferred.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        pending = b""
        with self.log as log:
            while True:
                stopping = self._stop_event.is_set()
                try:
                    ready = select.select([self.master], [], [], 0 if stopping else 0.2)[0]
                    data = os.read(self.master, 65536) if ready else b""
                except OSError:  # EIO if no slave is open (we keep one: should not happen)
                    data = b""
                    time.sleep(0 if stopping else 0.05)
                if not data:
                    if stopping:
                        log.write(pending)
                        return
                    continue
                # Lines end in \r\n on a tty; keep a trailing \r for the next read.
                data = pending + data
                pending = b"\r" if data.endswith(b"\r") else b""
                log.write(data[:len(data) - len(pending)].replace(b"\r\n", b"\n"))
                log.flush()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        os.close(self.master)
        os.close(self.slave)


def start_console(path: Path) -> ConsoleLog:
    """A new pty whose output goes to `path` (replaced), being copied from now on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "wb")
    master, slave = os.openpty()
    console = ConsoleLog(master, slave, log)
    console.start()
    return console
