"""The `vztt` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from vztt import __version__, mirrors as mirrors_mod
from vztt.cache import TemplateCache
from vztt.errors import EXIT_CODES, Interrupted, VzttError
from vztt.paths import default_recipes
from vztt.progress import Progress
from vztt.recipe import RecipeStore
from vztt.settings import SETTINGS, reference_markdown


EPILOG = "\b\nExit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES) + """

\b
Environment:
  VZTT_CACHE            cache root (default: ./cache in a checkout)
  VZTT_PACKAGE_CACHE    shared package cache (default: <cache>/packages)
  VZTT_RECIPES          recipes directory (default: ./recipes in a checkout)
  VZTT_MIRROR_<NAME>    value of the mirror variable $<NAME>
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
    from vztt import build as build_mod
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


@main.command()
@click.argument("name")
@click.option("--locked", is_flag=True, help="Install exactly the lock file; fail if it is missing or stale.")
@click.option("--lock", "lock_path", type=click.Path(path_type=Path), help="Lock file to use/write.")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel downloads.")
@click.option("--format", "fmt", type=click.Choice(["plain", "ploop", "all"]),
              help="plain: <name>.plain.tar.lz4; ploop: Virtuozzo 7 <name>.plain.ploopv2.tar.lz4; all: both. "
                   "[default: the recipe's `format`]")
@click.option("--no-test", is_flag=True,
              help="Promote without the boot test (the manifest records boot_test: skipped).")
@mirror_option
@json_option
@click.pass_obj
@guarded
def build(obj: Context, name: str, locked: bool, lock_path: Path | None, jobs: int, fmt: str | None,
          no_test: bool, as_json: bool) -> None:
    """Build template NAME into the cache.

    \b
    Steps (timed on stderr):
      resolve    lock the package set (skipped with --locked)
      fetch      download what the package cache lacks, in parallel, verified
      install    install into a temporary loop-mounted ext4 image
      customize  the recipe's files and hooks
      clean      drop caches, logs, machine-id
      pack       reproducible tar, lz4 (format plain)
      ploop      ext4 disk -> ploop v2 image -> Virtuozzo cache tar, lz4 (format ploop)
      test       boot the packed archive in a container, run its checks (`vztt test`);
                 a template that fails stays as <file>-failed, with its report
      promote    atomically replace the cached template (the old one stays until then)
    """
    from vztt import build as build_mod
    recipe = obj.store.load(name)
    mirrors = obj.mirrors()
    progress = Progress(quiet=as_json)
    progress.say(f"building {name}")
    result = build_mod.build(recipe, obj.cache, mirrors, build_mod.BuildOptions(locked=locked, lock_path=lock_path,
                                                                                 jobs=jobs, format=fmt,
                                                                                 test=not no_test), progress)
    if as_json:
        m = result.manifest
        _emit({"name": name, "archive": str(result.archive), "manifest": str(result.manifest_path),
               "log": str(result.log), "sha256": m["archive"]["sha256"], "size": m["archive"]["size"],
               "archives": {k: str(obj.cache.root / a["file"]) for k, a in m["archives"].items()},
               "fetch": result.fetch, "boot_test": m.get("boot_test"),
               **{k: m[k] for k in ("lock_digest", "recipe_digest", "package_count", "steps", "build_seconds")}})
        return
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


def _boot_test_line(record: dict[str, Any]) -> str:
    if record.get("result") != "passed":
        return " ".join(str(x) for x in (record.get("result", "skipped"), record.get("reason", ""))).strip()
    return f"passed: {len(record['checks'])} checks, checks done {record['ready_seconds']} s after start"


@main.command("test")
@click.argument("name")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Also write the report as JUnit XML to FILE (for CI).")
@json_option
@click.pass_obj
@guarded
def test_cmd(obj: Context, name: str, junit: Path | None, as_json: bool) -> None:
    """Boot the cached template NAME in a container and run its checks.

    \b
    The archive is unpacked into a scratch tree and booted with overlayfs
    (the tree stays as shipped), with the recipe's hostname. Checks, one row each:
      boot           systemd reaches running (or degraded) within boot.timeout
      failed-units   no failed unit beyond the recipe's boot.allowed_failed
      hostname       the recipe's hostname
      loopback       lo has 127.0.0.1, localhost resolves, a TCP echo over 127.0.0.1
      package-db     the package database is consistent (dpkg --audit)
      smoke:NAME     each recipe smoke check (/bin/sh -c inside)
      poweroff       a clean poweroff in time
    Exit 8: it does not boot (console log kept); 9: a check failed; 10: no container runtime here.
    """
    from vztt import boottest
    from vztt.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    archive = boottest.cached_archive(cache, name)
    boottest.prepare_host(cache, "vztt test")
    enter_private_namespace()      # the overlay mount dies with us, whatever happens
    progress = Progress(quiet=as_json)
    progress.say(f"testing {archive}")
    report = boottest.boot_test(recipe, cache, archive, progress)
    if junit:
        boottest.write_junit(report, junit)
    error = report.exception()
    if as_json:
        _emit(report.as_dict())
        if error is not None:
            click.echo(f"vztt: {error.kind} error: {error}", err=True)
            sys.exit(error.exit_code)
        return
    click.echo(boottest.format_table(report), nl=False)
    if error is not None:
        raise error


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds COMMAND may run before it is killed (exit 124).")
@click.pass_obj
@guarded
def run_cmd(obj: Context, name: str, command: tuple[str, ...], timeout: float) -> None:
    """Run COMMAND in a throwaway container of the cached template NAME.

    \b
      vztt run debian-12-x86_64-minimal -- cat /etc/os-release
    Boots the template (as `vztt test` does), runs COMMAND once it is up,
    prints its output (stdout and stderr), powers off and removes everything.
    Exits with COMMAND's status; 8 if the template does not boot.
    """
    from vztt import boottest
    from vztt.mounts import enter_private_namespace
    recipe = obj.store.load(name)
    cache = obj.cache
    archive = boottest.cached_archive(cache, name)
    boottest.prepare_host(cache, "vztt run")
    enter_private_namespace()
    status, output = boottest.run_command(recipe, cache, archive, list(command), timeout, Progress())
    click.echo(output, nl=False)
    sys.exit(status)


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
    from vztt.vzcache import inspect as inspect_archive
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
