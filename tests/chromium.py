"""Headless Chromium (Debian's `chromium`) for the tests: load a page, give back
the DOM as the browser built it and a screenshot, in one run.

A fresh profile per run (removed after), no sandbox (we are root), no GPU, no
network but the page's own (no QUIC, no background or component updates),
a fixed window: the screenshot is the same bytes for the same page. Chromium
runs in a session of its own and is killed with all its helpers at the time
bound.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900", "--hide-scrollbars", "--log-level=3"]


def render(url: str, screenshot: Path, timeout: float = 90) -> str:
    """The DOM of `url` after loading (Chromium's --dump-dom), and its screenshot written to `screenshot`."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="vztt-chromium-")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                             f"--screenshot={screenshot}", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not render {url} within {timeout} s")
    finally:
        _reap(proc.pid)
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0 and screenshot.is_file(), f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


def _reap(session: int) -> None:
    """Chromium's helpers (zygote, renderer) are in its session: none may outlive it."""
    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        pass


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""
    children: list["Element"] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def cell(self, css_class: str) -> str:
        """The text of the child with this class (a table row's cell), whitespace collapsed."""
        found = [c for c in self.children if css_class in c.classes]
        assert len(found) == 1, f"{css_class}: {len(found)} cells in {self.attrs}"
        return " ".join(found[0].text.split())


class Dom(HTMLParser):
    """The elements of a DOM dump, each with its attributes and all the text inside it."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "circle", "rect", "polyline"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if self._open:
            self._open[-1].children.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if self._open and self._open[-1].tag == tag:
            self._open.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def find(self, tag: str, **attrs: str) -> list[Element]:
        """Elements of `tag` whose attributes include `attrs` (class_: one of its classes)."""
        out = []
        for e in self.elements:
            if e.tag != tag:
                continue
            if "class_" in attrs and attrs["class_"] not in e.classes:
                continue
            if all(e.attrs.get(k) == v for k, v in attrs.items() if k != "class_"):
                out.append(e)
        return out
