"""`vztt sbom`: the SBOM of a cached template."""

from __future__ import annotations

import click

from vztt.cli.main import Context, guarded, json_option, main


@main.command("sbom")
@click.argument("name")
@click.option("--format", "kind", type=click.Choice(["spdx", "cyclonedx"]), default="spdx", show_default=True,
              help="spdx: SPDX 2.3 JSON; cyclonedx: CycloneDX 1.6 JSON.")
@json_option
@click.pass_obj
@guarded
def sbom_cmd(obj: Context, name: str, kind: str, as_json: bool) -> None:
    """Print the SBOM of the cached template NAME (the document is JSON, with or without --json).

    \b
    Every package of the image: name, version, architecture, purl
    (pkg:deb/... or pkg:rpm/... with arch and distro), the sha256 of its
    package file, its source package, its licenses as an SPDX expression
    where the package database states them in a form SPDX names
    (NOASSERTION otherwise); the template itself is the root, with its
    archive's sha256. The same bytes as <cache>/NAME.spdx.json or .cdx.json
    and the mirror's copy. Exit 3: NAME is not cached, or its manifest has no
    package list (hand-made or very old).
    """
    from vztt.base.errors import RecipeError
    from vztt.store import sbom
    cache = obj.cache
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; build or pull it first")
    sbom.require_packages(entry.manifest, str(entry.manifest_path))
    click.echo(sbom.render(entry.manifest, kind).decode(), nl=False)
