"""Boot tests: boot a packed template in the container runtime and check it.

    archive -> scratch tree -> container (overlay) -> checks -> poweroff -> gone

The archive is unpacked once, with GNU tar, into a tmpfs in the cache's
scratch area (`cache.scratch("<name>.boot")`) and booted through overlayfs
(boot.runtime), so the tree stays as shipped; the runtime's scratch and state
live in `cache.containers_dir`, the console log is `cache.log_path(name,
"console")` (kept: BootError names it). Callers enter a private mount
namespace first, so no mount outlives a killed vztt; the runtime's
cleanup_stale (clean_stale here) removes the rest at the next start.

Checks (boot/checks.py), in order, each reported by name (boot/report.py):

  boot           systemd reaches running or degraded within `boot.timeout`
  failed-units   no failed units beyond the recipe's `boot.allowed_failed`
  hostname       the kernel's hostname is the recipe's `hostname`
  osrelease      uname -r is the recipe's `osrelease`, if it sets one (kernel.virt_osrelease;
                 a kernel without it: "not applied", not a failure)
  loopback       lo has 127.0.0.1, `localhost` resolves, a TCP echo over 127.0.0.1 works
  package-db     the package database is consistent (per family: PACKAGE_DB_CHECKS)
  smoke:<name>   each recipe smoke check, run with /bin/sh -c inside
  poweroff       a clean poweroff within POWEROFF_TIMEOUT

A boot that fails is BootError (exit 8), a check that fails CheckFailed (9),
a host that cannot run containers RuntimeUnavailable (10). `vztt build` calls
build.gate.gate() between pack and promote: only a template that passes is promoted.
"""


from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from vztt.base.errors import RecipeError
from vztt.base.proc import run, tool_env
from vztt.base.progress import Progress
from vztt.boot.checks import (Outcome, check_failed_units, check_hostname, check_loopback, check_osrelease,
                              check_package_db, check_smoke, timed)
from vztt.boot.report import FAILED_RESULT, PASSED, Check, Report
from vztt.boot.runtime import BootError, Container, RuntimeUnavailable, cleanup_stale, cpu
from vztt.recipe.recipe import Recipe
from vztt.store.templates import TemplateCache

POWEROFF_TIMEOUT = 30.0
UNPACK_TIMEOUT = 600.0
MEMORY_MAX = 2 << 30             # a runaway check cannot take the host down
PIDS_MAX = 4096


# --------------------------------------------------------------------------
# Host side: stale runs, the scratch tree
# --------------------------------------------------------------------------

def console_log_path(cache: TemplateCache, name: str, purpose: str = "test") -> Path:
    """logs/<name>.console.log (a test), or <name>.<purpose>.console.log."""
    return cache.log_path(name, "console" if purpose == "test" else f"{purpose}.console")


def clean_stale(cache: TemplateCache) -> list[str]:
    """What killed runs left of their containers: processes, mounts, cgroups,
    scratch (the runtime's cleanup_stale). Needs root."""
    return cleanup_stale(cache.containers_dir)


def prepare_host(cache: TemplateCache, what: str) -> list[str]:
    """Root check, then what killed runs left: containers through the
    runtime, scratch trees through the cache. Call at the start of test and
    run (build does the same after its own root check)."""
    if os.geteuid() != 0:
        raise RuntimeUnavailable(f"{what} needs root (namespaces, overlayfs, cgroups); run it with sudo")
    cleaned = clean_stale(cache)
    cache.clean_stale_work()
    return cleaned


def cached_archive(cache: TemplateCache, name: str) -> Path:
    """The cached plain archive of NAME, the one a boot test boots."""
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; run `vztt build {name}` first")
    archives = entry.manifest.archives
    plain = archives.get("plain")
    if plain is None:
        raise RecipeError(f"{name}: the cache holds no plain archive to boot (formats: {', '.join(archives)}); "
                          f"build it with --format all")
    return cache.root / plain.file


def container_name(template: str, purpose: str) -> str:
    """A runtime container name (letters, digits, '.', '-'), unique per process."""
    slug = re.sub(r"[^A-Za-z0-9.-]", "-", template).strip(".-") or "template"
    suffix = f"-{purpose}-{os.getpid()}"
    return slug[:63 - len(suffix)] + suffix


def unpack(archive: Path, dest: Path, timeout: float = UNPACK_TIMEOUT) -> None:
    """Extract our own .tar.lz4 with GNU tar, owners, modes, xattrs, ACLs kept.
    GNU tar refuses members with `..` and delays symlinks that could redirect
    later members; dest is an empty directory. A timeout or Ctrl-C stops tar and
    its lz4 too."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["tar", "--extract", "--use-compress-program=lz4", f"--file={archive}", f"--directory={dest}", "--numeric-owner",
           "--same-permissions", "--xattrs", "--xattrs-include=*", "--acls", "--no-overwrite-dir"]
    # The C locale, as the archive was written (formats/plain.py): names pass through as bytes.
    run(cmd, what=f"cannot unpack {archive}", error=RuntimeUnavailable, env=tool_env(LC_ALL="C"), timeout=timeout)


@contextlib.contextmanager
def scratch_tree(cache: TemplateCache, name: str) -> Iterator[Path]:
    """An empty tmpfs in the scratch area <name>.boot to unpack the archive
    into: faster than the disk both ways, and it goes with one umount.
    Removed on the way out, whatever happens; in a private mount namespace
    (test, run, build) the kernel drops it even after SIGKILL, and
    clean_stale_work removes the directory."""
    with cache.scratch(f"{name}.boot") as scratch:
        tree = scratch / "tree"
        tree.mkdir()
        run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid", "vztt-boottest", tree],
            what=f"cannot mount a tmpfs on {tree}", error=RuntimeUnavailable)
        yield tree
    if scratch.exists():
        raise RuntimeUnavailable(f"cannot remove the scratch tree {scratch}")


@contextlib.contextmanager
def booted(recipe: Recipe, cache: TemplateCache, tree: Path, purpose: str, vm: bool = False) -> Iterator[Container]:
    """A started container of `tree`, with the recipe's hostname; closed on the way out.
    vm=True: a qemu VM with vztt's kernel instead (boot.runtime.vm, the same interface);
    `tree` is then a scratch copy that the VM's disk is made from."""
    with contextlib.ExitStack() as stack:
        if vm:
            from vztt.kernel.build import KVM_PROBE, vm_kernel
            from vztt.boot.runtime.vm import VM
            kernel = vm_kernel(cache).bzimage
            scratch = stack.enter_context(cache.scratch(f"{recipe.name}.vm"))
            box = VM(tree, scratch, kernel, name=container_name(recipe.name, purpose), hostname=recipe.hostname,
                     osrelease=osrelease(recipe), console_log=console_log_path(cache, recipe.name, vm_purpose(purpose)),
                     probe_cache=cache.kernel_dir / KVM_PROBE, cpu_level=cpu_level(recipe))
        else:
            # The container runs the template's programs on this host's CPU.
            cpu.require_on_host(cpu_level(recipe), recipe.name)
            box = Container(tree, cache.containers_dir, name=container_name(recipe.name, purpose),
                            hostname=recipe.hostname, overlay=True, memory_max=MEMORY_MAX, pids_max=PIDS_MAX,
                            console_log=console_log_path(cache, recipe.name, purpose), osrelease=osrelease(recipe))
        with box:
            yield box  # type: ignore[misc]


def vm_purpose(purpose: str) -> str:
    """A VM run's console log is <name>.vm.console.log (test) or <name>.vm-<purpose>.console.log."""
    return "vm" if purpose == "test" else f"vm-{purpose}"


def osrelease(recipe: Recipe) -> str | None:
    """The recipe's `osrelease` (what uname -r says inside), or None; checked
    against the settings table's pattern when the recipe was loaded."""
    return recipe.merged.get("osrelease") or None


def cpu_level(recipe: Recipe) -> str:
    """The x86-64 level the recipe's programs need (`cpu_level`; the baseline if unset)."""
    return recipe.merged.get("cpu_level") or cpu.BASELINE


def boot_timeout(recipe: Recipe) -> int:
    timeout = recipe.merged.get("boot.timeout", 60)
    if timeout <= 0:
        raise RecipeError(f"{recipe.origins.get('boot.timeout', recipe.path)}: boot.timeout: {timeout} is not "
                          "a positive number of seconds")
    return timeout


def allowed_failed(recipe: Recipe) -> list[str]:
    return list(recipe.merged.get("boot.allowed_failed") or [])


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------

def check_names(recipe: Recipe) -> list[str]:
    return (["boot", "failed-units", "hostname"] + (["osrelease"] if osrelease(recipe) else [])
            + ["loopback", "package-db"] + [f"smoke:{s.name}" for s in recipe.smoke] + ["poweroff"])


def boot_test(recipe: Recipe, cache: TemplateCache, archive: Path, progress: Progress | None = None,
              vm: bool = False) -> Report:
    """Unpack, boot, check, power off, clean up. Returns the report: a failed
    boot or check is in it (Report.exception()); RuntimeUnavailable and
    KeyboardInterrupt propagate, after everything was cleaned up.
    vm=True boots it in qemu with vztt's kernel instead of a container."""
    progress = progress or Progress(quiet=True)
    report = Report(name=recipe.name, archive=str(archive), hostname=recipe.hostname,
                    checks=[Check(n) for n in check_names(recipe)],
                    started=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    console_log=str(console_log_path(cache, recipe.name, vm_purpose("test") if vm else "test")))
    checks = {c.name: c for c in report.checks}
    started = time.monotonic()
    with scratch_tree(cache, recipe.name) as tree:
        with progress.step("unpack") as st:
            unpack(archive, tree)
            report.unpack_seconds = time.monotonic() - started
            st.note(f"{archive.name} in {report.unpack_seconds:.1f} s")
        current = checks["boot"]
        booting = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                with progress.step("boot") as st:
                    booting = time.monotonic()
                    box = stack.enter_context(booted(recipe, cache, tree, "test", vm=vm))
                    state, failed = box.wait_running(timeout=boot_timeout(recipe))
                    report.boot_seconds = box.boot_seconds
                    current.result, current.seconds = PASSED, time.monotonic() - booting
                    current.detail = f"{state} in {current.seconds:.2f} s" + (f" ({box.note})" if vm else "")
                    st.note(current.detail)

                steps: list[tuple[str, Callable[[], Outcome]]] = [
                    ("failed-units", lambda: check_failed_units(box, failed, allowed_failed(recipe))),
                    ("hostname", lambda: check_hostname(box, recipe.hostname)),
                ]
                if release := osrelease(recipe):
                    steps.append(("osrelease", lambda: check_osrelease(box, release)))
                steps += [
                    ("loopback", lambda: check_loopback(box)),
                    ("package-db", lambda: check_package_db(box, recipe.family)),
                ]
                steps += [(f"smoke:{s.name}", lambda s=s: check_smoke(box, s.command, s.exit_status, s.output))
                          for s in recipe.smoke]
                with progress.step("checks") as st:
                    for name, fn in steps:
                        current = checks[name]
                        timed(current, fn)
                    report.ready_seconds = time.monotonic() - booting
                    bad = [c.name for c in report.failed]
                    st.note(f"{len(steps) - len(bad)} of {len(steps)} passed"
                            + (f"; FAILED: {', '.join(bad)}" if bad else ""))

                current = checks["poweroff"]
                with progress.step("poweroff") as st:
                    clean = box.poweroff(timeout=POWEROFF_TIMEOUT)
                    current.seconds = time.monotonic() - booting - report.ready_seconds
                    current.result = PASSED if clean else FAILED_RESULT
                    current.detail = (f"in {current.seconds:.2f} s" if clean else
                                      f"did not power off within {POWEROFF_TIMEOUT:g} s: killed")
                    st.note(current.detail)
        except BootError as e:
            # Before `boot` passed: the template does not boot. After: the
            # container went down under a check, which is that check's failure.
            current.result = FAILED_RESULT
            if current.name == "boot":
                current.seconds = time.monotonic() - booting
            current.detail = str(e)
            current.output = _tail(Path(report.console_log))
            report.error_kind = "boot" if current.name == "boot" else "check"
    report.seconds = time.monotonic() - started
    if report.error_kind == "boot":
        report.error = f"the template did not boot: {checks['boot'].detail}"
    elif report.failed:
        report.error_kind = "check"
        report.error = (f"{len(report.failed)} of {len(report.checks)} checks failed: "
                        + "; ".join(f"{c.name} ({c.detail})" for c in report.failed)
                        + f"; console log: {report.console_log}")
    return report


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# A throwaway container for a maintainer (`vztt run`)
# --------------------------------------------------------------------------

def run_command(recipe: Recipe, cache: TemplateCache, archive: Path, argv: list[str], timeout: float,
                progress: Progress | None = None, vm: bool = False) -> tuple[int, str]:
    """Boot the template, run argv inside once it is up, power off, clean up.
    Returns (exit status, output); BootError if it does not boot."""
    progress = progress or Progress(quiet=True)
    with scratch_tree(cache, recipe.name) as tree:
        with progress.step("unpack") as st:
            started = time.monotonic()
            unpack(archive, tree)
            st.note(f"{archive.name} in {time.monotonic() - started:.1f} s")
        with contextlib.ExitStack() as stack:
            with progress.step("boot") as st:
                box = stack.enter_context(booted(recipe, cache, tree, "run", vm=vm))
                state, failed = box.wait_running(timeout=boot_timeout(recipe))
                st.note(f"{state} in {box.boot_seconds:.2f} s" + (f" (failed: {', '.join(failed)})" if failed else ""))
            status, out = box.exec(list(argv), timeout=timeout)
            box.poweroff(timeout=POWEROFF_TIMEOUT)
    return status, out
