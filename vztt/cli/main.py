"""The `vztt` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from vztt import __version__

from vztt.recipe import variables as mirrors_mod
from vztt.store.templates import TemplateCache
from vztt.base.errors import EXIT_CODES, Interrupted, VzttError
from vztt.base.paths import default_recipes
from vztt.base.progress import Progress
from vztt.recipe.recipe import RecipeStore
from vztt.recipe.settings import SETTINGS, reference_markdown


EPILOG = "\b\nExit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES) + """

\b
Environment:
  VZTT_CACHE            cache root (default: ./cache in a checkout)
  VZTT_PACKAGE_CACHE    shared package cache (default: <cache>/packages)
  VZTT_RECIPES          recipes directory (default: ./recipes in a checkout)
  VZTT_MIRROR_<NAME>    value of the mirror variable $<NAME>
  VZTT_KERNEL_DIR       the kernel's series, patches and fragment (default: ./kernel in a checkout)
  VZTT_KERNEL_CACHE     built kernels and the kernel source (default: <cache>/kernel)
  VZTT_VM_ACCEL         kvm, tcg or auto (default): the accelerator of `vztt test --vm`
"""


class Context:
    def __init__(self, cache_dir: Path | None, recipes: Path | None, mirror: tuple[str, ...]):
        self._cache_dir = cache_dir
        self.recipes_dir = recipes or default_recipes()
        self.mirror_args = mirror

    @property
    def store(self) -> RecipeStore:
        return RecipeStore(self.recipes_dir)

    @property
    def cache(self) -> TemplateCache:
        return TemplateCache(self._cache_dir)

    def mirrors(self) -> mirrors_mod.Mirrors:
        return mirrors_mod.load(self.mirror_args)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def _emit_report(doc: dict[str, Any], error: VzttError | None) -> None:
    """--json for a command whose report is the answer even when it fails:
    the report on stdout, then (on failure) the one-line error and its exit."""
    _emit(doc)
    if error is not None:
        click.echo(f"vztt: {error.kind} error: {error}", err=True)
        sys.exit(error.exit_code)


def _fail(err: VzttError, as_json: bool) -> NoReturn:
    if as_json:
        _emit({"error": {"kind": err.kind, "message": str(err), "exit_code": err.exit_code}})
    click.echo(f"vztt: {err.kind} error: {err}", err=True)
    sys.exit(err.exit_code)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Unwind like Ctrl-C, so every finally: block unmounts and removes temp files.
    raise KeyboardInterrupt


def guarded(fn):  # type: ignore[no-untyped-def]
    """Turn expected failures into one line and an exit status."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except VzttError as e:
            _fail(e, as_json)
        except KeyboardInterrupt:
            _fail(Interrupted("interrupted; mounts, loop devices and temporary files were cleaned up"), as_json)
    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of text.")


def _add_mirrors(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    if value and isinstance(ctx.obj, Context):
        ctx.obj.mirror_args = tuple(ctx.obj.mirror_args) + tuple(value)
    return value


# --mirror is accepted before and after the command name: `vztt build NAME --mirror X=URL`.
mirror_option = click.option("--mirror", "sub_mirror", multiple=True, metavar="NAME=URL", expose_value=False,
                             callback=_add_mirrors, help="Set a mirror variable for this run (repeatable).")


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vztt")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="VZTT_CACHE",
              help="Cache root: templates, locks, package cache. [env: VZTT_CACHE]")
@click.option("--recipes", type=click.Path(path_type=Path), envvar="VZTT_RECIPES",
              help="Recipes directory. [env: VZTT_RECIPES]")
@click.option("--mirror", multiple=True, metavar="NAME=URL",
              help="Set a mirror variable for this run, e.g. --mirror DEBIAN_MIRROR=file:///srv/debian (repeatable).")
@click.pass_context
def main(ctx: click.Context, cache_dir: Path | None, recipes: Path | None, mirror: tuple[str, ...]) -> None:
    """Build OS templates: recipe -> lock -> packages -> image -> cached .tar.lz4.

    \b
    A typical session:
      vztt list                                   # recipes, cached or not
      vztt show debian-12-x86_64-minimal          # the merged recipe, and which file set what
      vztt resolve debian-12-x86_64-minimal       # write the lock, show what changed
      vztt build debian-12-x86_64-minimal         # resolve, fetch, install, pack, promote
      vztt build debian-12-x86_64-minimal --locked   # exactly the lock, no re-resolve

    Mirrors are variables ($DEBIAN_MIRROR, ...) set in /etc/vztt/mirrors.toml,
    ~/.config/vztt/mirrors.toml, VZTT_MIRROR_<NAME> or --mirror; Debian's default
    comes from the host's apt sources. `vztt mirrors` shows them.
    """
    ctx.obj = Context(cache_dir, recipes, mirror)


@main.command("list")
@json_option
@click.pass_obj
@guarded
def list_cmd(obj: Context, as_json: bool) -> None:
    """List buildable recipes, whether each is cached, and when it was built."""
    store, cache = obj.store, obj.cache
    rows = []
    for name in store.names():
        recipe = store.load(name)
        entry = cache.entry(name)
        rows.append({
            "name": name, "distro": recipe.distro, "version": recipe.version, "arch": recipe.arch,
            "summary": recipe.summary, "cached": entry is not None,
            "created": entry.data.get("created") if entry else None,
            "archive": str(entry.archive) if entry else None,
            "size": entry.data["archive"]["size"] if entry else None,
            "current": bool(entry and entry.data.get("recipe_digest") == recipe.digest()),
        })
    if as_json:
        _emit(rows)
        return
    width = max([len(r["name"]) for r in rows] + [4])
    click.echo(f"{'NAME':<{width}}  {'STATE':<8}  {'BUILT':<25}  SUMMARY")
    for r in rows:
        state = ("cached" if r["current"] else "stale") if r["cached"] else "-"
        click.echo(f"{r['name']:<{width}}  {state:<8}  {r['created'] or '-':<25}  {r['summary']}")


@main.command()
@click.argument("name")
@json_option
@click.pass_obj
@guarded
def show(obj: Context, name: str, as_json: bool) -> None:
    """Show the merged recipe NAME after inheritance, and the file each setting came from."""
    store = obj.store
    recipe = store.load(name, allow_abstract=True)
    values = {s.key: recipe.merged.get(s.key) for s in SETTINGS}
    if as_json:
        _emit({"name": name, "chain": [str(p) for p in recipe.chain], "digest": recipe.digest(),
               "settings": values, "origins": {k: str(v) for k, v in recipe.origins.items()}})
        return
    click.echo(f"# {name}: " + " <- ".join(p.name for p in recipe.chain))
    click.echo(f"# digest {recipe.digest()}")
    base = store.directory
    for s in SETTINGS:
        value = values[s.key]
        origin = recipe.origins.get(s.key)
        where = os.path.relpath(origin, base) if origin else "default"
        if s.type == "records":
            click.echo(f"{s.key}:  ({where})")
            for rec in value or []:
                click.echo("  - " + ", ".join(f"{k}={_short(v)}" for k, v in rec.items()))
        else:
            click.echo(f"{s.key} = {json.dumps(value)}  ({where})")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "...\""


@main.command()
@click.argument("name")
@click.option("--lock", "lock_path", type=click.Path(path_type=Path),
              help="Lock file to write (default: <cache>/locks/NAME.lock.json).")
@mirror_option
@json_option
@click.pass_obj
@guarded
def resolve(obj: Context, name: str, lock_path: Path | None, as_json: bool) -> None:
    """Resolve NAME's packages with the distro's solver and write its lock file.

    Prints what changed against the previous lock: + added, - removed, ~ changed.
    """
    from vztt.build import pipeline as build_mod
    recipe = obj.store.load(name)
    result = build_mod.resolve(recipe, obj.cache, obj.mirrors(), lock_path, Progress(quiet=as_json))
    if as_json:
        _emit({"name": name, "lock": str(result.lock_path), "lock_digest": result.lock.digest,
               "packages": len(result.lock.packages), "changes": result.diff.as_dict()})
        return
    click.echo(f"{result.lock_path}: {len(result.lock.packages)} packages")
    if result.previous is None:
        click.echo("(no previous lock)")
    elif result.diff.empty:
        click.echo("no changes")
    for line in result.diff.lines() if result.previous else []:
        click.echo(line)


def _names(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None) -> list[str]:
    """The templates a command works on: NAMES, or --all, cut to this runner's --shard."""
    from vztt.nightly import shard
    if all_ and names:
        raise click.UsageError("give template names or --all, not both")
    if not all_ and not names:
        raise click.UsageError("name a template (see `vztt list`) or pass --all")
    return shard(list(names) if names else obj.store.names(), shard_spec)


selection_options = [
    click.argument("names", nargs=-1, metavar="[NAME]..."),
    click.option("--all", "all_", is_flag=True, help="Every buildable recipe."),
    click.option("--shard", "shard_spec", metavar="K/N",
                 help="Only this runner's share of the templates: the K-th of N, deterministic (e.g. 2/4)."),
]


def _selection(fn):  # type: ignore[no-untyped-def]
    for opt in reversed(selection_options):
        fn = opt(fn)
    return fn


build_options = [
    click.option("--locked", is_flag=True, help="Install exactly the lock file; fail if it is missing or stale."),
    click.option("--lock", "lock_path", type=click.Path(path_type=Path), help="Lock file to use/write."),
    click.option("--jobs", "-j", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel downloads."),
    click.option("--format", "fmt", type=click.Choice(["plain", "ploop", "all"]),
                 help="plain: <name>.plain.tar.lz4; ploop: Virtuozzo 7 <name>.plain.ploopv2.tar.lz4; all: both. "
                      "[default: the recipe's `format`]"),
    click.option("--no-test", is_flag=True,
                 help="Promote without the boot test (the manifest records boot_test: skipped)."),
    click.option("--wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
                 help="Wait this long for a build of the same template, or a `vztt prune`, to finish "
                      "(default: refuse at once, naming who holds the lock)."),
]


def _build_options(fn):  # type: ignore[no-untyped-def]
    for opt in reversed(build_options):
        fn = opt(fn)
    return fn


def _build_report(obj: Context, result: Any) -> dict[str, Any]:
    m = result.manifest
    return {"name": result.name, "archive": str(result.archive), "manifest": str(result.manifest_path),
            "log": str(result.log), "sha256": m["archive"]["sha256"], "size": m["archive"]["size"],
            "archives": {k: str(obj.cache.root / a["file"]) for k, a in m["archives"].items()},
            "fetch": result.fetch, "boot_test": m.get("boot_test"), "build_id": m.get("build_id"),
            **{k: m[k] for k in ("lock_digest", "recipe_digest", "package_count", "steps", "build_seconds")}}


def _print_build(obj: Context, result: Any) -> None:
    m = result.manifest
    for fmt_name, a in m["archives"].items():
        click.echo(f"{obj.cache.root / a['file']}")
        extra = (f"{a['tar_size'] / 1e6:.1f} MB uncompressed" if fmt_name == "plain"
                 else f"ploop disk {a['disk_size'] >> 30} GiB, {a['clusters']} clusters")
        click.echo(f"  size      {a['size'] / 1e6:.1f} MB ({extra})")
        click.echo(f"  sha256    {a['sha256']}")
    click.echo(f"  manifest  {result.manifest_path}")
    click.echo(f"  packages  {m['package_count']}   lock {m['lock_digest'][:19]}...")
    click.echo(f"  boot test {_boot_test_line(m.get('boot_test') or {})}")
    click.echo(f"  took      {m['build_seconds']} s")


def _each(names: list[str], as_json: bool, one: Any) -> list[Any]:
    """Run `one(name)` for every template; a failure is reported and the rest still run.
    The exit status is the first failure's."""
    results, first_error = [], None
    for name in names:
        try:
            results.append(one(name))
        except VzttError as e:
            if len(names) == 1:
                raise
            click.echo(f"vztt: {e.kind} error: {e}", err=True)
            results.append({"name": name, "error": {"kind": e.kind, "message": str(e), "exit_code": e.exit_code}})
            first_error = first_error or e
    if first_error is not None:
        if as_json:
            _emit(results)
        sys.exit(first_error.exit_code)
    return results


@main.command()
@_selection
@_build_options
@mirror_option
@json_option
@click.pass_obj
@guarded
def build(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, locked: bool,
          lock_path: Path | None, jobs: int, fmt: str | None, no_test: bool, wait: float, as_json: bool) -> None:
    """Build templates into the cache: NAME..., or --all (optionally --shard K/N).

    \b
    Steps (timed on stderr):
      resolve    lock the package set (skipped with --locked)
      fetch      download what the package cache lacks, in parallel, verified
      install    install into a temporary loop-mounted ext4 image
      customize  the recipe's files and hooks
      clean      drop caches, logs, machine-id
      pack       reproducible tar, lz4
      ploop      ext4 disk -> ploop v2 image -> Virtuozzo cache tar, lz4 (format ploop)
      test       boot the packed archive in a container, run its checks (`vztt test`);
                 a template that fails stays as <file>-failed, with its report
      promote    atomically replace the cached template (the old one stays until then)
    """
    from vztt.build import pipeline as build_mod
    selected = _names(obj, names, all_, shard_spec)
    if lock_path and len(selected) > 1:
        raise click.UsageError("--lock names one lock file: build one template with it")
    mirrors = obj.mirrors()
    progress = Progress(quiet=as_json)

    def one(name: str) -> dict[str, Any]:
        recipe = obj.store.load(name)
        progress.say(f"building {name}")
        result = build_mod.build(recipe, obj.cache, mirrors, build_mod.BuildOptions(
            locked=locked, lock_path=lock_path, jobs=jobs, format=fmt, test=not no_test, wait=wait), progress)
        if not as_json:
            _print_build(obj, result)
        return _build_report(obj, result)

    results = _each(selected, as_json, one)
    if as_json:
        _emit(results[0] if len(results) == 1 and names else results)


def _boot_test_line(record: dict[str, Any]) -> str:
    if record.get("result") != "passed":
        return " ".join(str(x) for x in (record.get("result", "skipped"), record.get("reason", ""))).strip()
    return f"passed: {len(record['checks'])} checks, checks done {record['ready_seconds']} s after start"


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
    from vztt.base.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    archive = boottest.cached_archive(cache, name)
    boottest.prepare_host(cache, "vztt test")
    enter_private_namespace()      # the overlay mount dies with us, whatever happens
    progress = Progress(quiet=as_json)
    progress.say(f"testing {archive}" + (" in a VM" if vm else ""))
    report = boottest.boot_test(recipe, cache, archive, progress, vm=vm)
    if junit:
        bootreport.write_junit(report, junit)
    error = report.exception()
    if as_json:
        _emit_report(report.as_dict(), error)
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
@click.pass_obj
@guarded
def run_cmd(obj: Context, name: str, command: tuple[str, ...], timeout: float, vm: bool) -> None:
    """Run COMMAND in a throwaway container of the cached template NAME.

    \b
      vztt run debian-12-x86_64-minimal -- cat /etc/os-release
    Boots the template (as `vztt test` does), runs COMMAND once it is up,
    prints its output (stdout and stderr), powers off and removes everything.
    Exits with COMMAND's status; 8 if the template does not boot.
    """
    from vztt.boot import test as boottest
    from vztt.base.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    archive = boottest.cached_archive(cache, name)
    boottest.prepare_host(cache, "vztt run")
    enter_private_namespace()
    status, output = boottest.run_command(recipe, cache, archive, list(command), timeout, Progress(), vm=vm)
    click.echo(output, nl=False)
    sys.exit(status)


# -- the container kernel (vztt/kernel.py, kernel/) ---------------------------------

@main.group("kernel")
@click.option("--kernel-dir", type=click.Path(path_type=Path, file_okay=False), envvar="VZTT_KERNEL_DIR",
              help="The series, patches/ and container.config (default: the checkout's kernel/). "
                   "[env: VZTT_KERNEL_DIR]")
@click.pass_obj
def kernel_group(obj: Context, kernel_dir: Path | None) -> None:
    """The container kernel: Debian's linux-source-6.1, our patch series and config fragment.

    \b
      vztt kernel check    the series applies to the current Debian source; the fragment survives
      vztt kernel build    fetch the source package through apt, patch, configure, build bzImage, cache
      vztt kernel info     version, digests, the fragment's options and whether each survived
    Builds are cached in <cache>/kernel (VZTT_KERNEL_CACHE), keyed by the source version and the
    series and fragment digests; `vztt test --vm` boots the one for the current kernel/.
    """
    from vztt.kernel import build as kernel
    obj.kernel_dir = kernel_dir or kernel.kernel_dir()


@kernel_group.command("check")
@click.option("--patches-only", is_flag=True, help="Only apply the series; do not configure.")
@json_option
@click.pass_obj
@guarded
def kernel_check(obj: Context, patches_only: bool, as_json: bool) -> None:
    """Apply the series to a fresh copy of Debian's current kernel source (patch
    --fuzz=0, in order), then configure it (tinyconfig + container.config +
    olddefconfig) and check that every option of the fragment survived.

    A patch that does not apply is reported with its file and hunk; an option
    that olddefconfig dropped with what it depends on. Exit 6 if either.
    """
    from vztt.kernel import build as kernel
    report = kernel.check(obj.cache, obj.kernel_dir, Progress(quiet=as_json), config=not patches_only)
    error = report.error()
    if as_json:
        _emit_report(report.as_dict(), error)
        return
    click.echo(f"{report.source.name} {report.source.version}: series {report.series_digest[7:19]}, "
               f"fragment {report.fragment_digest[7:19]}")
    for p in report.patches:
        click.echo(f"  {p.name:<32} {'ok' if p.ok else 'FAILED'}  {', '.join(p.files)}")
        for line in p.problems:
            click.echo(f"      {line}")
        for line in p.notes:
            click.echo(f"      note: {line}")
    if report.config_checked:
        dropped = [o for o in report.options if not o.survived]
        click.echo(f"  {kernel.FRAGMENT:<32} {'ok' if not dropped else 'FAILED'}  {len(report.options)} options, "
                   f"{len(dropped) or 'none'} dropped by olddefconfig")
        for o in dropped:
            click.echo(f"      {o.name}={o.wanted} became {o.got}: {o.needs}")
    if error is not None:
        raise error


@kernel_group.command("build")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), help="make -j (default: the number of cores).")
@click.option("--allow-dropped", is_flag=True, help="Build even if fragment options did not survive olddefconfig.")
@json_option
@click.pass_obj
@guarded
def kernel_build(obj: Context, jobs: int | None, allow_dropped: bool, as_json: bool) -> None:
    """Fetch the source package through apt, apply the series, merge the
    fragment over tinyconfig, build bzImage and cache it. A second call with
    the same source, series and fragment builds nothing."""
    from vztt.kernel import build as kernel
    result = kernel.build(obj.cache, obj.kernel_dir, Progress(quiet=as_json), jobs=jobs, allow_dropped=allow_dropped)
    info = result.entry.info
    if as_json:
        _emit({**info, "built": result.built, "seconds": round(result.seconds, 1), "path": str(result.entry.path),
               "bzimage_path": str(result.entry.bzimage)})
        return
    click.echo(f"{result.entry.bzimage}")
    click.echo(f"  kernel    {info['kernelrelease']} from {info['source']['package']} {info['source']['version']}")
    click.echo(f"  size      {info['bzImage']['size'] / 1e6:.1f} MB   sha256 {info['bzImage']['sha256'][:16]}...")
    click.echo(f"  {'built' if result.built else 'cached':<9} "
               + (f"in {result.seconds:.0f} s (compile {info['compile_seconds']:.0f} s with -j{info['jobs']})"
                  if result.built else f"{info['built_at']}: nothing to build"))


@kernel_group.command("info")
@json_option
@click.pass_obj
@guarded
def kernel_info(obj: Context, as_json: bool) -> None:
    """The kernel for kernel/ as it is now: version, digests, and each option
    of the fragment with what olddefconfig made of it (dropped ones marked)."""
    from vztt.kernel import build as kernel, source as kernel_source
    entry, wanted = kernel.current(obj.cache, obj.kernel_dir)
    doc = {"kernel_dir": str(obj.kernel_dir), "built": entry is not None, "wanted": wanted,
           **({**entry.info, "path": str(entry.path), "bzimage_path": str(entry.bzimage),
               "version_string": kernel.bzimage_version(entry.bzimage)} if entry else {})}
    if as_json:
        _emit(doc)
        return
    source = wanted.get("source") or {}
    click.echo(f"kernel/      {obj.kernel_dir}")
    click.echo(f"source       {source.get('package', kernel_source.SOURCE_PACKAGE)} {source.get('version', '?')}"
               + (f"  ({wanted['source_error']})" if "source_error" in wanted else ""))
    click.echo(f"series       {wanted['series_digest']}")
    click.echo(f"fragment     {wanted['fragment_digest']}")
    if entry is None:
        click.echo("built        no (`vztt kernel build`)")
        return
    info = entry.info
    click.echo(f"built        {entry.bzimage}  {info['built_at']}"
               + ("" if info["source"]["version"] == source.get("version") else
                  f"  (from {info['source']['version']}: an older source)"))
    click.echo(f"kernel       {info['kernelrelease']}, bzImage {info['bzImage']['size'] / 1e6:.1f} MB, "
               f"compiled in {info['compile_seconds']:.0f} s with -j{info['jobs']}")
    click.echo(f"version      {doc['version_string']}")
    click.echo(f"patches      {', '.join(info['patches']) or 'none'}")
    dropped = [o for o in info["options"] if not o["survived"]]
    click.echo(f"options      {len(info['options'])} in {kernel.FRAGMENT}; "
               + (f"DROPPED by olddefconfig: {', '.join(o['name'] for o in dropped)}" if dropped
                  else "all survived olddefconfig"))
    width = max(len(o["name"]) for o in info["options"]) if info["options"] else 10
    for o in info["options"]:
        mark = "ok" if o["survived"] else "DROPPED"
        got = "" if o["survived"] else f" -> {o['got']}" + (f"  ({o['needs']})" if o.get("needs") else "")
        click.echo(f"  {o['name']:<{width}} {o['wanted']:<8} {mark}{got}")


@main.command()
@mirror_option
@json_option
@click.pass_obj
@guarded
def mirrors(obj: Context, as_json: bool) -> None:
    """Show the mirror variables and where each value comes from."""
    m = obj.mirrors()
    if as_json:
        _emit({k: {"url": v, "from": m.origin[k]} for k, v in sorted(m.values.items())})
        return
    for k, v in sorted(m.values.items()):
        click.echo(f"{k:<24} {v}   ({m.origin[k]})")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the reference as Markdown (docs/recipes.md).")
@guarded
def settings(markdown: bool) -> None:
    """The recipe settings: every key, its type, default and meaning."""
    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    for s in SETTINGS:
        click.echo(f"{s.key:<18} {s.toml_type:<16} {s.doc}")
        for f in s.fields:
            click.echo(f"  {f.key:<16} {f.toml_type:<16} {f.doc}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@click.pass_obj
@guarded
def inspect(obj: Context, file: Path, as_json: bool) -> None:
    """Say what a template archive holds: format, members, disk size, clusters used, packages.

    Reads plain (.plain.tar.lz4) and ploop (.plain.ploopv2.tar.lz4) caches, and
    checks what it reads: a damaged archive or ploop image is a one-line error (exit 6).
    """
    from vztt.formats.vzcache import inspect as inspect_archive
    work = obj.cache.root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    info = inspect_archive(file, work)
    if as_json:
        _emit(info.as_dict())
        return
    click.echo(f"{info.path}")
    click.echo(f"  format    {info.format}")
    click.echo(f"  members   {info.members} ({info.tar_size / 1e6:.1f} MB of file data)")
    click.echo(f"  packages  {info.packages if info.packages is not None else 'unknown'}")
    if info.format == "ploop":
        assert info.disk_size is not None and info.cluster_size is not None and info.clusters_used is not None
        click.echo(f"  disk      {info.disk_size / 2**30:.1f} GiB, cluster {info.cluster_size >> 10} KiB, "
                   f"{info.clusters_used} clusters used ({info.clusters_used * info.cluster_size / 1e6:.0f} MB)")
        for n in info.member_names:
            click.echo(f"    {n}")


# --------------------------------------------------------------------------
# The nightly job: status, update, diff, matrix, prune
# --------------------------------------------------------------------------

@main.command()
@_selection
@mirror_option
@json_option
@click.pass_obj
@guarded
def status(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, as_json: bool) -> None:
    """Is each template up to date? Resolves afresh (the lock file is left alone) and compares.

    Exit status 2 when any template would change (as `vzpkg status`), 0 when all are current.
    """
    from vztt import nightly
    mirrors, progress = obj.mirrors(), Progress(quiet=True)
    results = _each(_names(obj, names, all_, shard_spec), as_json,
                    lambda n: nightly.status(obj.store.load(n), obj.cache, mirrors, progress))
    if as_json:
        _emit([r.as_dict() for r in results])
    else:
        for r in results:
            click.echo(f"{r.name}: {r.state}" + (f" ({'; '.join(r.reasons)})" if r.reasons else ""))
            for c in r.changes:
                click.echo(f"  {c.line()}")
    if any(r.state != nightly.CURRENT for r in results):
        sys.exit(2)


@main.command()
@_selection
@click.option("--format", "fmt", type=click.Choice(["plain", "ploop", "all"]), help="As for `vztt build`.")
@click.option("--no-test", is_flag=True, help="Promote without the boot test.")
@click.option("--wait", type=click.FloatRange(0), default=0, metavar="SECONDS", help="As for `vztt build`.")
@mirror_option
@json_option
@click.pass_obj
@guarded
def update(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, fmt: str | None,
           no_test: bool, wait: float, as_json: bool) -> None:
    """Re-resolve, then rebuild, boot-test and promote only the templates that changed.

    Says why each rebuild happens (recipe changed, packages changed, not built yet).
    """
    from vztt.build import pipeline as build_mod
    from vztt import nightly
    mirrors, progress = obj.mirrors(), Progress(quiet=as_json)
    options = build_mod.BuildOptions(format=fmt, test=not no_test, wait=wait)

    def one(name: str) -> dict[str, Any]:
        st, result = nightly.update(obj.store.load(name), obj.cache, mirrors, progress, options)
        if not as_json:
            why = "; ".join(st.reasons)
            click.echo(f"{name}: {'rebuilt (' + why + ')' if result else 'up to date'}")
            for c in st.changes:
                click.echo(f"  {c.line()}")
        return {**st.as_dict(), "rebuilt": result is not None,
                "build": _build_report(obj, result) if result else None}

    results = _each(_names(obj, names, all_, shard_spec), as_json, one)
    if as_json:
        _emit(results)


@main.command("diff")
@click.argument("name")
@json_option
@click.pass_obj
@guarded
def diff_cmd(obj: Context, name: str, as_json: bool) -> None:
    """The newest build of NAME against the one before it: packages added, removed, upgraded; sizes."""
    from vztt import nightly
    d = nightly.diff(obj.cache, name)
    if as_json:
        _emit(d)
        return
    click.echo(f"{name}: {d['old']} -> {d['new']}")
    for line in d["lines"] or ["no package changes"]:
        click.echo(f"  {line}")
    for fmt, size in d["sizes"].items():
        if size["old"] is not None and size["new"] is not None:
            click.echo(f"  {fmt} archive: {size['old'] / 1e6:.1f} MB -> {size['new'] / 1e6:.1f} MB "
                       f"({(size['new'] - size['old']) / 1e6:+.1f} MB)")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["github", "gitlab", "json"]), default="json", show_default=True,
              help="github: JSON for `strategy.matrix` (also written to $GITHUB_OUTPUT as `matrix`); "
                   "gitlab: a child pipeline with one job per template; json: a list of names.")
@click.pass_obj
@guarded
def matrix(obj: Context, fmt: str) -> None:
    """The CI matrix: one job per buildable template."""
    from vztt import nightly
    text = nightly.matrix(obj.store.names(), fmt)
    if fmt == "github":
        nightly.write_github_output("matrix", text)
    click.echo(text)


@main.command()
@click.option("--wait", type=click.FloatRange(0), default=0, metavar="SECONDS",
              help="Wait this long for running builds to finish with the package cache.")
@json_option
@click.pass_obj
@guarded
def prune(obj: Context, wait: float, as_json: bool) -> None:
    """Remove packages no lock in the cache refers to (locks/ and history/)."""
    from vztt.recipe.lock import Lock
    from vztt.store.packages import PackageCache
    cache = obj.cache
    keep: set[str] = set()
    for path in list((cache.root / "locks").glob("*.lock.json")) + list((cache.root / "history").glob("*/*.lock.json")):
        keep |= {p.sha256 for p in Lock.read(path).packages}
    packages = PackageCache(cache.packages_dir)
    with packages.locked(exclusive=True, timeout=wait):
        files, size = packages.prune(keep)
    if as_json:
        _emit({"removed_files": files, "removed_bytes": size, "kept": len(keep)})
    else:
        click.echo(f"removed {files} packages ({size / 1e6:.1f} MB); {len(keep)} referenced packages kept")


# --------------------------------------------------------------------------
# Template mirrors: publish, pull, create (vztt/mirror.py, vztt/create.py)
# --------------------------------------------------------------------------

def _parse_size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from vztt.recipe.recipe import parse_size
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 10G, 512M)") from None
    if size <= 0:
        raise click.BadParameter("must be more than 0")
    return size


keyring_option = click.option(
    "--keyring", "keyrings", multiple=True, type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
    help="Trusted OpenPGP key(s) the mirror's index must be signed with: a binary keyring or an armored key "
         "(repeatable). [env: VZTT_KEYRING, colon-separated; default: /etc/vztt/trusted.gpg, /etc/vztt/trusted.gpg.d/]")
from_option = click.option(
    "--from", "mirror_urls", multiple=True, metavar="URL",
    help="Template mirror: http(s):// URL, file:///path or a directory (repeatable: tried in order, the next "
         "on failure). [env: VZTT_TEMPLATE_MIRRORS, space-separated; default: /etc/vztt/template-mirrors.list]")


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--to", "dest", required=True, metavar="DIR|URL",
              help="The mirror: a directory (or file:///path) a web server serves, or a WebDAV http(s):// URL.")
@click.option("--sign-key", "--key", "sign_key", required=True, envvar="VZTT_SIGN_KEY", metavar="KEY",
              help="gpg key (fingerprint, id or user id) that signs index.json. [env: VZTT_SIGN_KEY]")
@click.option("--keep", type=click.IntRange(0), default=3, show_default=True, envvar="VZTT_PUBLISH_KEEP",
              help="Newest builds kept per published template; older ones are deleted after the new index "
                   "is in place (0: keep all). [env: VZTT_PUBLISH_KEEP]")
@click.option("--allow-untested", is_flag=True,
              help="Also publish templates whose boot test was skipped (the index says so). "
                   "A failed boot test is always refused.")
@keyring_option
@json_option
@click.pass_obj
@guarded
def publish(obj: Context, names: tuple[str, ...], dest: str, sign_key: str, keep: int, allow_untested: bool,
            keyrings: tuple[Path, ...], as_json: bool) -> None:
    """Publish cached templates (NAME..., default: all) to a mirror, with a signed index.

    \b
    Uploads only what the mirror lacks (by sha256): archives, then manifests,
    then index.json.asc and index.json, each under a temporary name renamed
    (directory) or MOVEd (WebDAV) into place. WebDAV credentials:
    VZTT_PUBLISH_USER / VZTT_PUBLISH_PASSWORD, else netrc.
    The mirror's current index must verify against the signing key (or a
    --keyring key) before it is re-signed. Exit 11: a template failed its boot
    test, or skipped it without --allow-untested; nothing was uploaded.
    """
    from vztt.mirror import mirror
    progress = Progress(quiet=as_json)
    result = mirror.publish(obj.cache, list(names), dest, mirror.PublishOptions(
        sign_key=sign_key, keep=keep, allow_untested=allow_untested, keyrings=keyrings), progress)
    if as_json:
        _emit(result.as_dict())
        return
    for p in result.published:
        click.echo(f"{p['name']} {p['id']}: {len(p['uploaded'])} files uploaded ({p['bytes'] / 1e6:.1f} MB), "
                   f"boot test {p['boot_test']}")
    for name in result.unchanged:
        click.echo(f"{name}: already on the mirror")
    for removed in result.removed:
        click.echo(f"removed {removed}")
    click.echo(f"{result.target}: index serial {result.serial}" + (f", signed by {result.signer}"
                                                                   if result.index_written else " (unchanged)"))


@main.command()
@click.argument("name")
@from_option
@click.option("--build", "build_id", metavar="ID", help="This build (see the mirror's index.json), not the newest.")
@click.option("--format", "fmt", type=click.Choice(["plain", "ploop", "all"]),
              help="Which archives to pull [default: every format the build has].")
@click.option("--offline", is_flag=True, help="Use the cache only: succeed if NAME is cached, ask no mirror.")
@keyring_option
@json_option
@click.pass_obj
@guarded
def pull(obj: Context, name: str, mirror_urls: tuple[str, ...], build_id: str | None, fmt: str | None,
         offline: bool, keyrings: tuple[Path, ...], as_json: bool) -> None:
    """Pull template NAME from a mirror into the cache.

    \b
    The index and its signature are fetched and verified with gpgv against the
    trusted keys; the newest build (or --build) is downloaded with resume and
    retries, its size and sha256 checked, and installed atomically (the previous
    template is kept as -old until the new one is in place). A tampered index,
    a bad signature, a wrong sha256 or a truncated download leaves the cache as
    it was (exit 5); with several mirrors the next one is tried.
    """
    from vztt.mirror import mirror
    from vztt import formats as formats_registry
    cache = obj.cache
    if offline:
        entry = mirror.offline_entry(cache, name, build_id)
        doc = {"name": name, "build": mirror.local_build(entry), "offline": True, "manifest": str(entry.manifest_path),
               "archives": {f: str(cache.root / a["file"]) for f, a in entry.data.get("archives", {}).items()}}
        if as_json:
            _emit(doc)
        else:
            click.echo(f"{name} {doc['build']}: in the cache ({entry.manifest_path})")
        return
    progress = Progress(quiet=as_json)
    result = mirror.pull(cache, name, mirror.mirror_list(mirror_urls), keyrings, build_id,
                         formats_registry.parse(fmt) if fmt else None, progress)
    if as_json:
        _emit(result.as_dict())
        return
    state = "already in the cache" if result.up_to_date else f"pulled {result.bytes_downloaded / 1e6:.1f} MB"
    click.echo(f"{name} {result.build}: {state} from {result.mirror} in {result.seconds:.1f} s")
    click.echo(f"  signed by {result.signer}, boot test {result.boot_test}")
    for f, path in result.as_dict().get("archives", {}).items():
        click.echo(f"  {f:<6} {path}")


@main.command()
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["dir", "ext4", "ploop"]),
              help="dir: DEST is the root tree; ext4: DEST/root.img; ploop: DEST/root.hdd/{root.hds,"
                   "DiskDescriptor.xml}. [default: ploop for a ploop cache, else ext4]")
@click.option("--size", callback=_parse_size_option, metavar="SIZE",
              help="Disk size for ext4 and ploop (e.g. 10G). [default: the template's disk size, else 10G]")
@click.option("--hostname", help="Written to /etc/hostname and /etc/hosts (127.0.1.1).")
@from_option
@click.option("--build", "build_id", metavar="ID", help="This build of the template.")
@click.option("--offline", is_flag=True, help="Never pull: the template must be in the cache.")
@keyring_option
@json_option
@click.pass_obj
@guarded
def create(obj: Context, name: str, dest: Path, layout: str | None, size: int | None, hostname: str | None,
           mirror_urls: tuple[str, ...], build_id: str | None, offline: bool, keyrings: tuple[Path, ...],
           as_json: bool) -> None:
    """Create a container at DEST from template NAME (pulled first if it is not cached).

    \b
    The archive is unpacked safely (no absolute paths, no '..', nothing
    through links, no device nodes but the harmless ones, bounded sizes) and
    its sha256 checked; the container gets a fresh filesystem UUID, an empty
    machine-id (first boot makes one) and --hostname. It is made beside DEST
    and renamed into place when complete; a failure leaves nothing.
    """
    from vztt import create as create_mod
    progress = Progress(quiet=as_json)
    result = create_mod.create(obj.cache, name, dest, create_mod.CreateOptions(
        layout=layout, size=size, hostname=hostname, mirrors=mirror_urls, keyrings=keyrings, offline=offline,
        build=build_id), progress)
    if as_json:
        _emit(result.as_dict())
        return
    click.echo(f"{result.dest}: {result.layout} container of {name} {result.build}"
               + (f", {result.size >> 20} MiB disk" if result.size else "")
               + (f", filesystem {result.fs_uuid}" if result.fs_uuid else "")
               + (f", pulled from {result.pulled['mirror']}" if result.pulled else "")
               + f" ({result.seconds:.1f} s)")
