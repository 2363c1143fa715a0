"""The container kernel: `vztt kernel check`, `build`, `info`."""

from __future__ import annotations

from pathlib import Path

import click

from vztt.base.progress import Progress
from vztt.cli.main import Context, emit, emit_report, guarded, json_option, main


def arch_option(fn):  # type: ignore[no-untyped-def]
    """--arch: which architecture's kernel (click's choice: an unknown one is a one-line usage error, exit 2)."""
    from vztt.kernel.kconfig import TARGETS, host_arch
    return click.option("--arch", type=click.Choice(sorted(TARGETS)), default=None,
                        help=f"The kernel's architecture, as uname -m names it [default: this host's, "
                             f"{host_arch()}]. Another one's is cross-compiled (aarch64 on x86_64: "
                             "CROSS_COMPILE=aarch64-linux-gnu-, from gcc-aarch64-linux-gnu).")(fn)


@main.group("kernel")
@click.option("--kernel-dir", type=click.Path(path_type=Path, file_okay=False), envvar="VZTT_KERNEL_DIR",
              help="The series, patches/, container.config and arch/*.config (default: the checkout's kernel/). "
                   "[env: VZTT_KERNEL_DIR]")
@click.pass_obj
def kernel_group(obj: Context, kernel_dir: Path | None) -> None:
    """The container kernel: Debian's linux-source-6.1, our patch series and config fragments.

    \b
      vztt kernel check    the series applies to the current Debian source; the fragments survive
      vztt kernel build    fetch the source package through apt, patch, configure, build bzImage
                           (x86_64) or Image (aarch64), cache it
      vztt kernel info     version, digests, the fragments' options and whether each survived
    Each takes --arch x86_64|aarch64 (default: this host's); the fragments are container.config
    (every architecture) and arch/<arch>.config; another architecture's kernel is cross-compiled.
    Builds are cached in <cache>/kernel (VZTT_KERNEL_CACHE), keyed by the source version, the
    architecture and the series and fragment digests; `vztt test --vm` boots a template with
    the one for the current kernel/ and the template's architecture.
    """
    from vztt.kernel import build as kernel
    obj.kernel_dir = kernel_dir or kernel.kernel_dir()


@kernel_group.command("check")
@click.option("--patches-only", is_flag=True, help="Only apply the series; do not configure.")
@arch_option
@json_option
@click.pass_obj
@guarded
def kernel_check(obj: Context, patches_only: bool, arch: str | None, as_json: bool) -> None:
    """Apply the series to a fresh copy of Debian's current kernel source (patch
    --fuzz=0, in order), then configure it for --arch (tinyconfig +
    container.config + arch/<arch>.config + olddefconfig) and check that every
    option of the fragments survived.

    A patch that does not apply is reported with its file and hunk; an option
    that olddefconfig dropped with its fragment file and what it depends on
    (an option the architecture does not have: "no such option"). Exit 6 if either.
    """
    from vztt.kernel import build as kernel
    report = kernel.check(obj.cache, obj.kernel_dir, Progress(quiet=as_json), config=not patches_only, arch=arch)
    error = report.error()
    if as_json:
        emit_report(report.as_dict(), error)
        return
    click.echo(f"{report.source.name} {report.source.version} for {report.target.arch}: series "
               f"{report.series_digest[7:19]}, fragments {report.fragment_digest[7:19]}")
    for p in report.patches:
        click.echo(f"  {p.name:<32} {'ok' if p.ok else 'FAILED'}  {', '.join(p.files)}")
        for line in p.problems:
            click.echo(f"      {line}")
        for line in p.notes:
            click.echo(f"      note: {line}")
    if report.config_checked:
        for name, _path in report.fragments:
            mine = [o for o in report.options if o.fragment == name]
            lost = [o for o in mine if not o.survived]
            click.echo(f"  {name:<32} {'ok' if not lost else 'FAILED'}  {len(mine)} options, "
                       f"{len(lost) or 'none'} dropped by olddefconfig")
            for o in lost:
                click.echo(f"      {o.name}={o.wanted} became {o.got}: {o.needs}")
    if error is not None:
        raise error


@kernel_group.command("build")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), help="make -j (default: the number of cores).")
@click.option("--allow-dropped", is_flag=True, help="Build even if fragment options did not survive olddefconfig.")
@arch_option
@json_option
@click.pass_obj
@guarded
def kernel_build(obj: Context, jobs: int | None, allow_dropped: bool, arch: str | None, as_json: bool) -> None:
    """Fetch the source package through apt, apply the series, merge the
    fragments over tinyconfig, build the kernel for --arch (bzImage for
    x86_64, Image for aarch64; cross-compiled when it is not this host's) and
    cache it. A second call with the same source, architecture, series and
    fragments builds nothing."""
    from vztt.kernel import build as kernel
    result = kernel.build(obj.cache, obj.kernel_dir, Progress(quiet=as_json), jobs=jobs, allow_dropped=allow_dropped,
                          arch=arch)
    info = result.entry.info
    if as_json:
        emit({**info, "built": result.built, "seconds": round(result.seconds, 1), "path": str(result.entry.path),
              "image_path": str(result.entry.image)})
        return
    click.echo(f"{result.entry.image}")
    click.echo(f"  kernel    {info['kernelrelease']} ({info['arch']}) from {info['source']['package']} "
               f"{info['source']['version']}")
    click.echo(f"  size      {info['image']['size'] / 1e6:.1f} MB   sha256 {info['image']['sha256'][:16]}...")
    click.echo(f"  {'built' if result.built else 'cached':<9} "
               + (f"in {result.seconds:.0f} s (compile {info['compile_seconds']:.0f} s with -j{info['jobs']})"
                  if result.built else f"{info['built_at']}: nothing to build"))


@kernel_group.command("info")
@arch_option
@json_option
@click.pass_obj
@guarded
def kernel_info(obj: Context, arch: str | None, as_json: bool) -> None:
    """The kernel for kernel/ as it is now and --arch: version, digests, and
    each option of the fragments with what olddefconfig made of it (dropped
    ones marked)."""
    from vztt.kernel import build as kernel, source as kernel_source
    from vztt.kernel.series import FRAGMENT
    entry, wanted = kernel.current(obj.cache, obj.kernel_dir, arch)
    doc = {"kernel_dir": str(obj.kernel_dir), "built": entry is not None, "wanted": wanted,
           **({**entry.info, "path": str(entry.path), "image_path": str(entry.image),
               "version_string": kernel.image_version(entry.image, entry.arch)} if entry else {})}
    if as_json:
        emit(doc)
        return
    source = wanted.get("source") or {}
    click.echo(f"kernel/      {obj.kernel_dir}")
    click.echo(f"arch         {wanted['arch']}")
    click.echo(f"source       {source.get('package', kernel_source.SOURCE_PACKAGE)} {source.get('version', '?')}"
               + (f"  ({wanted['source_error']})" if "source_error" in wanted else ""))
    click.echo(f"series       {wanted['series_digest']}")
    click.echo(f"fragments    {wanted['fragment_digest']}")
    if entry is None:
        click.echo(f"built        no (`vztt kernel build --arch {wanted['arch']}`)")
        return
    info = entry.info
    click.echo(f"built        {entry.image}  {info['built_at']}"
               + ("" if info["source"]["version"] == source.get("version") else
                  f"  (from {info['source']['version']}: an older source)"))
    click.echo(f"kernel       {info['kernelrelease']}, {info['image']['file']} {info['image']['size'] / 1e6:.1f} MB, "
               f"compiled in {info['compile_seconds']:.0f} s with -j{info['jobs']}")
    click.echo(f"version      {doc['version_string']}")
    click.echo(f"patches      {', '.join(info['patches']) or 'none'}")
    dropped = [o for o in info["options"] if not o["survived"]]
    click.echo(f"options      {len(info['options'])} in {', '.join(info['fragments'])}; "
               + (f"DROPPED by olddefconfig: {', '.join(o['name'] for o in dropped)}" if dropped
                  else "all survived olddefconfig"))
    width = max(len(o["name"]) for o in info["options"]) if info["options"] else 10
    for o in info["options"]:
        mark = "ok" if o["survived"] else "DROPPED"
        got = "" if o["survived"] else f" -> {o['got']}" + (f"  ({o['needs']})" if o.get("needs") else "")
        click.echo(f"  {o['name']:<{width}} {o['wanted']:<8} {mark}{got}" + (f"  [{o['fragment']}]" if o.get("fragment") != FRAGMENT else ""))
