"""Making templates and looking into them: `vztt build`, `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vztt import formats
from vztt.base.progress import Progress
from vztt.cli.main import (F, Context, FormatList, each_template, emit, format_summaries, guarded, json_option, main,
                           mirror_option, selected, selection)

FORMAT_HELP = (f"{format_summaries()}; {formats.ALL}: every format; or several, comma-separated "
               f"({','.join(formats.names())}). [default: the recipe's `format`]")

_build_options = [
    click.option("--locked", is_flag=True, help="Install exactly the lock file; fail if it is missing or stale."),
    click.option("--lock", "lock_path", type=click.Path(path_type=Path), help="Lock file to use/write."),
    click.option("--jobs", "-j", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel downloads."),
    click.option("--format", "fmt", type=FormatList(), help=FORMAT_HELP),
    click.option("--no-test", is_flag=True,
                 help="Promote without the boot test (the manifest records boot_test: skipped)."),
    click.option("--wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
                 help="Wait this long for a build of the same template, or a `vztt prune`, to finish "
                      "(default: refuse at once, naming who holds the lock)."),
]


def _with_build_options(fn: F) -> F:
    for opt in reversed(_build_options):
        fn = opt(fn)
    return fn


def build_report(obj: Context, result: Any) -> dict[str, Any]:
    """What --json says about one build (also `vztt update`'s `build`)."""
    m = result.manifest
    return {"name": result.name, "archive": str(result.archive), "manifest": str(result.manifest_path),
            "log": str(result.log), "sha256": m.archive.sha256, "size": m.archive.size,
            "archives": {k: str(obj.cache.path(a)) for k, a in m.archives.items()},
            "files": {k: [str(obj.cache.file(f.file)) for f in a.files] for k, a in m.archives.items()},
            "fetch": result.fetch, "boot_test": m.boot_test, "build_id": m.build_id,
            "lock_digest": m.lock_digest, "recipe_digest": m.recipe_digest, "package_count": m.package_count,
            "steps": m.steps, "build_seconds": m.build_seconds, "removed": result.removed}


def _print_build(obj: Context, result: Any) -> None:
    m = result.manifest
    for fmt_name, a in m.archives.items():
        click.echo(f"{obj.cache.path(a)}")
        for part in a.parts:
            click.echo(f"{obj.cache.file(part.file)}")
        click.echo(f"  size      {a.total_size / 1e6:.1f} MB ({formats.get(fmt_name).describe(a)})")
        click.echo(f"  sha256    {a.sha256}")
    click.echo(f"  manifest  {result.manifest_path}")
    click.echo(f"  packages  {m.package_count}   lock {m.lock_digest[:19]}...")
    click.echo(f"  boot test {_boot_test_line(m.boot_test)}")
    click.echo(f"  took      {m.build_seconds} s")


def _boot_test_line(record: dict[str, Any]) -> str:
    if record.get("result") != "passed":
        return " ".join(str(x) for x in (record.get("result", "skipped"), record.get("reason", ""))).strip()
    return f"passed: {len(record['checks'])} checks, checks done {record['ready_seconds']} s after start"


@main.command()
@selection
@_with_build_options
@click.option("--build-base", is_flag=True,
              help="A layered template (recipe `base`) whose base is not in the cache: build the base first.")
@mirror_option
@json_option
@click.pass_obj
@guarded
def build(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, arch: str | None, locked: bool,
          lock_path: Path | None, jobs: int, fmt: str | None, no_test: bool, wait: float, build_base: bool,
          as_json: bool) -> None:
    """Build templates into the cache: NAME..., or --all (optionally --arch ARCH, --shard K/N).

    \b
    Steps (timed on stderr):
      resolve    lock the package set (skipped with --locked)
      fetch      download what the package cache lacks, in parallel, verified
      base       a layered template (recipe `base`): unpack the base's promoted build, sha256 checked
      install    install into a temporary loop-mounted ext4 image (hooks of phases before-packages,
                 after-base run here)
      customize  the recipe's files and hooks
      clean      drop caches, logs, machine-id
      pack       reproducible tar, lz4
      ploop      ext4 disk -> ploop v2 image -> Virtuozzo cache tar, lz4 (format ploop)
      lxc        rootfs.tar.xz + meta.tar.xz for LXC (format lxc)
      incus      rootfs.squashfs + incus.tar.xz for Incus and LXD (format incus)
      oci        OCI image layout tar for podman and skopeo (format oci)
      nspawn     <name>.tar.xz for systemd-pull / machinectl (format nspawn)
      test       boot the packed archive in a container, run its checks (`vztt test`);
                 test-ploop the same from the ploop cache's own disk;
                 a template that fails stays as <file>-failed, with its report
      promote    atomically replace the cached template (the old one stays until then)
    """
    from vztt.builder import pipeline
    chosen = selected(obj, names, all_, shard_spec, arch)
    if lock_path and len(chosen) > 1:
        raise click.UsageError("--lock names one lock file: build one template with it")
    mirrors = obj.mirrors()
    progress = Progress(quiet=as_json)

    def one(name: str) -> dict[str, Any]:
        recipe = obj.store.load(name)
        for base in _missing_bases(obj, recipe) if build_base else []:
            progress.say(f"building {base} (the base of {name}, not in the cache)")
            pipeline.build(obj.store.load(base), obj.cache, mirrors, pipeline.BuildOptions(
                jobs=jobs, format=fmt, test=not no_test, wait=wait), progress)
        progress.say(f"building {name}")
        result = pipeline.build(recipe, obj.cache, mirrors, pipeline.BuildOptions(
            locked=locked, lock_path=lock_path, jobs=jobs, format=fmt, test=not no_test, wait=wait), progress)
        if not as_json:
            _print_build(obj, result)
        return build_report(obj, result)

    results = each_template(chosen, as_json, one)
    if as_json:
        emit(results[0] if len(results) == 1 and names else results)


def _missing_bases(obj: Context, recipe: Any) -> list[str]:
    """The bases under a layer that the cache lacks, the lowest first."""
    missing: list[str] = []
    while recipe.base_template and obj.cache.entry(recipe.base_template) is None:
        missing.insert(0, recipe.base_template)
        recipe = obj.store.load(recipe.base_template)
    return missing


def _readable_formats() -> str:
    """`plain (.plain.tar.lz4) and ploop (.plain.ploopv2.tar.lz4)`: what inspect reads."""
    named = [f"{name} (.{formats.get(name).suffix})" for name in formats.names()]
    return " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)


INSPECT_HELP = f"""Say what a template archive holds: format, members, disk size, clusters used, packages.

    Reads {_readable_formats()} caches, and
    checks what it reads: a damaged archive or ploop image is a one-line error (exit 6).
    """


@main.command(help=INSPECT_HELP)
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@click.pass_obj
@guarded
def inspect(obj: Context, file: Path, as_json: bool) -> None:
    # The format is the registry's: each format reads and checks its own files.
    with obj.cache.scratch("inspect") as work:
        info = formats.format_of_file(file).inspect(file, work)
    if as_json:
        emit(info.as_dict())
        return
    for line in info.text_lines():
        click.echo(line)
