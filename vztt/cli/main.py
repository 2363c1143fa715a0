"""The `vztt` command group: its options, the Context commands share, the
options several commands take, output (--json) and error handling.

The commands live in one module per group (recipes, build, boot, kernel,
nightly, mirror); each registers itself on `main` when vztt.cli imports it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import click

from vztt import __version__
from vztt import formats
from vztt.base.errors import EXIT_CODES, EnvironmentProblem, Interrupted, VzttError
from vztt.base.paths import default_recipes
from vztt.recipe import variables
from vztt.recipe.recipe import RecipeStore
from vztt.recipe.settings import ARCHES
from vztt.store.templates import TemplateCache

F = TypeVar("F", bound=Callable[..., Any])

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
    """What the group's options set, for every command (click's `obj`)."""

    def __init__(self, cache_dir: Path | None, recipes: Path | None, mirror: tuple[str, ...]):
        self._cache_dir = cache_dir
        self.recipes_dir = recipes or default_recipes()
        self.mirror_args = mirror
        self.kernel_dir: Path | None = None     # set by the `kernel` group

    @property
    def store(self) -> RecipeStore:
        return RecipeStore(self.recipes_dir)

    @property
    def cache(self) -> TemplateCache:
        return TemplateCache(self._cache_dir)

    def mirrors(self) -> variables.Mirrors:
        return variables.load(self.mirror_args)


# -- output and errors ---------------------------------------------------------

def emit(data: Any) -> None:
    """The one JSON document of --json."""
    click.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def error_line(err: VzttError) -> None:
    click.echo(f"vztt: {err.kind} error: {err}", err=True)


def emit_report(doc: dict[str, Any], error: VzttError | None) -> None:
    """--json for a command whose report is the answer even when it fails:
    the report on stdout, then (on failure) the one-line error and its exit."""
    emit(doc)
    if error is not None:
        error_line(error)
        sys.exit(error.exit_code)


def error_doc(err: VzttError) -> dict[str, Any]:
    return {"kind": err.kind, "message": str(err), "exit_code": err.exit_code}


def fail(err: VzttError, as_json: bool) -> NoReturn:
    if as_json:
        emit({"error": error_doc(err)})
    error_line(err)
    sys.exit(err.exit_code)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Unwind like Ctrl-C, so every finally: block unmounts and removes temp files.
    raise KeyboardInterrupt


def guarded(fn: F) -> F:
    """Turn expected failures into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except VzttError as e:
            fail(e, as_json)
        except PermissionError as e:
            # A file or directory this user may not touch (a root-owned cache, a key): a host
            # problem to name, not a bug to dump.
            fail(EnvironmentProblem(f"{e.filename or 'a file'}: permission denied "
                                    f"(uid {os.getuid()}; run as root, or choose a --cache-dir you own)"), as_json)
        except KeyboardInterrupt:
            fail(Interrupted("interrupted; mounts, loop devices and temporary files were cleaned up"), as_json)
        finally:
            # The command is over: its work done (or failed, and cleaned up). A signal from here
            # on has nothing left to clean, and would only turn the status it earned into a
            # death by SIGINT (Python's exit for a KeyboardInterrupt nobody catches).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return wrapper  # type: ignore[return-value]


# -- options several commands take ------------------------------------------------

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of text.")


def _add_mirrors(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    if value and isinstance(ctx.obj, Context):
        ctx.obj.mirror_args = tuple(ctx.obj.mirror_args) + tuple(value)
    return value


# --mirror is accepted before and after the command name: `vztt build NAME --mirror X=URL`.
mirror_option = click.option("--mirror", "sub_mirror", multiple=True, metavar="NAME=URL", expose_value=False,
                             callback=_add_mirrors, help="Set a mirror variable for this run (repeatable).")

keyring_option = click.option(
    "--keyring", "keyrings", multiple=True, type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
    help="Trusted OpenPGP key(s) the mirror's index must be signed with: a binary keyring or an armored key "
         "(repeatable). [env: VZTT_KEYRING, colon-separated; default: /etc/vztt/trusted.gpg, /etc/vztt/trusted.gpg.d/]")

from_option = click.option(
    "--from", "mirror_urls", multiple=True, metavar="URL",
    help="Template mirror: http(s):// URL, file:///path or a directory (repeatable: tried in order, the next "
         "on failure). [env: VZTT_TEMPLATE_MIRRORS, space-separated; default: /etc/vztt/template-mirrors.list]")


class FormatList(click.Choice):
    """--format: a registered format, `all`, or a comma-separated list of formats
    (`plain,ploop`), checked by the formats registry. The value stays the string
    given, for the registry to parse where it is used."""

    name = "format"

    def __init__(self) -> None:
        super().__init__([*formats.names(), formats.ALL])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            formats.parse(str(value))
        except VzttError as e:
            self.fail(str(e), param, ctx)
        return value


def format_summaries() -> str:
    """`name: summary; ...` of every registered format, for --format's help."""
    return "; ".join(f"{name}: {formats.get(name).summary}" for name in formats.names())


_selection_options = [
    click.argument("names", nargs=-1, metavar="[NAME]..."),
    click.option("--all", "all_", is_flag=True, help="Every buildable recipe."),
    click.option("--shard", "shard_spec", metavar="K/N",
                 help="Only this runner's share of the templates: the K-th of N, deterministic (e.g. 2/4)."),
]


def arch_option(help_text: str) -> Callable[[F], F]:
    """--arch ARCH: only the templates of one architecture (vztt's naming, as `vztt list` shows it)."""
    return click.option("--arch", "arch", type=click.Choice(ARCHES), help=help_text)


def of_arch(obj: "Context", names: list[str], arch: str | None) -> list[str]:
    """`names` whose recipe is for `arch` (all of them without one). A recipe that does not
    load stays in: the command reports it when it gets to it."""
    if arch is None:
        return names
    out = []
    for name in names:
        try:
            if obj.store.load(name).arch != arch:
                continue
        except VzttError:
            pass
        out.append(name)
    return out


def selection(fn: F) -> F:
    """NAME..., --all, --arch and --shard K/N: the templates a command works on (see `selected`)."""
    options = [*_selection_options,
               arch_option("Only the templates of this architecture (before --shard: a runner of that "
                           "architecture takes its share of them).")]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def selected(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None,
             arch: str | None = None) -> list[str]:
    """The templates a command works on: NAMES, or --all, those of --arch, cut to this
    runner's --shard; a layer after its base (and in its base's shard)."""
    from vztt.nightly import shard
    if all_ and names:
        raise click.UsageError("give template names or --all, not both")
    if not all_ and not names:
        raise click.UsageError("name a template (see `vztt list`) or pass --all")
    chosen = of_arch(obj, list(names) if names else obj.store.names(), arch)
    return shard(chosen, shard_spec, bases(obj, chosen))


def bases(obj: Context, names: list[str]) -> dict[str, str]:
    """Layer -> its base, for the templates that are layers. A recipe that does not load is
    left out here: the command reports it when it gets to it."""
    out = {}
    for name in names:
        try:
            base = obj.store.load(name).base_template
        except VzttError:
            continue
        if base:
            out[name] = base
    return out


def each_template(names: list[str], as_json: bool, one: Callable[[str], Any]) -> list[Any]:
    """Run `one(name)` for every template; a failure is reported and the rest still run.
    The exit status is the first failure's."""
    results, first_error = [], None
    for name in names:
        try:
            results.append(one(name))
        except VzttError as e:
            if len(names) == 1:
                raise
            error_line(e)
            results.append({"name": name, "error": error_doc(e)})
            first_error = first_error or e
    if first_error is not None:
        if as_json:
            emit(results)
        sys.exit(first_error.exit_code)
    return results


# -- the group ------------------------------------------------------------------------

# click >= 8.2 raises this for a group called without a command; older click prints the help itself.
NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class VzttGroup(click.Group):
    """click's group, with vztt's usage errors: one line (`vztt: usage error: ...`, exit 2),
    naming the closest command to a mistyped one."""

    group_class = type          # subgroups (`vztt kernel`) are VzttGroups too

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise click.UsageError(f"no such command {name!r}{hint}", ctx)
        return super().resolve_command(ctx, args)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS_IS_HELP as e:         # `vztt` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            message = " ".join(e.format_message().split())
            click.echo(f"vztt: usage error: {message}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=VzttGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vztt")
# Absolute at once: the dnf worker and hooks run in other directories, where a relative path
# would name something else.
@click.option("--cache-dir", type=click.Path(path_type=Path, resolve_path=True), envvar="VZTT_CACHE",
              help="Cache root: templates, locks, package cache. [env: VZTT_CACHE]")
@click.option("--recipes", type=click.Path(path_type=Path, resolve_path=True), envvar="VZTT_RECIPES",
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
