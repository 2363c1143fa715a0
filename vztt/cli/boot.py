"""Booting cached templates: `vztt test`, `run`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vztt.base.progress import Progress
from vztt.cli.main import Context, emit, emit_report, guarded, json_option, main
from vztt.recipe.recipe import Recipe
from vztt.store.templates import TemplateCache


def _ready_to_boot(obj: Context, name: str, command: str) -> tuple[Recipe, TemplateCache, Path]:
    """NAME's recipe, the cache and its archive, on a host checked for booting, in a
    mount namespace of our own: the overlay mount dies with us, whatever happens."""
    from vztt.boot import test as boottest
    from vztt.base.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    archive = boottest.cached_archive(cache, name)
    boottest.prepare_host(cache, command)
    enter_private_namespace()
    return recipe, cache, archive


@main.command("test")
@click.argument("name")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Also write the report as JUnit XML to FILE (for CI).")
@click.option("--vm", is_flag=True, help="Boot it in a qemu VM with vztt's kernel (`vztt kernel build`) "
              "instead of a container: KVM if it works here, TCG otherwise.")
@json_option
@click.pass_obj
@guarded
def test_cmd(obj: Context, name: str, junit: Path | None, vm: bool, as_json: bool) -> None:
    """Boot the cached template NAME in a container and run its checks.

    \b
    The archive is unpacked into a scratch tree and booted with overlayfs
    (the tree stays as shipped), with the recipe's hostname. Checks, one row each:
      boot           systemd reaches running (or degraded) within boot.timeout
      failed-units   no failed unit beyond the recipe's boot.allowed_failed
      hostname       the recipe's hostname
      osrelease      uname -r is the recipe's osrelease (if it sets one)
      loopback       lo has 127.0.0.1, localhost resolves, a TCP echo over 127.0.0.1
      package-db     the package database is consistent (dpkg --audit)
      smoke:NAME     each recipe smoke check (/bin/sh -c inside)
      poweroff       a clean poweroff in time
    Exit 8: it does not boot (console log kept); 9: a check failed; 10: no container runtime here.

    \b
    --vm: the same checks in a qemu microvm booted with vztt's kernel from an
    ext4 disk made from the archive, through a guest agent on virtio-serial;
    console log <cache>/logs/NAME.vm.console.log. VZTT_VM_ACCEL=kvm|tcg|auto.
    """
    from vztt.boot import report as bootreport, test as boottest
    recipe, cache, archive = _ready_to_boot(obj, name, "vztt test")
    progress = Progress(quiet=as_json)
    progress.say(f"testing {archive}" + (" in a VM" if vm else ""))
    report = boottest.boot_test(recipe, cache, archive, progress, vm=vm)
    if junit:
        bootreport.write_junit(report, junit)
    error = report.exception()
    if as_json:
        emit_report(report.as_dict(), error)
        return
    click.echo(bootreport.format_table(report), nl=False)
    if error is not None:
        raise error


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds COMMAND may run before it is killed (exit 124).")
@click.option("--vm", is_flag=True, help="In a qemu VM with vztt's kernel instead of a container.")
@json_option
@click.pass_obj
@guarded
def run_cmd(obj: Context, name: str, command: tuple[str, ...], timeout: float, vm: bool, as_json: bool) -> None:
    """Run COMMAND in a throwaway container of the cached template NAME.

    \b
      vztt run debian-12-x86_64-minimal -- cat /etc/os-release
    Boots the template (as `vztt test` does), runs COMMAND once it is up,
    prints its output (stdout and stderr), powers off and removes everything.
    Exits with COMMAND's status; 8 if the template does not boot. --json (before
    `--`): {"name", "command", "status", "output", "steps"} instead of the output.
    """
    from vztt.boot import test as boottest
    recipe, cache, archive = _ready_to_boot(obj, name, "vztt run")
    progress = Progress(quiet=as_json)
    status, output = boottest.run_command(recipe, cache, archive, list(command), timeout, progress, vm=vm)
    if as_json:
        emit({"name": name, "command": list(command), "status": status, "output": output, "vm": vm,
              "steps": dict(progress.timings)})
    else:
        click.echo(output, nl=False)
    sys.exit(status)
