"""Reproducibility: the same lock built in another environment, and what differs when it does.

`elsewhere(argv)` runs `python -m vztt ARGV` five years later (faketime, every child
included), with umask 077, the C locale, another time zone, another host name (its own
UTS namespace). `explain(a, b)` names what differs between two files: for tar archives
the members, and diffoscope's report when it is installed.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import lz4.frame

from conftest import PACKAGE_CACHE, REPO

YEARS_LATER = "+1826d"
ELSEWHERE = {"LC_ALL": "C", "LANG": "C", "TZ": "Pacific/Kiritimati"}
HOSTNAME = "repro-elsewhere.invalid"


def elsewhere(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("VZTT_", "LC_", "LANG", "TZ"))}
    full.update(VZTT_PACKAGE_CACHE=str(PACKAGE_CACHE), **ELSEWHERE, **(env or {}))
    script = f'umask 077 && hostname {HOSTNAME} && exec faketime -f {YEARS_LATER} "$@"'
    return subprocess.run(["unshare", "--uts", "sh", "-c", script, "sh", sys.executable, "-m", "vztt", *argv],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def members(path: Path) -> dict[str, tuple]:
    """name -> (type, mode, uid, gid, mtime, size, link, sha256) of a tar archive's members."""
    raw = path.read_bytes()
    if path.name.endswith(".lz4"):
        raw = lz4.frame.decompress(raw)
    elif path.name.endswith(".xz"):
        raw = lzma.decompress(raw)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isfile() else b""     # type: ignore[union-attr]
            out[m.name] = (m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname,
                           hashlib.sha256(data).hexdigest()[:16])
    return out


def explain(a: Path, b: Path) -> str:
    lines = [f"{a.name}: {sha256(a)[:16]} != {sha256(b)[:16]}"]
    if ".tar" in a.name:
        ma, mb = members(a), members(b)
        for name in sorted(set(ma) | set(mb)):
            if ma.get(name) != mb.get(name):
                lines.append(f"  {name}: {ma.get(name)} != {mb.get(name)}")
    if shutil.which("diffoscope"):
        lines.append(subprocess.run(["diffoscope", "--text", "-", str(a), str(b)], capture_output=True,
                                    text=True).stdout[-20000:])
    return "\n".join(lines[:200])
