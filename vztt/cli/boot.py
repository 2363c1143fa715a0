"""Booting cached templates: `vztt test`, `run`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from vztt import formats
from vztt.base.progress import Progress
from vztt.cli.main import Context, emit, emit_report, guarded, json_option, main
from vztt.cli.netopts import network_options, raw_settings
from vztt.recipe.recipe import Recipe
from vztt.store.templates import TemplateCache


def _ready_to_boot(obj: Context, name: str, command: str,
                   fmt: str | None) -> tuple[Recipe, TemplateCache, str, list[Path]]:
    """NAME's recipe, the cache, and the format and files to boot, on a host checked for
    booting, in a mount namespace of our own: the overlay mount dies with us, whatever happens."""
    from vztt.boot import test as boottest
    from vztt.base.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    chosen, files = boottest.cached_files(cache, name, fmt)
    boottest.prepare_host(cache, command)
    enter_private_namespace()
    return recipe, cache, chosen, files


unsafe_userns_option = click.option(
    "--unsafe-no-userns", "unsafe_no_userns", is_flag=True,
    help="Boot the container without a user namespace: its root is the host's root (the capability, "
         "system call and device limits stay). Only for a host that has none (user.max_user_namespaces = 0), "
         "and only for templates you trust.")

format_option = click.option(
    "--format", "fmt", type=click.Choice(list(formats.bootable())),
    help="Which cached artifact to boot: plain (the archive, unpacked) or ploop (the Virtuozzo cache: its "
         "root.hds read back into a disk, the partition mounted read-only). [default: plain if cached, else ploop]")


@main.command("test")
@click.argument("name")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Also write the report as JUnit XML to FILE (for CI).")
@click.option("--vm/--container", "vm", default=None,
              help="Boot it in a qemu VM with vztt's kernel (`vztt kernel build`): KVM if it works here, TCG "
                   "otherwise; or in a container. [default: a container, but a VM for a template pulled from a "
                   "mirror and signed by a key that is not this host's own (VZTT_OWN_KEYS, else VZTT_SIGN_KEY); "
                   "VZTT_UNTRUSTED_RUNTIME=container makes that a container too]")
@click.option("--hostname", help="The booted template's hostname. [default: the recipe's `hostname`]")
@network_options
@format_option
@unsafe_userns_option
@json_option
@click.pass_obj
@guarded
def test_cmd(obj: Context, name: str, junit: Path | None, vm: bool | None, hostname: str | None, fmt: str | None,
             unsafe_no_userns: bool, as_json: bool, **net: Any) -> None:
    """Boot the cached template NAME in a container and run its checks.

    \b
    The archive is unpacked into a scratch tree (--format ploop: the ploop
    cache's disk is read back and its partition mounted read-only) and booted
    with overlayfs (the tree stays as shipped), with the recipe's hostname.
    Checks, one row each:
      boot           systemd reaches running (or degraded) within boot.timeout
      failed-units   no failed unit beyond the recipe's boot.allowed_failed
      hostname       the recipe's hostname
      osrelease      uname -r is the recipe's osrelease (if it sets one)
      loopback       lo has 127.0.0.1, localhost resolves, a TCP echo over 127.0.0.1
      network:address  the interface holds its address(es): the recipe's boot.ip
                     (default 192.0.2.2/24, gateway 192.0.2.1), or --ip/--gateway
      network:ping   the host side of the link answers ping from inside
      network:ssh    ssh -i <throwaway key> root@<address> uname -n, from the host
                     side, prints the hostname (sshd's host key made at first boot)
      package-db     the package database is consistent (dpkg --audit; rpm -Va)
      smoke:NAME     each recipe smoke check (/bin/sh -c inside)
      poweroff       a clean poweroff in time
    Exit 8: it does not boot (console log kept); 9: a check failed; 10: no container runtime here
    (no user namespaces: user.max_user_namespaces = 0; --unsafe-no-userns boots without one),
    or this host's CPU lacks the recipe's cpu_level (x86-64-v3 for EL 10).

    \b
    The container: a user namespace (its root is an unprivileged host id range),
    nspawn's capability set, a seccomp filter, a device policy, /proc and /sys
    masked. A template pulled from a mirror and signed by a key that is not this
    host's own boots in a VM (--vm) unless --container is given: the VM is the
    stronger boundary.

    \b
    The network: the link's other end is in a network namespace the test makes
    for itself (nothing reaches the host's network); a failed network check keeps
    `ip addr` and sshd's journal from inside in the report. boot.network = false
    in a recipe leaves the three rows out.

    \b
    --vm: the same checks in a qemu microvm booted with vztt's kernel from an
    ext4 disk made from the archive, through a guest agent on virtio-serial;
    console log <cache>/logs/NAME.vm.console.log. VZTT_VM_ACCEL=kvm|tcg|auto.
    """
    from vztt.boot import report as bootreport, test as boottest
    from vztt.netconfig.identity import validate_hostname
    given = raw_settings(net)
    validate_hostname(hostname)
    recipe, cache, chosen, files = _ready_to_boot(obj, name, "vztt test", fmt)
    progress = Progress(quiet=as_json)
    if unsafe_no_userns and not vm:
        progress.say("--unsafe-no-userns: no user namespace, the container's root is this host's root")
    if vm is None:
        vm, why = boottest.default_vm(cache, name)
        if why is not None:
            progress.say(f"{name}: {why}: " + ("booting it in a VM (--container to boot it in a container)"
                                               if vm else f"booting it in a container ({boottest.UNTRUSTED_RUNTIME_ENV})"))
    report = boottest.boot_test(recipe, cache, files, progress, vm=vm, fmt=chosen, given=given, hostname=hostname,
                                userns=not unsafe_no_userns)
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
@click.option("--hostname", help="The container's hostname. [default: the recipe's `hostname`]")
@network_options
@format_option
@unsafe_userns_option
@json_option
@click.pass_obj
@guarded
def run_cmd(obj: Context, name: str, command: tuple[str, ...], timeout: float, vm: bool, hostname: str | None,
            fmt: str | None, unsafe_no_userns: bool, as_json: bool, **net: Any) -> None:
    """Run COMMAND in a throwaway container of the cached template NAME.

    \b
      vztt run debian-12-x86_64-minimal -- cat /etc/os-release
      vztt run debian-12-x86_64-minimal --ip 192.0.2.5/24 --gateway 192.0.2.1 -- ip route
    Boots the template (as `vztt test` does), runs COMMAND once it is up,
    prints its output (stdout and stderr), powers off and removes everything.
    Exits with COMMAND's status; 8 if the template does not boot. --json (before
    `--`): {"name", "command", "status", "output", "steps"} instead of the output.

    With --ip, the container gets a link (eth0) to a network namespace of its own
    whose end holds the gateway (or the subnet's first free address), and the
    network files `vztt create` would write; without, loopback only.
    """
    from vztt.boot import test as boottest
    from vztt.netconfig.identity import validate_hostname
    given = raw_settings(net)
    validate_hostname(hostname)
    recipe, cache, chosen, files = _ready_to_boot(obj, name, "vztt run", fmt)
    progress = Progress(quiet=as_json)
    if unsafe_no_userns and not vm:
        progress.say("--unsafe-no-userns: no user namespace, the container's root is this host's root")
    status, output = boottest.run_command(recipe, cache, files, list(command), timeout, progress, vm=vm, fmt=chosen,
                                          given=given, hostname=hostname, userns=not unsafe_no_userns)
    if as_json:
        emit({"name": name, "command": list(command), "status": status, "output": output, "vm": vm,
              "format": chosen, "steps": dict(progress.timings)})
    else:
        click.echo(output, nl=False)
    sys.exit(status)
