"""Recipes and their inputs: `vztt list`, `show`, `resolve`, `settings`, `mirrors`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from vztt.base.errors import RecipeError, VzttError
from vztt.base.progress import Progress
from vztt.cli.main import (Context, arch_option, emit, error_doc, error_line, guarded, json_option, main,
                           mirror_option)
from vztt.recipe.settings import SETTINGS, Setting, reference_markdown


@main.command("list")
@arch_option("Only the recipes of this architecture.")
@json_option
@click.pass_obj
@guarded
def list_cmd(obj: Context, arch: str | None, as_json: bool) -> None:
    """List buildable recipes, their architecture, whether each is cached, and when it was built.

    A recipe that does not load is listed as `invalid` with its error (and in --json
    with an "error" object); the others are listed as usual, and the exit status is 3.
    """
    store, cache = obj.store, obj.cache
    rows: list[dict[str, Any]] = []
    problems: list[VzttError] = []
    for name in store.names(keep_unreadable=True):
        entry = cache.entry(name)
        try:
            recipe = store.load(name)
        except RecipeError as e:
            problems.append(e)
            rows.append({"name": name, "distro": None, "version": None, "arch": None, "summary": str(e),
                         "cached": entry is not None, "created": None, "archive": None, "size": None,
                         "current": False, "error": error_doc(e)})
            continue
        if arch is not None and recipe.arch != arch:
            continue
        manifest = entry.manifest if entry else None
        rows.append({
            "name": name, "distro": recipe.distro, "version": recipe.version, "arch": recipe.arch,
            "summary": recipe.summary, "cached": entry is not None,
            "created": manifest.created if manifest else None,
            "archive": str(entry.archive) if entry else None,
            "size": manifest.archive.size if manifest else None,
            "current": bool(manifest and manifest.recipe_digest == recipe.digest()),
        })
    if as_json:
        emit(rows)
    else:
        width = max([len(r["name"]) for r in rows] + [4])
        click.echo(f"{'NAME':<{width}}  {'ARCH':<8}  {'STATE':<8}  {'BUILT':<25}  SUMMARY")
        for r in rows:
            state = "invalid" if "error" in r else ("cached" if r["current"] else "stale") if r["cached"] else "-"
            click.echo(f"{r['name']:<{width}}  {r['arch'] or '-':<8}  {state:<8}  {r['created'] or '-':<25}  "
                       f"{r['summary']}")
    for e in problems:
        error_line(e)
    if problems:
        sys.exit(problems[0].exit_code)


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
        emit({"name": name, "chain": [str(p) for p in recipe.chain], "digest": recipe.digest(),
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
    from vztt.builder import pipeline
    recipe = obj.store.load(name)
    result = pipeline.resolve(recipe, obj.cache, obj.mirrors(), lock_path, Progress(quiet=as_json))
    if as_json:
        emit({"name": name, "lock": str(result.lock_path), "lock_digest": result.lock.digest,
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
@mirror_option
@json_option
@click.pass_obj
@guarded
def mirrors(obj: Context, as_json: bool) -> None:
    """Show the mirror variables and where each value comes from."""
    m = obj.mirrors()
    if as_json:
        emit({k: {"url": v, "from": m.origin[k]} for k, v in sorted(m.values.items())})
        return
    for k, v in sorted(m.values.items()):
        click.echo(f"{k:<24} {v}   ({m.origin[k]})")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the reference as Markdown (docs/recipes.md).")
@json_option
@guarded
def settings(markdown: bool, as_json: bool) -> None:
    """The recipe settings: every key, its type, default and meaning."""
    if as_json:
        emit([_setting_doc(s) for s in SETTINGS])
        return
    if markdown:
        click.echo(reference_markdown(), nl=False)
        return
    for s in SETTINGS:
        click.echo(f"{s.key:<18} {s.toml_type:<16} {s.doc}")
        for f in s.fields:
            click.echo(f"  {f.key:<16} {f.toml_type:<16} {f.doc}")


def _setting_doc(s: Setting) -> dict[str, Any]:
    """One row of the settings table, for `vztt settings --json`."""
    doc: dict[str, Any] = {"key": s.key, "type": s.type, "default": s.default, "merge": s.merge, "doc": s.doc,
                           "choices": list(s.choices), "pattern": s.pattern or None, "inherit": s.inherit,
                           "templated": s.templated}
    if s.fields:
        doc["record_key"] = s.record_key
        doc["fields"] = [_setting_doc(f) for f in s.fields]
    return doc
