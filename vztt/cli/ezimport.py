"""Coming from Virtuozzo: `vztt import-ez`."""

from __future__ import annotations

from pathlib import Path

import click

from vztt.base.paths import default_recipes
from vztt.cli.main import Context, emit, guarded, json_option, main


@main.command("import-ez")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Path(path_type=Path, file_okay=False),
              help="Recipes directory to write into. [default: the recipes directory (--recipes)]")
@click.option("--name", help="Recipe name of the OS template; its sets and applications are named after it. "
                             "[default: <os>-<version>-<arch> of the EZ template]")
@click.option("--force", is_flag=True, help="Replace recipes (and their scripts) of the same names.")
@json_option
@click.pass_obj
@guarded
def import_ez(obj: Context, source: Path, to: Path | None, name: str | None, force: bool, as_json: bool) -> None:
    """Turn Virtuozzo EZ templates into recipes.

    SOURCE is an installed EZ template (the config/ directory of one OS template,
    /vz/template/<os>/<version>/<arch>/config) or a source tree whose .spec maps
    <template>_<file> into that layout (OpenVZ's *-ez repositories).

    \b
    Writes, into --to:
      <name>.toml              the OS template (config/os/default)
      <name>-<set>.toml        each extra OS set (config/os/<set>)
      <name>-<app>.toml        each application template, as a layer (`base = "<name>"`)
      ez/<recipe>/...          the scripts, unchanged, run as vztt ran them (hooks, convention ez)
      keys/<key>               the distribution's signing key, if the directory lacks it

    Prints what each file became and what was not imported, and why. Nothing is
    written unless every template maps and every recipe loads. Then:
    `vztt build <name>` and `vztt build <name>-<app>`.
    """
    from vztt.ezimport.write import import_ez as run_import
    target = to or obj.recipes_dir
    result = run_import(source, target, name, key_source=default_recipes() / "keys", force=force)
    if as_json:
        emit(result.as_dict())
        return
    for d in result.drafts:
        click.echo(f"{d.name or '(not imported)'} <- {d.template.where}")
        if d.name:
            click.echo(f"  recipe    {result.to / (d.name + '.toml')}")
        for label, rows in (("mapped", d.mapped), ("NOT", d.unsupported), ("warning", d.warnings)):
            for r in rows:
                click.echo(f"  {label:<9} {r.file:<20} {r.detail}")
    for f, why in result.skipped:
        click.echo(f"skipped {f}: {why}")
    for k in result.keys_copied:
        click.echo(f"copied {k}")
    click.echo(f"{len(result.written)} files written into {result.to}")
