"""`vztt kernel check|build|info` and the kernel the VM runtime boots: the
kernel cache's entries (see vztt/kernel/__init__.py for the layout)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from vztt.base.errors import BuildError, EnvironmentProblem, FetchError, RuntimeUnavailable, VzttError
from vztt.base.files import atomic_dir, writer_pid
from vztt.base.proc import Log, mark_children, run, which
from vztt.base.progress import Progress
from vztt.kernel.kconfig import (Option, Target, build_timestamp, configure, dropped_message, make_command,
                                 make_env, target as kernel_target)
from vztt.kernel.series import (PatchResult, apply_patch, fragment_digest, fragment_paths, kernel_dir, read_series,
                                series_digest)
from vztt.kernel.source import SourcePackage, extract_source, fetch_source, source_date_epoch, source_package
from vztt.kernel import STEP_TIMEOUT
from vztt.store.packages import sha256_file
from vztt.store.templates import TemplateCache, pid_alive

BUILD_TIMEOUT = 3 * 3600.0
BUILD_FORMAT = 3             # info.json's "format": how a build is made (2: dated from the source, reproducible;
                             # 3: per architecture, `arch` and `image` in info.json)
KVM_PROBE = "kvm-probe.json"  # in the kernel cache: whether KVM runs our kernel here (boot.runtime.accel)
TOOLS = {"make": "make", "gcc": "build-essential", "bc": "bc", "bison": "bison", "flex": "flex",
         "patch": "patch", "xz": "xz-utils", "dpkg-deb": "dpkg", "apt-get": "apt"}


def dropped_error(fragments: list[tuple[str, Path]], options: list[Option], where: str, hint: str = "") -> BuildError:
    """One line naming the fragment file(s) that set the dropped options, and each option with why."""
    dropped = [o for o in options if not o.survived]
    paths = dict(fragments)
    files = [str(paths.get(o.fragment, o.fragment)) for o in dropped]
    named = ", ".join(dict.fromkeys(files)) or str(fragments[0][1])
    return BuildError(f"{named}: {len(dropped)} options did not survive olddefconfig {where}: "
                      f"{dropped_message(dropped)}{hint}")


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------

@dataclass
class CheckReport:
    source: SourcePackage
    series_digest: str
    fragment_digest: str
    target: Target
    fragments: list[tuple[str, Path]] = field(default_factory=list)   # (name in kernel/, path), merge order
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
        if any(not o.survived for o in self.options):
            return dropped_error(self.fragments, self.options,
                                 f"on {self.source.name} {self.source.version} for {self.target.arch}")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.target.arch, "fragments": [str(p) for _, p in self.fragments],
                "source": {"package": self.source.name, "version": self.source.version},
                "series_digest": self.series_digest, "fragment_digest": self.fragment_digest,
                "ok": self.ok, "patches": [p.as_dict() for p in self.patches],
                "config_checked": self.config_checked,
                "options": [o.as_dict() for o in self.options],
                "dropped": [o.name for o in self.options if not o.survived],
                "seconds": round(self.seconds, 1)}


def check(cache: TemplateCache, kdir: Path, progress: Progress, config: bool = True,
          arch: str | None = None) -> CheckReport:
    """Apply the series to a fresh copy of the current Debian source (fuzz 0,
    in order, each patch over the previous ones); then, unless config=False,
    configure it for `arch` (the host's by default) and compare the fragments
    with what olddefconfig kept."""
    target = kernel_target(arch)
    _require_tools(target)
    started = time.monotonic()
    kcache = cache.kernel_dir
    patches = read_series(kdir)
    fragments = fragment_paths(kdir, target.arch)
    with _kernel_log(cache, "check") as log, _work_tree(cache) as work:
        with progress.step("source") as st:
            source = source_package(log)
            deb, fetched = fetch_source(source, kcache, log)
            st.note(f"{source.name} {source.version}" + (" (downloaded)" if fetched else " (cached)"))
        report = CheckReport(source, series_digest(kdir), fragment_digest(kdir, target.arch), target, fragments)
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
                report.options, _ = configure(tree, fragments, target, log)
                report.config_checked = True
                dropped = [o.name for o in report.options if not o.survived]
                st.note(f"{len(report.options)} options for {target.arch}, "
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
    def arch(self) -> str:
        return str(self.info["arch"])

    @property
    def image(self) -> Path:
        """The kernel qemu boots: bzImage (x86_64), Image (aarch64)."""
        return self.path / str(self.info["image"]["file"])


def entry_name(version: str, arch: str, series: str, fragment: str) -> str:
    return (f"{version.replace(':', '_')}-{arch}-s{series.split(':')[-1][:12]}"
            f"-f{fragment.split(':')[-1][:12]}")


def _entry(path: Path) -> KernelEntry | None:
    """The build at path, if complete and made the way this vztt builds
    (BUILD_FORMAT: an older entry, e.g. one stamped with the clock, is rebuilt)."""
    try:
        info = json.loads((path / "info.json").read_text())
        if info.get("format") != BUILD_FORMAT or not (path / info["image"]["file"]).is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return KernelEntry(path, info)


def entries(kcache: Path, arch: str | None = None) -> list[KernelEntry]:
    """Every complete build in the kernel cache (of `arch` only, if given), newest first."""
    found = [e for p in kcache.glob("*-s*-f*") if p.is_dir() and (e := _entry(p))
             and (arch is None or e.info.get("arch") == arch)]
    return sorted(found, key=lambda e: e.info.get("built_at", ""), reverse=True)


@dataclass
class BuildResult:
    entry: KernelEntry
    built: bool              # False: it was in the cache already
    seconds: float = 0.0


def build(cache: TemplateCache, kdir: Path, progress: Progress, jobs: int | None = None,
          allow_dropped: bool = False, arch: str | None = None) -> BuildResult:
    """The kernel for `arch` (the host's by default) from the current source,
    series and fragments: from the cache, or built (fetch, extract, patch,
    configure, make bzImage or Image; cross-compiled for another architecture)
    and cached."""
    started = time.monotonic()
    target = kernel_target(arch)
    kcache = cache.kernel_dir
    kcache.mkdir(parents=True, exist_ok=True)
    patches = read_series(kdir)
    fragments = fragment_paths(kdir, target.arch)
    sdigest, fdigest = series_digest(kdir), fragment_digest(kdir, target.arch)
    with progress.step("source") as st:
        source = source_package()
        name = entry_name(source.version, target.arch, sdigest, fdigest)
        st.note(f"{source.name} {source.version}; key {name}")
    if (entry := _entry(kcache / name)) is not None:
        progress.say(f"  cached     {entry.path}: nothing to build")
        return BuildResult(entry, built=False, seconds=time.monotonic() - started)
    _require_tools(target)
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
                options, _final = configure(tree, fragments, target, log)
                dropped = [o for o in options if not o.survived]
                st.note(f"{len(options)} options from {', '.join(n for n, _ in fragments)}, "
                        + (f"DROPPED: {', '.join(o.name for o in dropped)}" if dropped else "all survived"))
                if dropped and not allow_dropped:
                    raise dropped_error(fragments, options, f"for {target.arch}",
                                        " (turn on what they need in the fragment; --allow-dropped builds anyway)")
            with progress.step("compile") as st:
                compile_started = time.monotonic()
                run(make_command(tree, target, target.image, jobs=jobs), log=log, env=make_env(epoch),
                    what=f"make {target.image}", timeout=BUILD_TIMEOUT)
                compile_seconds = time.monotonic() - compile_started
                release = run(["make", "-s", *make_command(tree, target, "kernelrelease")[1:]], log=log,
                              env=make_env(epoch), what="make kernelrelease", timeout=STEP_TIMEOUT).stdout.strip()
                st.note(f"{release} for {target.arch} with {jobs} jobs"
                        + (f" (CROSS_COMPILE={target.cross_prefix()})" if target.cross_prefix() else ""))
            with progress.step("install") as st:
                image = tree / target.image_path
                # An entry of an older BUILD_FORMAT under the same name is replaced.
                with atomic_dir(kcache / name) as tmp:
                    shutil.copy2(image, tmp / target.image)
                    shutil.copy2(tree / ".config", tmp / "config")
                    info = {
                        "format": BUILD_FORMAT,
                        "arch": target.arch,
                        "cross_compile": target.cross_prefix(),
                        "fragments": [n for n, _ in fragments],
                        "kernelrelease": release,
                        "source": {"package": source.name, "version": source.version, "sha256": source.sha256},
                        "series_digest": sdigest, "fragment_digest": fdigest,
                        "patches": [p.name for p in patches],
                        "source_date_epoch": epoch, "build_timestamp": build_timestamp(epoch),
                        "image": {"file": target.image, "size": (tmp / target.image).stat().st_size,
                                  "sha256": sha256_file(tmp / target.image)},
                        "options": [o.as_dict() for o in options],
                        "dropped": [o.name for o in dropped],
                        "jobs": jobs, "compile_seconds": round(compile_seconds, 1),
                        "build_seconds": round(time.monotonic() - started, 1),
                        "built_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    }
                    (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
                    if log.path:
                        shutil.copy2(log.path, tmp / "build.log")
                st.note(str(kcache / name / target.image))
    entry = _entry(kcache / name)
    assert entry is not None
    return BuildResult(entry, built=True, seconds=time.monotonic() - started)


# --------------------------------------------------------------------------
# info, and the kernel the VM runtime boots
# --------------------------------------------------------------------------

def current(cache: TemplateCache, kdir: Path, arch: str | None = None) -> tuple[KernelEntry | None, dict[str, Any]]:
    """The cached build for kernel/ as it is now, for `arch` (the host's by
    default), and what identifies it.

    The exact key needs apt's candidate version; without apt (or once a newer
    Debian source is out but not built yet) the newest build of the same
    architecture, series and fragments is taken, and `wanted` says what a
    build would make."""
    target = kernel_target(arch)
    sdigest, fdigest = series_digest(kdir), fragment_digest(kdir, target.arch)
    wanted: dict[str, Any] = {"arch": target.arch, "series_digest": sdigest, "fragment_digest": fdigest}
    kcache = cache.kernel_dir
    try:
        source = source_package()
        wanted["source"] = {"package": source.name, "version": source.version}
        wanted["key"] = entry_name(source.version, target.arch, sdigest, fdigest)
        if (entry := _entry(kcache / wanted["key"])) is not None:
            return entry, wanted
    except FetchError as e:
        wanted["source_error"] = str(e)
    for entry in entries(kcache, target.arch):
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


ARM64_MAGIC = b"ARM\x64"     # an arm64 Image's header, at 0x38 (Documentation/arm64/booting.rst)
BANNER = b"Linux version "


def arm64_image_version(path: Path) -> str:
    """The version string of an arm64 Image: it is uncompressed, so the
    kernel's banner (linux_banner, what /proc/version says) is in it as
    written, e.g. '6.1.192-vztt (vztt@vztt) (aarch64-linux-gnu-gcc (Debian
    12.2.0-14) 12.2.0, GNU ld ...) #1 SMP Thu Nov 26 17:12:56 UTC 2026'."""
    data = path.read_bytes()
    if len(data) < 0x40 or data[0x38:0x3C] != ARM64_MAGIC:
        raise BuildError(f"{path}: not an arm64 Image (no ARM\\x64 magic in its header)")
    start = 0
    while (start := data.find(BANNER, start)) >= 0:
        start += len(BANNER)
        if data[start:start + 1].isdigit():     # the banner itself, not a message about it
            end = data.find(b"\0", start)
            return data[start:end].decode("ascii", "replace").strip()
    raise BuildError(f"{path}: no kernel banner ({BANNER.decode()}...) in the Image")


def image_version(path: Path, arch: str) -> str:
    """The version string of a cached kernel image of `arch`."""
    return arm64_image_version(path) if arch == "aarch64" else bzimage_version(path)


def vm_kernel(cache: TemplateCache, arch: str | None = None) -> KernelEntry:
    """The kernel `vztt test --vm` boots a template of `arch` (uname -m; the
    host's by default) with; RuntimeUnavailable if none is built."""
    kdir = kernel_dir()
    try:
        entry, wanted = current(cache, kdir, arch)
    except VzttError as e:
        raise RuntimeUnavailable(f"no kernel for the VM runtime: {e}") from None
    if entry is None:
        hint = "" if wanted["arch"] == kernel_target().arch else f" --arch {wanted['arch']}"
        raise RuntimeUnavailable(f"no {wanted['arch']} kernel built for {kdir} in {cache.kernel_dir} "
                                 f"(series {wanted['series_digest'][7:19]}, fragment "
                                 f"{wanted['fragment_digest'][7:19]}): run `vztt kernel build{hint}` first")
    return entry


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _require_tools(target: Target) -> None:
    tools = dict(TOOLS)
    if cross := target.cross_prefix():          # kconfig already runs the compiler
        tools[f"{cross}gcc"] = target.cross_package
    missing = sorted({pkg for tool, pkg in tools.items() if which(tool) is None})
    if missing:
        raise EnvironmentProblem(f"building the kernel needs {', '.join(missing)} "
                                 f"(apt-get install {' '.join(missing)} libelf-dev libssl-dev cpio kmod)")


@contextlib.contextmanager
def _work_tree(cache: TemplateCache) -> Iterator[Path]:
    """The scratch area `kernel` (removed on the way out; a killed run's by the
    next run's clean_stale_work, which also kills what it left running: make
    and the compilers carry its mark)."""
    with cache.scratch("kernel") as work:
        mark_children(work.name)
        try:
            yield work
        finally:
            mark_children(None)  # type: ignore[arg-type]


@contextlib.contextmanager
def _kernel_log(cache: TemplateCache, what: str) -> Iterator[Log]:
    """logs/kernel.<what>.log, fresh for this run."""
    with contextlib.closing(cache.new_log("kernel", what)) as log:
        yield log


@contextlib.contextmanager
def _build_lock(kcache: Path) -> Iterator[None]:
    """One kernel build at a time per kernel cache; a second one waits. The lock
    lives in the kernel cache, not the template cache's .locks: several template
    caches may share one kernel cache (VZTT_KERNEL_CACHE)."""
    with open(kcache / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _clean_stale_entries(kcache: Path) -> None:
    """What writers that died left in the kernel cache: half-installed entries
    and downloads (their temporary names end in the writer's pid)."""
    for tmp in [*kcache.glob(".*.tmp-*"), *kcache.glob("source/.*.tmp-*")]:
        pid = writer_pid(tmp)
        if pid is not None and pid_alive(pid):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
