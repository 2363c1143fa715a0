"""Boot tests: boot a packed template in the container runtime and check it.

    artifact -> its tree (the format's bootable_tree) -> container (overlay) -> checks -> poweroff -> gone

The boot test asks the artifact's format for a bootable tree, made in the
cache's scratch area (`cache.scratch("<name>.boot")`): a plain archive is
unpacked with GNU tar into a tmpfs; a ploop cache's root.hds is read back
into a disk whose partition is mounted read-only. The tree is booted
through overlayfs (boot.runtime), so it stays as shipped; the runtime's scratch and state
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
  network:address  the template's interface holds the address(es) it was given (boot.ip or
                 --ip: written into its own network files by netconfig, as `vztt create` does)
  network:ping   the host side of the link answers ping from inside
  network:ssh    `ssh -i <throwaway key> root@<address> uname -n`, run from the host side's
                 network namespace, prints the hostname; sshd's host key was made at first boot
                 (the three network rows: unless the recipe says boot.network = false; see
                 boot/network.py; a failure's report keeps `ip addr` and sshd's journal)
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

from vztt import formats, netconfig
from vztt.base.errors import BadUsage, RecipeError
from vztt.base.progress import Progress
from vztt.boot.checks import (Outcome, SshLogin, check_failed_units, check_hostname, check_loopback,
                              check_network_address, check_network_ping, check_network_ssh, check_osrelease,
                              check_package_db, check_smoke, network_diagnostics, shipped_host_keys, timed)
from vztt.boot.network import BootNet, host_side, network_check_enabled, run_network, test_network
from vztt.boot.report import FAILED_RESULT, PASSED, Check, Report
from vztt.boot.runtime import BootError, Container, RuntimeUnavailable, cleanup_stale, cpu
from vztt.boot.runtime.hostnet import HostNet
from vztt.netconfig import RawSettings
from vztt.recipe.recipe import Recipe
from vztt.store.templates import TemplateCache

POWEROFF_TIMEOUT = 30.0
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
    """The cached plain archive of NAME."""
    return cached_files(cache, name, "plain")[1][0]


def cached_files(cache: TemplateCache, name: str, fmt: str | None = None) -> tuple[str, list[Path]]:
    """(format, its cached files) a boot test of NAME boots: `fmt`'s, else the first
    bootable format the cache holds (plain before ploop)."""
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; run `vztt build {name}` first")
    archives = entry.manifest.archives
    bootable = formats.bootable()
    if fmt is not None and fmt not in bootable:
        raise formats.NotBootable(f"format {formats.get(fmt).name}: vztt boots {' and '.join(bootable)}; "
                                  f"the other hosts' own tools boot {fmt}")
    chosen = fmt or next((f for f in bootable if f in archives), None)
    if chosen is None or chosen not in archives:
        raise RecipeError(f"{name}: the cache holds no {chosen or ' or '.join(bootable)} archive to boot "
                          f"(formats: {', '.join(archives)}); build it with --format {chosen or 'plain'}")
    return chosen, [cache.root / f.file for f in archives[chosen].files]


# The keys whose pulled templates `vztt test` may boot in a container: this host's own
# publishing keys (fingerprints or long key ids, space-separated), else the key
# `vztt publish` signs with here (VZTT_SIGN_KEY, when it is given as a fingerprint).
OWN_KEYS_ENV = "VZTT_OWN_KEYS"
# What `vztt test` boots another's template in: vm (default) or container.
UNTRUSTED_RUNTIME_ENV = "VZTT_UNTRUSTED_RUNTIME"


def own_keys() -> list[str]:
    given = os.environ.get(OWN_KEYS_ENV, "").split() or os.environ.get("VZTT_SIGN_KEY", "").split()
    return [k.upper().removeprefix("0X") for k in given if re.fullmatch(r"(0[xX])?[0-9A-Fa-f]{16,40}", k)]


def untrusted_origin(cache: TemplateCache, name: str) -> str | None:
    """Why NAME is someone else's (pulled from a mirror, signed by a key that is not
    one of own_keys()), or None: built here, or signed by our own key. A template
    is code: the container is one kernel away from the host, the VM is not."""
    entry = cache.entry(name)
    pulled = entry.manifest.pulled if entry is not None else None
    if pulled is None:
        return None
    signer = pulled.signer.upper()
    if signer and any(signer.endswith(key) for key in own_keys()):
        return None
    return f"pulled from {pulled.source}, signed by {signer or 'an unknown key'}, not this host's publishing key"


def default_vm(cache: TemplateCache, name: str) -> tuple[bool, str | None]:
    """(whether `vztt test` without --vm/--container boots NAME in a VM, why)."""
    why = untrusted_origin(cache, name)
    if why is None:
        return False, None
    choice = os.environ.get(UNTRUSTED_RUNTIME_ENV, "vm").strip() or "vm"
    if choice not in ("vm", "container"):
        raise BadUsage(f"{UNTRUSTED_RUNTIME_ENV}={choice}: vm or container")
    return choice == "vm", why


def container_name(template: str, purpose: str) -> str:
    """A runtime container name (letters, digits, '.', '-'), unique per process."""
    slug = re.sub(r"[^A-Za-z0-9.-]", "-", template).strip(".-") or "template"
    suffix = f"-{purpose}-{os.getpid()}"
    return slug[:63 - len(suffix)] + suffix


@contextlib.contextmanager
def artifact_tree(cache: TemplateCache, name: str, fmt: str, files: list[Path]) -> Iterator[Path]:
    """The root tree of a template's artifact (`files`, of format `fmt`), made by the
    format in the scratch area <name>.boot, for the runtime to boot. Removed on the way
    out, whatever happens; in a private mount namespace (test, run, build) the kernel
    drops its mounts even after SIGKILL, and clean_stale_work removes the directory."""
    with cache.scratch(f"{name}.boot") as scratch:
        with formats.get(fmt).bootable_tree(files, scratch) as tree:
            yield tree
    if scratch.exists():
        raise RuntimeUnavailable(f"cannot remove the scratch tree {scratch}")


@contextlib.contextmanager
def booted(recipe: Recipe, cache: TemplateCache, tree: Path, purpose: str, vm: bool = False,
           hostname: str | None = None, net: tuple[HostNet, BootNet] | None = None,
           userns: bool = True) -> Iterator[Container]:
    """A started container of `tree`, with the recipe's hostname (or `hostname`); closed on
    the way out. vm=True: a qemu VM with vztt's kernel instead (boot.runtime.vm, the same
    interface); `tree` is then a scratch copy that the VM's disk is made from. `net`: the
    link's host side, and the settings written into the tree (netconfig) before boot.
    userns=False (--unsafe-no-userns): the container's root is the host's root."""
    hostname = hostname or recipe.hostname
    link, bootnet = net if net is not None else (None, None)

    def configure(root: Path) -> None:
        if bootnet is not None:
            netconfig.configure(root, recipe.distro, bootnet.settings)

    with contextlib.ExitStack() as stack:
        if vm:
            from vztt.kernel.build import KVM_PROBE, vm_kernel
            from vztt.boot.runtime.vm import VM
            kernel = vm_kernel(cache, recipe.arch).image     # the template's architecture
            scratch = stack.enter_context(cache.scratch(f"{recipe.name}.vm"))
            configure(tree)            # the VM's scratch copy; its disk is made from it
            box = VM(tree, scratch, kernel, name=container_name(recipe.name, purpose), hostname=hostname,
                     osrelease=osrelease(recipe), console_log=console_log_path(cache, recipe.name, vm_purpose(purpose)),
                     probe_cache=cache.kernel_dir / KVM_PROBE, link=link, cpu_level=cpu_level(recipe),
                     arch=recipe.arch)
        else:
            # The container runs the template's programs on this host's CPU.
            cpu.require_on_host(cpu_level(recipe), recipe.name)
            box = Container(tree, cache.containers_dir, name=container_name(recipe.name, purpose),
                            hostname=hostname, overlay=True, memory_max=MEMORY_MAX, pids_max=PIDS_MAX,
                            console_log=console_log_path(cache, recipe.name, purpose), osrelease=osrelease(recipe),
                            prepare=configure, link=link, userns=userns,
                            link_iface=bootnet.settings.interface if bootnet else netconfig.DEFAULT_INTERFACE)
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


def allowed_failed(recipe: Recipe, emulated: bool = False) -> list[str]:
    """The units the recipe lets fail; under qemu-user (`emulated`), also those it lets fail
    there only (the emulator's limits, boot.allowed_failed_emulated)."""
    allowed = list(recipe.merged.get("boot.allowed_failed") or [])
    if emulated:
        allowed += recipe.merged.get("boot.allowed_failed_emulated") or []
    return allowed


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------

NETWORK_CHECKS = ["network:address", "network:ping", "network:ssh"]


def check_names(recipe: Recipe) -> list[str]:
    return (["boot", "failed-units", "hostname"] + (["osrelease"] if osrelease(recipe) else [])
            + ["loopback"] + (NETWORK_CHECKS if network_check_enabled(recipe) else [])
            + ["package-db"] + [f"smoke:{s.name}" for s in recipe.smoke] + ["poweroff"])


def _vm_boots_plain(recipe: Recipe, vm: bool, fmt: str) -> None:
    """The VM's disk is made from a tree it writes its agent into: the plain archive's
    unpacked tree. Another format's tree (ploop's read-only partition) boots in a container."""
    if vm and fmt != formats.SOURCE:
        raise BadUsage(f"{recipe.name}: --vm boots the plain archive (the VM's disk is made from its tree); "
                       f"the {fmt} artifact boots in the container runtime (without --vm)")


def boot_test(recipe: Recipe, cache: TemplateCache, archive: Path | list[Path], progress: Progress | None = None,
              vm: bool = False, fmt: str = "plain", given: RawSettings | None = None,
              hostname: str | None = None, userns: bool = True) -> Report:
    """Unpack, boot, check, power off, clean up. `archive`: the artifact's files (a
    plain archive, or the files of format `fmt`). Returns the report: a failed
    boot or check is in it (Report.exception()); RuntimeUnavailable and
    KeyboardInterrupt propagate, after everything was cleaned up.
    vm=True boots it in qemu with vztt's kernel instead of a container.
    `given`: network settings from the command line, over the recipe's boot.* defaults
    (a bad value: BadUsage, before anything is unpacked); `hostname` over the recipe's."""
    progress = progress or Progress(quiet=True)
    _vm_boots_plain(recipe, vm, fmt)
    files = [archive] if isinstance(archive, Path) else list(archive)
    archive = files[0]
    hostname = hostname or recipe.hostname
    wanted = test_network(recipe, given, BadUsage)
    report = Report(name=recipe.name, archive=str(archive), hostname=hostname,
                    checks=[Check(n) for n in check_names(recipe)],
                    started=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                    console_log=str(console_log_path(cache, recipe.name, vm_purpose("test") if vm else "test")))
    checks = {c.name: c for c in report.checks}
    started = time.monotonic()
    with contextlib.ExitStack() as scratch:
        with progress.step("unpack") as st:
            tree = scratch.enter_context(artifact_tree(cache, recipe.name, fmt, files))
            report.unpack_seconds = time.monotonic() - started
            st.note(f"{archive.name} in {report.unpack_seconds:.1f} s")
        net = scratch.enter_context(host_side(cache, recipe.name, wanted, throwaway_key=True)) if wanted else None
        shipped_keys = shipped_host_keys(tree)             # before boot: what the archive holds
        current = checks["boot"]
        booting = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                with progress.step("boot") as st:
                    booting = time.monotonic()
                    box = stack.enter_context(booted(recipe, cache, tree, "test", vm=vm, hostname=hostname, net=net,
                                                                userns=userns))
                    state, failed = box.wait_running(timeout=boot_timeout(recipe))
                    report.boot_seconds = box.boot_seconds
                    current.result, current.seconds = PASSED, time.monotonic() - booting
                    current.detail = f"{state} in {current.seconds:.2f} s" + (
                        f" ({box.note})" if vm else f" ({box.arch} under qemu-user)" if box.emulated else "")
                    st.note(current.detail)

                steps: list[tuple[str, Callable[[], Outcome]]] = [
                    ("failed-units", lambda: check_failed_units(box, failed,
                                                                 allowed_failed(recipe, box.emulated))),
                    ("hostname", lambda: check_hostname(box, hostname)),
                ]
                if release := osrelease(recipe):
                    steps.append(("osrelease", lambda: check_osrelease(box, release)))
                steps.append(("loopback", lambda: check_loopback(box)))
                slowdown = float(getattr(box, "slowdown", 1.0))      # a VM under TCG: longer time bounds
                if net is not None:
                    steps += [("network:address", lambda: check_network_address(box, net[1].settings, slowdown)),
                              ("network:ping", lambda: check_network_ping(box, net[1].ping_targets, slowdown))]
                steps.append(("package-db", lambda: check_package_db(box, recipe.family)))
                steps += [(f"smoke:{s.name}", lambda s=s: check_smoke(box, s.command, s.exit_status, s.output))
                          for s in recipe.smoke]
                with progress.step("checks") as st:
                    login: SshLogin | None = None
                    for name, fn in steps:
                        current = checks[name]
                        if name == "network:ping" and not checks["network:address"].ok:
                            current.detail = "not run: the interface lacks its address"
                            continue
                        timed(current, fn)
                        if name == "network:address" and current.ok and net is not None:
                            # ssh from the host side goes on while the checks inside run
                            link, bootnet = net
                            assert bootnet.key is not None
                            login = SshLogin(link, bootnet.key, bootnet.ssh_target, slowdown)
                            stack.callback(login.cancel)
                    if login is not None:
                        current = checks["network:ssh"]
                        timed(current, lambda: check_network_ssh(box, login, hostname, shipped_keys))
                        current.seconds = login.seconds        # its own time, not the rows it overlapped
                    elif net is not None:
                        checks["network:ssh"].detail = "not run: the interface lacks its address"
                    if net is not None and any(checks[n].result == FAILED_RESULT for n in NETWORK_CHECKS):
                        family = net[1].family
                        first = next(checks[n] for n in NETWORK_CHECKS if checks[n].result == FAILED_RESULT)
                        first.output = (first.output.rstrip("\n") + "\n"
                                        + network_diagnostics(box, family.ssh_unit, family.network_units))
                    report.ready_seconds = time.monotonic() - booting
                    bad = [c.name for c in report.failed]
                    rows = len(steps) + (net is not None)          # network:ssh is judged apart
                    st.note(f"{rows - len(bad)} of {rows} passed"
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

def run_command(recipe: Recipe, cache: TemplateCache, archive: Path | list[Path], argv: list[str], timeout: float,
                progress: Progress | None = None, vm: bool = False, fmt: str = "plain",
                given: RawSettings | None = None, hostname: str | None = None,
                userns: bool = True) -> tuple[int, str]:
    """Boot the template, run argv inside once it is up, power off, clean up.
    Returns (exit status, output); BootError if it does not boot. `given`: network
    settings (--ip ...: a link to a host side of its own, the files written as `vztt
    create` writes them); none: loopback only."""
    progress = progress or Progress(quiet=True)
    _vm_boots_plain(recipe, vm, fmt)
    files = [archive] if isinstance(archive, Path) else list(archive)
    wanted = run_network(recipe, given, BadUsage) if given is not None else None
    with contextlib.ExitStack() as stack:
        with progress.step("unpack") as st:
            started = time.monotonic()
            tree = stack.enter_context(artifact_tree(cache, recipe.name, fmt, files))
            st.note(f"{files[0].name} in {time.monotonic() - started:.1f} s")
        net = stack.enter_context(host_side(cache, recipe.name, wanted, throwaway_key=False)) if wanted else None
        if wanted is not None:
            addresses = ", ".join(a.with_prefixlen for a in wanted.settings.addresses)
            progress.say(f"network: {wanted.settings.interface} {addresses}; host side "
                         f"{', '.join(wanted.host_addresses)} (a namespace of its own)")
        with contextlib.ExitStack() as boxes:
            with progress.step("boot") as st:
                box = boxes.enter_context(booted(recipe, cache, tree, "run", vm=vm, hostname=hostname, net=net,
                                                        userns=userns))
                state, failed = box.wait_running(timeout=boot_timeout(recipe))
                st.note(f"{state} in {box.boot_seconds:.2f} s" + (f" (failed: {', '.join(failed)})" if failed else ""))
            status, out = box.exec(list(argv), timeout=timeout)
            box.poweroff(timeout=POWEROFF_TIMEOUT)
    return status, out
