"""The licenses a Debian package states: its machine-readable copyright file
(DEP-5), `/usr/share/doc/<package>/copyright` in the image.

Read from a tree vztt built but that packages' scripts wrote into, so through
base.inroot (no symlink followed out of it). A package whose doc directory is
a symlink to a sibling's (libstdc++6 -> gcc-12-base, as Debian allows for
packages of one source) is read through that sibling. A copyright file that
is not machine-readable states nothing we can read: no licenses.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

from debian.copyright import Copyright, Error as CopyrightError

from vztt.base.inroot import read_in_root

DOC = "usr/share/doc"
_SIBLING = re.compile(r"[a-z0-9][a-z0-9+.-]*")       # a package name: a link we may follow


def _copyright_text(root: Path, package: str) -> bytes | None:
    data = read_in_root(root, f"{DOC}/{package}/copyright")
    if data is not None:
        return data
    try:
        target = os.readlink(root / DOC / package)
    except OSError:
        return None
    if _SIBLING.fullmatch(target) and target != package:
        return read_in_root(root, f"{DOC}/{target}/copyright")
    return None


def declared_licenses(root: Path, package: str) -> tuple[str, ...]:
    """The distinct `License:` short names of the Files paragraphs, in file order."""
    data = _copyright_text(root, package)
    if data is None or not data.startswith(b"Format:"):
        return ()
    quiet = logging.getLogger("debian.copyright")
    level = quiet.level
    quiet.setLevel(logging.ERROR)        # "Fixing Format URL" is not the user's business
    try:
        parsed = Copyright(io.StringIO(data.decode("utf-8", "replace")), strict=False)
    except (CopyrightError, ValueError):
        return ()
    finally:
        quiet.setLevel(level)
    names: list[str] = []
    for paragraph in parsed.all_files_paragraphs():
        name = paragraph.license.synopsis.strip() if paragraph.license else ""
        if name and name not in names:
            names.append(name)
    return tuple(names)
