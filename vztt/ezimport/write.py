"""The drafts as recipe files, the scripts beside them: all or nothing.

Everything is written first into a staging directory inside the target
(`.ez-import.<pid>`), with the signing keys the recipes name, and loaded
back with the recipe loader (the same checks `vztt build` makes); only then
are the recipes, the scripts (`ez/<recipe>/<template>/<script>`, as they
were, mode kept) and any missing key moved into place. A failure anywhere
leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vztt import __version__
from vztt.base.errors import RecipeError
from vztt.base.files import atomic_write
from vztt.ezimport import draft as drafting
from vztt.ezimport import source as sources
from vztt.ezimport.mapping import KEYRINGS, Draft
from vztt.ezimport.rules import EzImportError
from vztt.recipe.recipe import RecipeStore
from vztt.store.templates import pid_alive

STAGING = ".ez-import."         # + pid: the staging directory inside the target


@dataclass
class ImportResult:
    source: Path
    to: Path
    drafts: list[Draft]
    skipped: list[tuple[str, str]]
    written: list[Path] = field(default_factory=list)
    keys_copied: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def rows(rs: list[Any]) -> list[dict[str, str]]:
            return [{"file": r.file, "detail": r.detail} for r in rs]
        return {"source": str(self.source), "to": str(self.to),
                "templates": [{"template": d.template.label, "where": d.template.where, "recipe": d.name or None,
                               "file": str(self.to / f"{d.name}.toml") if d.name else None,
                               "mapped": rows(d.mapped), "not_imported": rows(d.unsupported),
                               "warnings": rows(d.warnings)} for d in self.drafts],
                "skipped": [{"file": f, "detail": why} for f, why in self.skipped],
                "written": [str(p) for p in self.written], "keys_copied": [str(p) for p in self.keys_copied]}


def import_ez(source: Path, to: Path, name: str | None, key_source: Path, force: bool = False) -> ImportResult:
    tree = sources.load(Path(source))
    ds = drafting.drafts(tree, name)
    to = Path(to).resolve()
    result = ImportResult(source=tree.source, to=to, drafts=ds, skipped=tree.skipped)
    recipes = [d for d in ds if d.name]
    for d in recipes:
        for target in (to / f"{d.name}.toml", to / drafting.SCRIPT_DIR / d.name):
            if target.exists() and not force:
                raise EzImportError(f"{target}: exists; nothing written (import again with --force to replace it)")
    keys = sorted({KEYRINGS[_distro(d, ds)] for d in recipes})
    missing = [k for k in keys if not (to / "keys" / k).is_file()]
    for k in missing:
        if not (key_source / k).is_file():
            raise EzImportError(f"keys/{k}: the distribution's signing key is in neither {to / 'keys'} nor "
                                f"{key_source}; nothing written")
    to.mkdir(parents=True, exist_ok=True)
    for stale in to.glob(f"{STAGING}*"):               # what a killed import left
        pid = stale.name.rsplit(".", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    staging = to / f"{STAGING}{os.getpid()}"
    try:
        (staging / "keys").mkdir(parents=True)
        for k in keys:
            src = to / "keys" / k if k not in missing else key_source / k
            shutil.copyfile(src, staging / "keys" / k)
        for d in recipes:
            (staging / f"{d.name}.toml").write_text(render(d))
            for rel, f in d.scripts.items():
                path = staging / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f.data)
                os.chmod(path, 0o755)
        store = RecipeStore(staging)
        for d in recipes:
            try:
                store.load(d.name)
            except RecipeError as e:
                raise EzImportError(f"the recipe made for {d.template.where} does not load (a vztt bug): {e}") from None
        _commit(staging, to, recipes, missing, result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _distro(d: Draft, ds: list[Draft]) -> str:
    return str(d.settings.get("distro") or ds[0].settings["distro"])


def _commit(staging: Path, to: Path, recipes: list[Draft], missing: list[str], result: ImportResult) -> None:
    for k in missing:
        atomic_write(to / "keys" / k, (staging / "keys" / k).read_bytes())
        result.keys_copied.append(to / "keys" / k)
    for d in recipes:
        scripts = staging / drafting.SCRIPT_DIR / d.name
        target = to / drafting.SCRIPT_DIR / d.name
        if scripts.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scripts, target)
            result.written += sorted(p for p in target.rglob("*") if p.is_file())
        atomic_write(to / f"{d.name}.toml", (staging / f"{d.name}.toml").read_bytes())
        result.written.append(to / f"{d.name}.toml")


# --------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------

def _value(v: Any, indent: str = "") -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)        # JSON's string escapes are TOML's
    if isinstance(v, list):
        items = [_value(x) for x in v]
        one = "[" + ", ".join(items) + "]"
        if len(one) <= 100:
            return one
        return "[\n" + "".join(f"{indent}  {x},\n" for x in items) + f"{indent}]"
    raise TypeError(type(v))


def _comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines() or [""])


def render(d: Draft) -> str:
    out = [_comment(f"Imported from a Virtuozzo EZ template by `vztt import-ez` (vztt {__version__}):\n"
                    f"  {d.template.where} ({d.template.label})")]
    if d.description:
        out.append(_comment("Description:\n" + "\n".join(f"  {line}" for line in d.description)))
    if d.unsupported:
        out.append(_comment("Not imported (no counterpart in vztt):\n"
                            + "\n".join(f"  {r.file}: {r.detail}" for r in d.unsupported)))
    if d.warnings:
        out.append(_comment("Warnings:\n" + "\n".join(f"  {r.file}: {r.detail}" for r in d.warnings)))
    body = [f"{k} = {_value(v)}" for k, v in d.settings.items()]
    if d.packages:
        body += ["", "[packages]"] + [f"{k} = {_value(v)}" for k, v in d.packages.items()]
    if d.environment:
        body += ["", "[environment]"] + [f"{k} = {_value(v)}" for k, v in d.environment.items()]
    for r in d.repositories:
        body += ["", _comment(r["_comment"]), "[[repositories]]"]
        body += [f"{k} = {_value(v)}" for k, v in r.items() if not k.startswith("_")]
    for h in d.hooks:
        body += ["", "[[hooks]]"] + [f"{k} = {_value(v)}" for k, v in h.items()]
    return "\n#\n".join(out) + "\n\n" + "\n".join(body) + "\n"
