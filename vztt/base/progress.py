"""Step timings for people: one line per pipeline step on stderr.

On a terminal a step shows while it runs and is rewritten with its time when
it ends; elsewhere (CI logs) only the finished line is printed. `quiet`
(used with --json) prints nothing: the JSON document carries the timings.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, TextIO


@dataclass
class Step:
    name: str
    detail: str = ""

    def note(self, detail: str) -> None:
        self.detail = detail


@dataclass
class Progress:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    quiet: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tty(self) -> bool:
        return not self.quiet and self.stream.isatty()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        step = Step(name)
        if self.tty:
            print(f"  {name:<10} ...", end="", file=self.stream, flush=True)
        start = time.monotonic()
        ok = False
        try:
            yield step
            ok = True
        finally:
            took = time.monotonic() - start
            self.timings[name] = round(took, 3)
            mark = "ok" if ok else "FAILED"
            line = f"  {name:<10} {took:6.1f}s  {mark}  {step.detail}".rstrip()
            if self.tty:
                print("\r" + line + "\033[K", file=self.stream, flush=True)
            elif not self.quiet:
                print(line, file=self.stream, flush=True)
