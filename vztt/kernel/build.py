"""The container kernel: Debian's kernel source, our patch series and config
fragment (the checkout's kernel/), built into a cached bzImage that the VM
runtime boots templates with.

    vztt kernel check   the series applies to the current Debian source (fuzz 0),
                        and the fragment survives olddefconfig
    vztt kernel build   fetch the source package through apt, apply the series,
                        tinyconfig + fragment + olddefconfig, make bzImage, cache it
    vztt kernel info    version, digests, the fragment's options and whether each
                        one survived olddefconfig

kernel/ (VZTT_KERNEL_DIR):
  series            quilt's format: one patch per line (`name [-pN]`), # comments
  patches/          the patches, applied in series order with `patch --fuzz=0`
  container.config  the fragment merged over `make ARCH=x86_64 tinyconfig`

The kernel cache (<cache>/kernel, or VZTT_KERNEL_CACHE):
  source/linux-source-6.1_<version>_all.deb   the source package as apt fetched it
  <version>-s<series>-f<fragment>/             one build, keyed by source version and
                                               the series and fragment digests (12 hex
                                               digits each): bzImage, config, info.json,
                                               build.log
  kvm-probe.json                              whether KVM runs our kernel here (per boot)

A second `build` with the same key builds nothing. A build runs in
<cache>/.work/kernel.<pid>/ (removed at the end, or by the next run if it was
killed) and its entry appears by one rename, complete or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from vztt.store.templates import TemplateCache
from vztt.base.errors import BuildError, EnvironmentProblem, FetchError, RuntimeUnavailable
from vztt.base.paths import default_dir
from vztt.store.packages import sha256_file
from vztt.base.proc import TOOL_ENV, Log, mark_children, run
from vztt.base.progress import Progress

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"   # inside the .deb
SOURCE_TOP = SOURCE_PACKAGE                              # top directory of the tarball
ARCH = "x86_64"
FRAGMENT = "container.config"
SERIES = "series"
BUILD_TIMEOUT = 3 * 3600.0
STEP_TIMEOUT = 900.0
BUILD_FORMAT = 2             # info.json's "format": how a build is made (2: dated from the source, reproducible)
TOOLS = {"make": "make", "gcc": "build-essential", "bc": "bc", "bison": "bison", "flex": "flex",
         "patch": "patch", "xz": "xz-utils", "dpkg-deb": "dpkg", "apt-get": "apt"}
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def kernel_dir() -> Path:
    """The series, patches and fragment: VZTT_KERNEL_DIR, the checkout's kernel/, or the system's."""
    return default_dir("VZTT_KERNEL_DIR", "kernel", "/usr/share/vztt/kernel")


def kernel_cache(cache: TemplateCache) -> Path:
    return Path(os.environ.get("VZTT_KERNEL_CACHE") or cache.root / "kernel")


# --------------------------------------------------------------------------
# The series and the fragment
# --------------------------------------------------------------------------

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
    path = kdir / FRAGMENT
    if not path.is_file():
        raise BuildError(f"{path}: the config fragment is missing")
    return path


def fragment_digest(kdir: Path) -> str:
    return "sha256:" + hashlib.sha256(fragment_path(kdir).read_bytes()).hexdigest()


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


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value as written ('y', 'm', '"str"', '8'), 'n' for `is not set`."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _OPTION.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            options[m.group(1)] = "n"
    return options


@dataclass
class Option:
    name: str
    wanted: str
    got: str            # 'n' when the option is unset or invisible in .config
    needs: str = ""     # for a dropped option: what it depends on, with the values found

    @property
    def survived(self) -> bool:
        return self.wanted == self.got

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "wanted": self.wanted, "got": self.got, "survived": self.survived}
        if self.needs:
            d["needs"] = self.needs
        return d


def compare_options(fragment: dict[str, str], final: dict[str, str]) -> list[Option]:
    """Each fragment option against the configuration olddefconfig wrote."""
    return [Option(name, wanted, final.get(name, "n")) for name, wanted in fragment.items()]


def explain_dropped(tree: Path, options: list[Option], final: dict[str, str]) -> None:
    """Fill `needs` of each dropped option from the Kconfig files, read from
    the top one along `source` lines: the `if` blocks and `menu ... depends
    on` around its entry and its own `depends on` lines, each symbol with its
    value in the final configuration (SYMBOL[y])."""
    dropped = {o.name[len("CONFIG_"):]: o for o in options if not o.survived}
    if not dropped:
        return
    found: dict[str, list[str]] = {}
    for symbol, conditions in _kconfig_entries(tree, tree / "Kconfig", [], set()):
        if symbol in dropped and symbol not in found:
            found[symbol] = conditions

    def annotate(expr: str) -> str:
        # A symbol, unless it is compared (FOO=y): FOO[value].
        return re.sub(r"\b([A-Z][A-Z0-9_]+)\b(?!\s*!?=)",
                      lambda m: f"{m.group(1)}[{final.get('CONFIG_' + m.group(1), 'n')}]", expr)

    for symbol, option in dropped.items():
        conditions = found.get(symbol)
        if conditions is None:
            option.needs = "no such option in this kernel's Kconfig"
        elif not conditions:
            option.needs = "no dependency found (set by a `select`, or a choice?)"
        else:
            option.needs = "; ".join(annotate(c) for c in conditions)


def _kconfig_entries(tree: Path, path: Path, outer: list[str], seen: set[Path]) -> Iterator[tuple[str, list[str]]]:
    """(symbol, its conditions) for every config entry of a Kconfig file and
    the files it sources, in order."""
    if path in seen or not path.is_file():
        return
    seen.add(path)
    stack: list[str] = []                  # this file's `if` and `menu` conditions
    entry: tuple[str, list[str]] | None = None
    menu: list[str] | None = None          # the `depends on` of the menu being opened
    help_indent: int | None = None
    for raw in path.read_text(errors="replace").splitlines():
        indent = len(raw.expandtabs(8)) - len(raw.expandtabs(8).lstrip())
        if help_indent is not None:
            if not raw.strip() or indent > help_indent:
                continue
            help_indent = None
        line = raw.split("#", 1)[0].strip() if '"' not in raw else raw.strip()
        if not line:
            continue
        word = line.split()[0]
        if word in ("help", "---help---"):
            help_indent = indent
            continue
        if word in ("config", "menuconfig") and len(line.split()) == 2:
            if entry:
                yield entry
            entry = (line.split()[1], outer + [c for c in stack if c])
            menu = None
        elif line.startswith("depends on "):
            cond = line[len("depends on "):]
            if entry:
                entry[1].append(f"depends on {cond}")
            elif menu is not None:
                menu.append(cond)
                stack[-1] = "within menu depending on " + " && ".join(f"({c})" for c in menu)
        elif word in ("if", "menu", "choice", "endif", "endmenu", "endchoice", "source", "rsource",
                      "osource", "orsource", "comment", "mainmenu"):
            if entry:
                yield entry
                entry = None
            menu = None
            if word == "if":
                stack.append(f"within `if {line[3:].strip()}`")
            elif word in ("menu", "choice"):
                stack.append("")
                if word == "menu":
                    menu = []
            elif word in ("endif", "endmenu", "endchoice") and stack:
                stack.pop()
            elif word in ("source", "rsource", "osource", "orsource") and (m := re.search(r'"([^"]+)"', line)):
                name = m.group(1).replace("$(SRCARCH)", "x86").replace("$SRCARCH", "x86")
                base = path.parent if word.startswith(("r", "or")) else tree
                for sub in sorted(base.glob(name)) if any(c in name for c in "*?[") else [base / name]:
                    yield from _kconfig_entries(tree, sub, outer + [c for c in stack if c], seen)
    if entry:
        yield entry


# --------------------------------------------------------------------------
# The source package, through apt
# --------------------------------------------------------------------------

@dataclass
class SourcePackage:
    name: str
    version: str
    sha256: str
    size: int

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.split(':')[-1]}_all.deb"


def source_package(log: Log | None = None) -> SourcePackage:
    """apt's candidate of the kernel source package (from the host's apt lists)."""
    proc = run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE], log=log, check=False,
               what=f"apt-cache show {SOURCE_PACKAGE}", error=FetchError, timeout=120)
    fields: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if proc.returncode != 0 or "Version" not in fields:
        raise FetchError(f"{SOURCE_PACKAGE}: apt does not know the package (run `apt-get update`; it is in "
                         f"Debian 12's main and security archives): {proc.stderr.strip()[-300:]}")
    return SourcePackage(SOURCE_PACKAGE, fields["Version"], fields.get("SHA256", ""), int(fields.get("Size", "0")))


def fetch_source(source: SourcePackage, kcache: Path, log: Log | None = None) -> tuple[Path, bool]:
    """The source .deb in the kernel cache: fetched with `apt-get download`
    unless it is there already. Returns (path, whether it was downloaded).
    Other versions' .debs are removed once the new one is in place."""
    src = kcache / "source"
    src.mkdir(parents=True, exist_ok=True)
    deb = src / source.deb_name
    if deb.is_file() and (not source.sha256 or sha256_file(deb) == source.sha256):
        return deb, False
    deb.unlink(missing_ok=True)
    tmp = src / f".download.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # apt drops to the _apt user to download unless told; our cache is root's.
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{source.name}={source.version}"],
            log=log, cwd=tmp, what=f"apt-get download {source.name}={source.version}", error=FetchError,
            timeout=STEP_TIMEOUT)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise FetchError(f"apt-get download {source.name}: expected one .deb, found {len(got)}")
        if source.sha256 and (digest := sha256_file(got[0])) != source.sha256:
            raise FetchError(f"{got[0].name}: sha256 {digest} does not match apt's {source.sha256}")
        os.replace(got[0], deb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in src.glob(f"{source.name}_*.deb"):
        if old != deb:
            old.unlink(missing_ok=True)
    return deb, True


def source_date_epoch(deb: Path) -> int:
    """When the source package was made: the mtime of the kernel tarball in
    the .deb, which Debian's reproducible builds set to the changelog's date.
    The kernel's build timestamp comes from it, not from the clock."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=TOOL_ENV)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.name == SOURCE_TARBALL:
                    return int(member.mtime)
    except tarfile.TarError as e:
        raise BuildError(f"{deb}: not a readable .deb: {e}") from None
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    raise BuildError(f"{deb.name}: no {SOURCE_TARBALL} in the package")


def extract_source(deb: Path, dest: Path, log: Log | None = None) -> Path:
    """Unpack the kernel tree from the source .deb into dest; returns the tree."""
    dest.mkdir(parents=True, exist_ok=True)
    script = 'set -eo pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | tar -xJ --no-same-owner -C "$3"'
    run(["bash", "-c", script, "extract", str(deb), SOURCE_TARBALL, str(dest)], log=log,
        what=f"unpacking {deb.name}", timeout=STEP_TIMEOUT)
    tree = dest / SOURCE_TOP
    if not (tree / "Makefile").is_file():
        raise BuildError(f"{deb.name}: no kernel tree {SOURCE_TOP}/ in {SOURCE_TARBALL}")
    return tree


# --------------------------------------------------------------------------
# Applying the series, configuring
# --------------------------------------------------------------------------

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


def _make(tree: Path, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(tree), f"ARCH={ARCH}", f"-j{jobs}", *targets]


def _make_env(epoch: int | None = None) -> dict[str, str]:
    """kbuild's environment. With the source's date (source_date_epoch) the
    build is reproducible: what it would take from the clock, the user, the
    host and the build counter (.version) is fixed, and the tree's paths are
    relative (an in-tree build), so another directory gives the same bytes."""
    env = {**TOOL_ENV, "KBUILD_BUILD_USER": "vztt", "KBUILD_BUILD_HOST": "vztt", "KBUILD_BUILD_VERSION": "1"}
    if epoch is not None:
        env["KBUILD_BUILD_TIMESTAMP"] = build_timestamp(epoch)
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    return env


def build_timestamp(epoch: int) -> str:
    """`date -u` of the epoch, as kbuild writes its own (in uname -v)."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%a %b %e %H:%M:%S UTC %Y")


def configure(tree: Path, fragment: Path, log: Log | None = None) -> tuple[list[Option], dict[str, str]]:
    """tinyconfig, the fragment merged in, olddefconfig. Returns the fragment's
    options with what survived (dropped ones explained) and the whole config."""
    env = _make_env()
    run(_make(tree, "tinyconfig"), log=log, env=env, what="make tinyconfig", timeout=STEP_TIMEOUT)
    run(["bash", str(tree / "scripts/kconfig/merge_config.sh"), "-m", ".config", str(fragment.resolve())],
        log=log, env={**env, "ARCH": ARCH}, cwd=tree, what="merge_config.sh", timeout=STEP_TIMEOUT)
    run(_make(tree, "olddefconfig"), log=log, env=env, what="make olddefconfig", timeout=STEP_TIMEOUT)
    final = parse_config((tree / ".config").read_text())
    options = compare_options(parse_config(fragment.read_text()), final)
    explain_dropped(tree, options, final)
    return options, final


def dropped_message(options: list[Option]) -> str:
    return "; ".join(f"{o.name}={o.wanted} became {o.got} ({o.needs})" for o in options if not o.survived)


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------

@dataclass
class CheckReport:
    source: SourcePackage
    series_digest: str
    fragment_digest: str
    fragment: str = FRAGMENT                                 # the fragment file
    patches: list[PatchResult] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    config_checked: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.patches) and all(o.survived for o in self.options)

    def error(self) -> BuildError | None:
        bad = [p for p in self.patches if not p.ok]
        if bad:
            p = bad[0]
            return BuildError(f"{p.path}: does not apply to {self.source.name} "
                              f"{self.source.version}: " + "; ".join(p.problems))
        dropped = [o for o in self.options if not o.survived]
        if dropped:
            return BuildError(f"{self.fragment}: {len(dropped)} options did not survive olddefconfig on "
                              f"{self.source.name} {self.source.version}: {dropped_message(dropped)}")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"source": {"package": self.source.name, "version": self.source.version},
                "series_digest": self.series_digest, "fragment_digest": self.fragment_digest,
                "ok": self.ok, "patches": [p.as_dict() for p in self.patches],
                "config_checked": self.config_checked,
                "options": [o.as_dict() for o in self.options],
                "dropped": [o.name for o in self.options if not o.survived],
                "seconds": round(self.seconds, 1)}


def check(cache: TemplateCache, kdir: Path, progress: Progress, config: bool = True) -> CheckReport:
    """Apply the series to a fresh copy of the current Debian source (fuzz 0,
    in order, each patch over the previous ones); then, unless config=False,
    configure it and compare the fragment with what olddefconfig kept."""
    _require_tools()
    started = time.monotonic()
    kcache = kernel_cache(cache)
    patches = read_series(kdir)
    fragment = fragment_path(kdir)
    with _kernel_log(cache, "check") as log, _work_tree(cache) as work:
        with progress.step("source") as st:
            source = source_package(log)
            deb, fetched = fetch_source(source, kcache, log)
            st.note(f"{source.name} {source.version}" + (" (downloaded)" if fetched else " (cached)"))
        report = CheckReport(source, series_digest(kdir), fragment_digest(kdir), str(fragment))
        with progress.step("extract") as st:
            tree = extract_source(deb, work, log)
            st.note(str(deb.name))
        with progress.step("patch") as st:
            for p in patches:
                result = apply_patch(tree, p, log)
                report.patches.append(result)
                if not result.ok:
                    break
            st.note(", ".join(f"{r.name} {'ok' if r.ok else 'FAILED'}" for r in report.patches) or "empty series")
        if config and all(p.ok for p in report.patches):
            with progress.step("config") as st:
                report.options, _ = configure(tree, fragment, log)
                report.config_checked = True
                dropped = [o.name for o in report.options if not o.survived]
                st.note(f"{len(report.options)} options, "
                        + (f"DROPPED: {', '.join(dropped)}" if dropped else "all survived olddefconfig"))
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------

@dataclass
class KernelEntry:
    path: Path               # the entry directory
    info: dict[str, Any]

    @property
    def bzimage(self) -> Path:
        return self.path / "bzImage"


def entry_name(version: str, series: str, fragment: str) -> str:
    return f"{version.replace(':', '_')}-s{series.split(':')[-1][:12]}-f{fragment.split(':')[-1][:12]}"


def _entry(path: Path) -> KernelEntry | None:
    """The build at path, if complete and made the way this vztt builds
    (BUILD_FORMAT: an older entry, e.g. one stamped with the clock, is rebuilt)."""
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if not (path / "bzImage").is_file() or info.get("format") != BUILD_FORMAT:
        return None
    return KernelEntry(path, info)


def entries(kcache: Path) -> list[KernelEntry]:
    """Every complete build in the kernel cache, newest first."""
    found = [e for p in kcache.glob("*-s*-f*") if p.is_dir() and (e := _entry(p))]
    return sorted(found, key=lambda e: e.info.get("built_at", ""), reverse=True)


@dataclass
class BuildResult:
    entry: KernelEntry
    built: bool              # False: it was in the cache already
    seconds: float = 0.0


def build(cache: TemplateCache, kdir: Path, progress: Progress, jobs: int | None = None,
          allow_dropped: bool = False) -> BuildResult:
    """The kernel for the current source, series and fragment: from the cache,
    or built (fetch, extract, patch, configure, make bzImage) and cached."""
    started = time.monotonic()
    kcache = kernel_cache(cache)
    kcache.mkdir(parents=True, exist_ok=True)
    patches = read_series(kdir)
    fragment = fragment_path(kdir)
    sdigest, fdigest = series_digest(kdir), fragment_digest(kdir)
    with progress.step("source") as st:
        source = source_package()
        name = entry_name(source.version, sdigest, fdigest)
        st.note(f"{source.name} {source.version}; key {name}")
    if (entry := _entry(kcache / name)) is not None:
        progress.say(f"  cached     {entry.path}: nothing to build")
        return BuildResult(entry, built=False, seconds=time.monotonic() - started)
    _require_tools()
    jobs = jobs or os.cpu_count() or 1
    with _build_lock(kcache):
        if (entry := _entry(kcache / name)) is not None:   # built by whoever held the lock
            return BuildResult(entry, built=False, seconds=time.monotonic() - started)
        cache.clean_stale_work()
        _clean_stale_entries(kcache)
        with _kernel_log(cache, "build") as log, _work_tree(cache) as work:
            with progress.step("fetch") as st:
                deb, fetched = fetch_source(source, kcache, log)
                epoch = source_date_epoch(deb)
                st.note(f"{deb.name}" + (" downloaded through apt" if fetched else " (cached)")
                        + f", dated {build_timestamp(epoch)}")
            with progress.step("extract") as st:
                tree = extract_source(deb, work, log)
                st.note(str(tree))
            with progress.step("patch") as st:
                results = [apply_patch(tree, p, log) for p in patches]
                bad = [r for r in results if not r.ok]
                if bad:
                    raise BuildError(f"{bad[0].path}: does not apply to {source.name} "
                                     f"{source.version}: " + "; ".join(bad[0].problems)
                                     + " (`vztt kernel check` for the whole series)")
                st.note(f"{len(results)} patches applied" + (f" ({len(sum((r.notes for r in results), []))} "
                                                                 "hunks at an offset)"
                                                                 if any(r.notes for r in results) else ""))
            with progress.step("config") as st:
                options, _final = configure(tree, fragment, log)
                dropped = [o for o in options if not o.survived]
                st.note(f"{len(options)} options from {FRAGMENT}, "
                        + (f"DROPPED: {', '.join(o.name for o in dropped)}" if dropped else "all survived"))
                if dropped and not allow_dropped:
                    raise BuildError(f"{fragment}: {len(dropped)} options did not survive olddefconfig: "
                                     f"{dropped_message(dropped)} (turn on what they need in the fragment; "
                                     "--allow-dropped builds anyway)")
            with progress.step("compile") as st:
                compile_started = time.monotonic()
                run(_make(tree, "bzImage", jobs=jobs), log=log, env=_make_env(epoch), what="make bzImage",
                    timeout=BUILD_TIMEOUT)
                compile_seconds = time.monotonic() - compile_started
                release = run(["make", "-s", "-C", str(tree), f"ARCH={ARCH}", "kernelrelease"], log=log,
                              env=_make_env(epoch), what="make kernelrelease", timeout=STEP_TIMEOUT).stdout.strip()
                st.note(f"{release} with {jobs} jobs")
            with progress.step("install") as st:
                image = tree / "arch/x86/boot/bzImage"
                tmp = kcache / f".{name}.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                shutil.copy2(image, tmp / "bzImage")
                shutil.copy2(tree / ".config", tmp / "config")
                info = {
                    "format": BUILD_FORMAT,
                    "kernelrelease": release,
                    "source": {"package": source.name, "version": source.version, "sha256": source.sha256},
                    "series_digest": sdigest, "fragment_digest": fdigest,
                    "patches": [p.name for p in patches],
                    "source_date_epoch": epoch, "build_timestamp": build_timestamp(epoch),
                    "bzImage": {"size": (tmp / "bzImage").stat().st_size, "sha256": sha256_file(tmp / "bzImage")},
                    "options": [o.as_dict() for o in options],
                    "dropped": [o.name for o in dropped],
                    "jobs": jobs, "compile_seconds": round(compile_seconds, 1),
                    "build_seconds": round(time.monotonic() - started, 1),
                    "built_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                }
                (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
                if log.path:
                    shutil.copy2(log.path, tmp / "build.log")
                if (kcache / name).exists():   # an entry of an older BUILD_FORMAT: replaced
                    stale = kcache / f".{name}.tmp-stale-{os.getpid()}"
                    os.replace(kcache / name, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(tmp, kcache / name)
                st.note(str(kcache / name / "bzImage"))
    entry = _entry(kcache / name)
    assert entry is not None
    return BuildResult(entry, built=True, seconds=time.monotonic() - started)


# --------------------------------------------------------------------------
# info, and the kernel the VM runtime boots
# --------------------------------------------------------------------------

def current(cache: TemplateCache, kdir: Path) -> tuple[KernelEntry | None, dict[str, Any]]:
    """The cached build for kernel/ as it is now, and what identifies it.

    The exact key needs apt's candidate version; without apt (or once a newer
    Debian source is out but not built yet) the newest build of the same
    series and fragment is taken, and `wanted` says what a build would make."""
    sdigest, fdigest = series_digest(kdir), fragment_digest(kdir)
    wanted: dict[str, Any] = {"series_digest": sdigest, "fragment_digest": fdigest}
    kcache = kernel_cache(cache)
    try:
        source = source_package()
        wanted["source"] = {"package": source.name, "version": source.version}
        wanted["key"] = entry_name(source.version, sdigest, fdigest)
        if (entry := _entry(kcache / wanted["key"])) is not None:
            return entry, wanted
    except FetchError as e:
        wanted["source_error"] = str(e)
    for entry in entries(kcache):
        if entry.info.get("series_digest") == sdigest and entry.info.get("fragment_digest") == fdigest:
            return entry, wanted
    return None, wanted


def bzimage_version(path: Path) -> str:
    """The version string a bzImage carries uncompressed in its setup header
    (x86 boot protocol: "HdrS" at 0x202, kernel_version at 0x20E, a pointer
    512 bytes short of the string): what `uname -r` and `uname -v` will say,
    e.g. '6.1.192-vztt (vztt@vztt) #1 Mon Nov 16 10:17:40 UTC 2026'."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise BuildError(f"{path}: not a bzImage (no HdrS setup header)")
    start = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    end = head.find(b"\0", start)
    if start >= len(head) or end < 0:
        raise BuildError(f"{path}: the setup header's kernel_version points outside the setup code")
    return head[start:end].decode("ascii", "replace")


def vm_kernel(cache: TemplateCache) -> KernelEntry:
    """The kernel `vztt test --vm` boots; RuntimeUnavailable if none is built."""
    kdir = kernel_dir()
    try:
        entry, wanted = current(cache, kdir)
    except BuildError as e:
        raise RuntimeUnavailable(f"no kernel for the VM runtime: {e}") from None
    if entry is None:
        raise RuntimeUnavailable(f"no kernel built for {kdir} in {kernel_cache(cache)} "
                                 f"(series {wanted['series_digest'][7:19]}, fragment "
                                 f"{wanted['fragment_digest'][7:19]}): run `vztt kernel build` first")
    return entry


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _require_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=TOOL_ENV["PATH"]) is None})
    if missing:
        raise EnvironmentProblem(f"building the kernel needs {', '.join(missing)} "
                                 f"(apt-get install {' '.join(missing)} libelf-dev libssl-dev cpio kmod)")


@contextlib.contextmanager
def _work_tree(cache: TemplateCache) -> Iterator[Path]:
    """<cache>/.work/kernel.<pid>: removed on the way out; a killed run's by
    the next run's clean_stale_work (the name carries the pid), which also
    kills what it left running (make and the compilers carry its mark)."""
    work = cache.root / ".work" / f"kernel.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mark_children(work.name)
    try:
        yield work
    finally:
        mark_children(None)  # type: ignore[arg-type]
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _kernel_log(cache: TemplateCache, what: str) -> Iterator[Log]:
    logs = cache.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"kernel.{what}.log"
    path.unlink(missing_ok=True)
    log = Log(path)
    try:
        yield log
    finally:
        log.close()


@contextlib.contextmanager
def _build_lock(kcache: Path) -> Iterator[None]:
    """One kernel build at a time per kernel cache; a second one waits."""
    with open(kcache / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _clean_stale_entries(kcache: Path) -> None:
    """Half-installed entries of builds whose process died (held under the build lock)."""
    for tmp in kcache.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
