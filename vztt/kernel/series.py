"""kernel/'s series: the patches in order (quilt's format), applying them
with `patch --fuzz=0` (a failed hunk reported with its file and @@ line), and
the config fragments (the shared one and the architecture's), and the
digests of the series and of the fragments that key a build."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vztt.base.errors import BuildError
from vztt.base.paths import default_dir
from vztt.base.proc import Log, run
from vztt.kernel import STEP_TIMEOUT

FRAGMENT = "container.config"     # shared by every architecture
ARCH_FRAGMENTS = "arch"            # arch/<uname -m>.config: what only that architecture needs
SERIES = "series"


def kernel_dir() -> Path:
    """The series, patches and fragment: VZTT_KERNEL_DIR, the checkout's kernel/, or the system's."""
    return default_dir("VZTT_KERNEL_DIR", "kernel", "/usr/share/vztt/kernel")


@dataclass
class Patch:
    name: str
    path: Path
    strip: int = 1

    def files(self) -> list[str]:
        """The files it touches, in order, as paths in the tree."""
        return list(hunk_headers(self.path.read_text(errors="replace"), self.strip))


def read_series(kdir: Path) -> list[Patch]:
    series = kdir / SERIES
    try:
        lines = series.read_text().splitlines()
    except OSError as e:
        raise BuildError(f"{series}: cannot read the series: {e.strerror}") from None
    patches = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        strip = 1
        for opt in words[1:]:
            if not re.fullmatch(r"-p\d", opt):
                raise BuildError(f"{series}:{number}: unsupported patch option {opt!r} (only -pN)")
            strip = int(opt[2:])
        path = kdir / "patches" / words[0]
        if not path.is_file():
            raise BuildError(f"{series}:{number}: {path} does not exist")
        patches.append(Patch(words[0], path, strip))
    return patches


def series_digest(kdir: Path) -> str:
    """sha256 over the series file and every patch it names, in order."""
    h = hashlib.sha256(b"series\0" + (kdir / SERIES).read_bytes())
    for p in read_series(kdir):
        h.update(b"\0" + p.name.encode() + b"\0" + p.path.read_bytes())
    return "sha256:" + h.hexdigest()


def fragment_path(kdir: Path) -> Path:
    """The shared fragment."""
    path = kdir / FRAGMENT
    if not path.is_file():
        raise BuildError(f"{path}: the config fragment is missing")
    return path


def fragment_paths(kdir: Path, arch: str) -> list[tuple[str, Path]]:
    """(name in kernel/, path) of the fragments merged for `arch` (uname -m),
    in merge order: the shared one, then arch/<arch>.config."""
    arch_path = kdir / ARCH_FRAGMENTS / f"{arch}.config"
    if not arch_path.is_file():
        raise BuildError(f"{arch_path}: the config fragment for {arch} is missing")
    return [(FRAGMENT, fragment_path(kdir)), (f"{ARCH_FRAGMENTS}/{arch}.config", arch_path)]


def fragment_digest(kdir: Path, arch: str) -> str:
    """sha256 over the fragments merged for `arch`, each with its name, in
    merge order: a change to either (or a move between them) is a new build."""
    h = hashlib.sha256(b"fragments")
    for name, path in fragment_paths(kdir, arch):
        h.update(b"\0" + name.encode() + b"\0" + path.read_bytes())
    return "sha256:" + h.hexdigest()


def fragments_digest(kdir: Path) -> str:
    """sha256 over every architecture's fragments digest (arch/*.config, in
    name order): what keys a cache holding the kernels of all of them (CI's)."""
    arches = sorted(p.stem for p in (kdir / ARCH_FRAGMENTS).glob("*.config"))
    if not arches:
        raise BuildError(f"{kdir / ARCH_FRAGMENTS}: no config fragment of any architecture")
    return "sha256:" + hashlib.sha256(" ".join(fragment_digest(kdir, a) for a in arches).encode()).hexdigest()


def hunk_headers(patch_text: str, strip: int = 1) -> dict[str, list[str]]:
    """file -> the @@ lines of its hunks, in order (hunk #1 first)."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    old_name = ""
    for line in patch_text.splitlines():
        if line.startswith("--- "):
            old_name = line[4:].split("\t")[0].strip()
        elif line.startswith("+++ "):
            name = line[4:].split("\t")[0].strip()
            if name == "/dev/null":  # a deletion: the old name is the file
                name = old_name
            name = "/".join(name.split("/")[strip:]) or name
            current = files.setdefault(name, [])
        elif line.startswith("@@ ") and current is not None:
            current.append(line.split(" @@")[0] + " @@")
    return files


@dataclass
class PatchResult:
    name: str
    files: list[str]
    path: str = ""                                          # the patch file
    ok: bool = True
    problems: list[str] = field(default_factory=list)   # what failed: file and hunk
    notes: list[str] = field(default_factory=list)      # hunks that applied at an offset

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "files": self.files, "ok": self.ok, "problems": self.problems,
                "notes": self.notes}


def apply_patch(tree: Path, patch: Patch, log: Log | None = None) -> PatchResult:
    """`patch --fuzz=0` in the tree; every failed hunk reported as file, hunk
    number, its @@ line and where patch looked for it."""
    text = patch.path.read_text(errors="replace")
    headers = hunk_headers(text, patch.strip)
    result = PatchResult(patch.name, list(headers), str(patch.path))
    proc = run(["patch", f"-p{patch.strip}", "--fuzz=0", "--forward", "--batch", "--no-backup-if-mismatch",
                "--reject-file=-", "-d", str(tree), "-i", str(patch.path.resolve())],
               log=log, check=False, what=f"patch {patch.name}", timeout=STEP_TIMEOUT)
    current = ""
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:patching|checking) file '?(.+?)'?$", line):
            current = m.group(1)
        elif m := re.match(r"^Hunk #(\d+) FAILED at (\d+)", line):
            n = int(m.group(1))
            hunks = headers.get(current, [])
            header = f" ({hunks[n - 1]})" if 0 < n <= len(hunks) else ""
            result.problems.append(f"{current}: hunk #{n}{header} FAILED at line {m.group(2)}")
        elif m := re.match(r"^Hunk #(\d+) succeeded at (\d+) (\(.*\))", line):
            result.notes.append(f"{current}: hunk #{m.group(1)} applied at line {m.group(2)} {m.group(3)}")
        elif line.startswith("Reversed (or previously applied) patch detected"):
            result.problems.append(f"{current or '?'}: already applied, or reversed")
        elif line.startswith("can't find file to patch"):
            result.problems.append("a file to patch does not exist in this source")
        elif m := re.match(r"^patch: \*\*\*+ (.*)", line):
            result.problems.append(m.group(1))
    if proc.returncode != 0 and not result.problems:
        result.problems.append(f"patch exit status {proc.returncode}: "
                               + " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:]))
    result.ok = proc.returncode == 0 and not result.problems
    return result
