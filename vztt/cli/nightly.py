"""The nightly job: `vztt status`, `update`, `diff`, `matrix`, `prune`."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from vztt.base.errors import VzttError
from vztt.base.progress import Progress
from vztt.recipe.variables import MirrorNotSet
from vztt.cli.build import build_report
from vztt.cli.main import (Context, FormatList, arch_option, bases, each_template, emit, guarded, json_option,
                           main, mirror_option, of_arch, selected, selection)
from vztt.recipe.settings import ARCHES


@main.command()
@selection
@mirror_option
@json_option
@click.pass_obj
@guarded
def status(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, arch: str | None,
           as_json: bool) -> None:
    """Is each template up to date? Resolves afresh (the lock file is left alone) and compares.

    Exit status 2 when any template would change (as `vzpkg status`), 0 when all are current.
    With --all (or --shard), a template whose mirror variable has no value here is reported
    as `not configured` and the others are checked; named, it is an error (exit 3).
    Each line starts with the template's architecture (--json: "arch"); --arch ARCH checks
    only that architecture's templates.
    """
    from vztt import nightly
    mirrors, progress = obj.mirrors(), Progress(quiet=True)

    def one(name: str) -> nightly.Status:
        recipe = obj.store.load(name)
        try:
            return nightly.status(recipe, obj.cache, mirrors, progress)
        except MirrorNotSet as e:
            if names:
                raise
            return nightly.Status(name, nightly.NOT_CONFIGURED, [str(e)], arch=recipe.arch)

    results = each_template(selected(obj, names, all_, shard_spec, arch), as_json, one)
    if as_json:
        emit([r.as_dict() for r in results])
    else:
        # The architecture first, as a column: `NAME: STATE (reasons)` stays what scripts read.
        for r in results:
            click.echo(f"{r.arch:<8} {r.name}: {r.state}" + (f" ({'; '.join(r.reasons)})" if r.reasons else ""))
            for c in r.changes:
                click.echo(f"  {c.line()}")
    if any(r.state not in (nightly.CURRENT, nightly.NOT_CONFIGURED) for r in results):
        sys.exit(2)


@main.command()
@selection
@click.option("--format", "fmt", type=FormatList(), help="As for `vztt build`.")
@click.option("--no-test", is_flag=True, help="Promote without the boot test.")
@click.option("--wait", type=click.FloatRange(0), default=0, metavar="SECONDS", help="As for `vztt build`.")
@mirror_option
@json_option
@click.pass_obj
@guarded
def update(obj: Context, names: tuple[str, ...], all_: bool, shard_spec: str | None, arch: str | None,
           fmt: str | None, no_test: bool, wait: float, as_json: bool) -> None:
    """Re-resolve, then rebuild, boot-test and promote only the templates that changed.

    Says why each rebuild happens (recipe changed, packages changed, not built yet, base
    rebuilt). A layered template is updated after its base, on the base's new build.
    """
    from vztt.builder import pipeline
    from vztt import nightly
    mirrors, progress = obj.mirrors(), Progress(quiet=as_json)
    options = pipeline.BuildOptions(format=fmt, test=not no_test, wait=wait)

    def one(name: str) -> dict[str, Any]:
        st, result = nightly.update(obj.store.load(name), obj.cache, mirrors, progress, options)
        if not as_json:
            why = "; ".join(st.reasons)
            click.echo(f"{name}: {'rebuilt (' + why + ')' if result else 'up to date'}")
            for c in st.changes:
                click.echo(f"  {c.line()}")
        return {**st.as_dict(), "rebuilt": result is not None,
                "build": build_report(obj, result) if result else None}

    results = each_template(selected(obj, names, all_, shard_spec, arch), as_json, one)
    if as_json:
        emit(results)


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
        emit(d)
        return
    click.echo(f"{name}: {d['old']} -> {d['new']}")
    for line in d["lines"] or ["no package changes"]:
        click.echo(f"  {line}")
    for fmt, size in d["sizes"].items():
        if size["old"] is not None and size["new"] is not None:
            click.echo(f"  {fmt} archive: {size['old'] / 1e6:.1f} MB -> {size['new'] / 1e6:.1f} MB "
                       f"({(size['new'] - size['old']) / 1e6:+.1f} MB)")


class RunnerSpec(click.ParamType):
    """ARCH=LABELS: the runners labelled for ARCH (labels comma-separated; none: emulation)."""

    name = "ARCH=LABELS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        arch, eq, labels = str(value).partition("=")
        if not eq or arch not in ARCHES:
            self.fail(f"{value!r}: expected ARCH=LABELS, ARCH one of {', '.join(ARCHES)} "
                      "(e.g. aarch64=self-hosted,linux,ARM64)", param, ctx)
        found = tuple(label for label in re.split(r"[,\s]+", labels) if label)
        bad = [label for label in found if not RUNNER_LABEL_RE.fullmatch(label)]
        if bad:
            self.fail(f"{value!r}: {bad[0]!r} is not a runner label (letters, digits, . _ - :)", param, ctx)
        return arch, found


# What a runner label or tag may be: nothing the YAML or a shell would read otherwise.
RUNNER_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["github", "gitlab", "json"]), default="json", show_default=True,
              help="github: JSON for `strategy.matrix` (also written to $GITHUB_OUTPUT as `matrix`); "
                   "gitlab: a child pipeline with one job per template; json: a list of names.")
@click.option("--runner", "runner_specs", type=RunnerSpec(), multiple=True,
              help="The runners labelled for an architecture (repeatable): its templates' jobs run there "
                   "(github: runs-on, gitlab: tags). Without labels (aarch64=) or this option, they run "
                   "on the x86_64 runners under emulation (`make binfmt` first).")
@arch_option("Only the templates of this architecture.")
@json_option
@click.pass_obj
@guarded
def matrix(obj: Context, fmt: str, runner_specs: tuple[tuple[str, tuple[str, ...]], ...], arch: str | None,
           as_json: bool) -> None:
    """The CI matrix: one job per buildable template; a layered template goes into its base's
    job, after the base (github: as `matrix.layers` of the base's entry). Each job runs on the
    runners labelled for its template's architecture (--runner), else on the x86_64 runners,
    under emulation for another architecture.

    With --json: one document, {"format", "templates", "jobs", "entries", "output"} (jobs: each
    job's templates, a base then its layers; entries: each job's {"template", "layers", "arch",
    "runner", "emulated"}; output: what --format prints).
    """
    from vztt import nightly
    from vztt.ci.jobs import Runners
    names = of_arch(obj, obj.store.names(), arch)
    base_of = bases(obj, names)
    arch_of = archs(obj, names)
    runners = Runners({a: labels for a, labels in runner_specs if labels})
    text = nightly.matrix(names, fmt, base_of, arch_of, runners)
    if fmt == "github":
        nightly.write_github_output("matrix", text)
    if as_json:
        jobs = nightly.matrix_jobs(names, base_of, arch_of, runners)
        emit({"format": fmt, "templates": sorted(names), "jobs": [j.templates for j in jobs],
              "entries": [j.as_dict() for j in jobs], "output": text})
        return
    click.echo(text)


def archs(obj: Context, names: list[str]) -> dict[str, str]:
    """Template -> its recipe's architecture (a recipe that does not load: left out)."""
    out = {}
    for name in names:
        try:
            out[name] = obj.store.load(name).arch
        except VzttError:
            continue
    return out


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
    for path in cache.lock_files():
        keep |= {p.sha256 for p in Lock.read(path).packages}
    packages = PackageCache(cache.packages_dir)
    with packages.locked(exclusive=True, timeout=wait):
        files, size = packages.prune(keep)
    if as_json:
        emit({"removed_files": files, "removed_bytes": size, "kept": len(keep)})
    else:
        click.echo(f"removed {files} packages ({size / 1e6:.1f} MB); {len(keep)} referenced packages kept")
