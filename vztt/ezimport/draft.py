"""The whole tree -> drafts: the OS template, its extra sets, its application templates.

  os/default       -> <name>                 (a recipe of its own)
  os/<set>         -> <name>-<set>           (the set's packages; package_manager, distribution
                                              and the repositories of os/default, then its own;
                                              its environment, else os/default's; its scripts,
                                              else os/default's, as vztt runs them)
  app/<app>/default -> <name>-<app>          (a layer: `base = "<name>"`)
  app/<app>/<set>   -> <name>-<set>-<app>    (a layer on the set, when the set exists)
"""

from __future__ import annotations

from vztt.ezimport import mapping as m
from vztt.ezimport.rules import EzImportError
from vztt.ezimport.source import DEFAULT_SET, EzTemplate, EzTree
from vztt.recipe.recipe import NAME_RE

SCRIPT_DIR = "ez"           # scripts go to <recipes>/ez/<name>/<template>/<script>


def drafts(tree: EzTree, name: str | None = None) -> list[m.Draft]:
    given = name
    name = name or tree.name
    if not NAME_RE.match(name):
        raise EzImportError(f"--name {name}: not a template name (lower-case letters, digits, '.', '_', '-')" if given
                            else f"{tree.source}: {name!r} is not a template name; give one with --name")
    default = tree.os(DEFAULT_SET)
    if default is None:
        raise EzImportError(f"{tree.source}: no os/{DEFAULT_SET} template")
    facts = m.os_facts(tree, default)
    out = [_os(tree, default, None, name, facts)]
    sets = {t.set: f"{name}-{t.set}" for t in tree.templates if t.kind == "os" and t.set != DEFAULT_SET}
    for t in tree.templates:
        if t.kind == "os" and t.set != DEFAULT_SET:
            out.append(_os(tree, t, default, sets[t.set], facts))
    for t in tree.templates:
        if t.kind != "app":
            continue
        if t.set != DEFAULT_SET and t.set not in sets:
            d = m.Draft(name="", template=t)
            d.unsupported.append(m.Row(t.label, f"an application template for OS set {t.set!r}, which the tree "
                                       "does not have: not imported"))
            out.append(d)
            continue
        base = name if t.set == DEFAULT_SET else sets[t.set]
        out.append(_app(tree, t, default, base, f"{base}-{t.app}", facts))
    for d in out:
        if d.name and not NAME_RE.match(d.name):
            raise EzImportError(f"{d.template.where}: the recipe name {d.name!r} it would get is not a template name "
                                "(lower-case letters, digits, '.', '_', '-')")
    names = [d.name for d in out if d.name]
    if len(set(names)) != len(names):
        raise EzImportError(f"{tree.source}: two templates would get the same recipe name ({', '.join(names)})")
    return out


def _os(tree: EzTree, t: EzTemplate, default: EzTemplate | None, name: str, facts: m.OsFacts) -> m.Draft:
    d = m.Draft(name=name, template=t)
    d.settings.update(distro=facts.distro, release=facts.release, version=facts.version, arch=facts.arch)
    m.texts(d, t, f"{name} (imported from an EZ template)")
    m.osrelease(d, t if "osrelease" in t.files or default is None else default)
    for key in ("distribution", "package_manager"):
        if key in t.files or default is None:
            d.mapped.append(m.Row(key, f"distro {facts.distro}"))
    d.mapped.append(m.Row(f"{tree.osname}/{tree.osver}/{tree.osarch}", f"version {facts.version}, arch {facts.arch}, release {facts.release}"))
    m.packages(d, t, facts, os_template=True)
    taken: set[str] = set()
    if default is not None:          # an extra set appends its repositories to the base template's
        m.repositories(d, default, facts, taken)
    m.repositories(d, t, facts, taken, prefix="set-" if default is not None else "")
    m.environment(d, t if "environment" in t.files or default is None else default)
    m.scripts(d, t, m.OS_SCRIPTS, default, f"{SCRIPT_DIR}/{name}")
    m.leftovers(d, t, {s for s, _, _ in m.OS_SCRIPTS}, {
        "pre-install": "runs when the OS template is installed into an existing container (vzpkg install), "
                       "not when a cache is made"})
    return d


def _app(tree: EzTree, t: EzTemplate, default: EzTemplate, base: str, name: str, facts: m.OsFacts) -> m.Draft:
    d = m.Draft(name=name, template=t)
    d.settings.update(base=base, app_templates=[t.app])
    m.texts(d, t, f"{t.app} on {base} (imported from an EZ template)")
    m.packages(d, t, facts, os_template=False)
    m.repositories(d, t, facts, set(), prefix=f"{t.app}-")
    m.environment(d, t)
    # `vzpkg create appcache` runs the application's scripts with APP_CACHE=1 (src/appcache.h).
    d.environment.setdefault("APP_CACHE", "1")
    m.scripts(d, t, m.APP_SCRIPTS, default, f"{SCRIPT_DIR}/{name}", hook_prefix=f"{t.app}-")
    os_only = "read by vztt in OS templates only"
    m.leftovers(d, t, {s for s, _, _ in m.APP_SCRIPTS} | {"packages", "repositories", "mirrorlist", "environment",
                                                          "summary", "description"},
                {k: os_only for k in ("distribution", "package_manager", "osrelease", "packages_0", "packages_1",
                                      *(s for s, _, _ in m.OS_SCRIPTS if s != "post-install"))})
    return d
