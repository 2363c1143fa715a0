"""One EZ template -> one recipe draft, following vztt's own rules.

  packages, packages_0, packages_1   -> packages.include (apt; packages_0/_1 are vztt's apt
                                        bootstrap stages: here apt's Essential stage is the
                                        bootstrap, so priority is `essential`) or packages.base (dnf)
  distribution, package_manager      -> distro (a family we have no backend for, or EL < 9: an error)
  the tree's <os>/<ver>/<arch>       -> version, arch; release: the apt suite of the first
                                        repository, or the EL major version
  osrelease, summary                 -> osrelease, summary; description -> a comment
  repositories                       -> repositories (url.map names -> our mirror variables,
                                        the distro's signing key from keys/)
  environment                        -> environment
  scripts                            -> hooks, `convention = "ez"`, in vztt's order:
     OS:  pre-cache (host, before-packages), mid-pre-install, mid-post-install (image,
          after-base), post-cache (host), post-install (image)
     app: pre-install (image, after-base), post-install (image), with APP_CACHE=1 as
          `vzpkg create appcache` sets it; an app without one gets the OS template's, as
          vztt's run_ve_scripts falls back to the base template's script
Everything else is listed as not imported, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vztt.ezimport.rules import Entry, EzFile, EzImportError, first, lines, text_of, words
from vztt.ezimport.source import DEFAULT_SET, EzTemplate, EzTree
from vztt.ezimport.urlmap import UrlMapError, translate, yum_vars
from vztt.recipe.inputs import DEB_NAME, DEB_WORDS, RPM_SPEC, RPM_WORDS
from vztt.recipe.recipe import FAMILY
from vztt.recipe.settings import ARCHES, OSRELEASE_PATTERN

DISTRIBUTIONS = {"debian": "debian", "ubuntu": "ubuntu", "centos": "centos-stream", "centos-stream": "centos-stream",
                 "almalinux": "almalinux", "alma": "almalinux", "rocky": "rockylinux", "rockylinux": "rockylinux"}
KEYRINGS = {"debian": "debian-archive-keyring.gpg", "ubuntu": "ubuntu-archive-keyring.gpg",
            "centos-stream": "RPM-GPG-KEY-centosofficial", "almalinux": "RPM-GPG-KEY-AlmaLinux-9",
            "rockylinux": "RPM-GPG-KEY-Rocky-9"}
MIN_EL = 9

# (script, where, phase) in vztt's order of a cache build (src/cache.c) and an app install (src/appcache.c).
OS_SCRIPTS = (("pre-cache", "host", "before-packages"), ("mid-pre-install", "image", "after-base"),
              ("mid-post-install", "image", "after-base"), ("post-cache", "host", "after-packages"),
              ("post-install", "image", "after-packages"))
APP_SCRIPTS = (("pre-install", "image", "after-base"), ("post-install", "image", "after-packages"))
READ = {"packages", "packages_0", "packages_1", "repositories", "mirrorlist", "environment", "distribution",
        "osrelease", "summary", "description", "package_manager"}
WHY_NOT = {
    "ct2vm": "converts a container into a virtual machine on a Virtuozzo host",
    "upgradable_versions": "container upgrades between OS versions (vzpkg upgrade)",
    "technologies": "Virtuozzo kernel technologies a container needs",
    "cache_type": "Virtuozzo cache layouts; `vztt build --format` chooses ours",
    "multiarch": "32-bit packages on 64-bit Virtuozzo hosts",
    "golden_image": "Virtuozzo's golden-image switch",
    "no_pkg_actions": "forbids vzpkg package actions in containers",
    "zypp_repositories": "zypper repositories (vztt has no zypper backend)",
    "pre-install-hn": "runs on the Virtuozzo host for the container's configuration there (vzctl), not in an image",
    "post-install-hn": "runs on the Virtuozzo host for the container's configuration there (vzctl), not in an image",
    "release": "the EZ package's own release (informational)",
    "version": "the EZ package's own version (informational)",
}
for _s in ("pre-upgrade", "post-upgrade", "pre-update", "post-update", "pre-remove", "post-remove"):
    WHY_NOT[_s] = "runs when vzpkg upgrades, updates or removes a template in a container"


@dataclass
class Row:
    file: str            # "packages", "repositories:2", "post-install"
    detail: str


@dataclass
class Draft:
    """A recipe to write: its settings in the order they are written, and the report."""

    name: str
    template: EzTemplate
    settings: dict[str, Any] = field(default_factory=dict)      # top-level keys
    packages: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    repositories: list[dict[str, Any]] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    scripts: dict[str, EzFile] = field(default_factory=dict)     # path below the recipes dir -> file
    description: list[str] = field(default_factory=list)
    mapped: list[Row] = field(default_factory=list)
    unsupported: list[Row] = field(default_factory=list)
    warnings: list[Row] = field(default_factory=list)


@dataclass(frozen=True)
class OsFacts:
    distro: str
    release: str
    version: str
    arch: str


def _at(f: EzFile, e: Entry) -> str:
    return f"{f.where}:{e.line}"


_JINJA = re.compile(r"\{[{%#]")


def literal(text: str) -> str:
    """`text` as a templated recipe key renders it back: a template's own text is data, so
    any `{{`, `{%` or `{#` in it is not jinja2 (its `{` written as `{{ '{' }}`)."""
    return text.replace("{", "{{ '{' }}") if _JINJA.search(text) else text


def os_facts(tree: EzTree, t: EzTemplate) -> OsFacts:
    """distro, release, version, arch of the tree's OS template, or one line saying why not."""
    where = t.where
    dist_file = t.files.get("distribution")
    dist = first(dist_file) if dist_file else None
    given = dist.text if dist else tree.osname
    distro = DISTRIBUTIONS.get(given.lower()) or DISTRIBUTIONS.get(given.lower().split("-")[0])
    at = _at(dist_file, dist) if dist_file and dist else f"{where} (OS name {tree.osname})"
    if distro is None:
        raise EzImportError(f"{at}: distribution {given!r}: vztt has no backend for it "
                            f"(it builds {', '.join(sorted(set(DISTRIBUTIONS.values())))})")
    pm_file = t.files.get("package_manager")
    pm = first(pm_file) if pm_file else None
    if pm_file is None or pm is None:
        raise EzImportError(f"{where}: no package_manager (vztt requires it in the OS template)")
    family = "apt" if pm.text.startswith("dpkg") else "dnf" if pm.text.startswith("rpm") else None
    if family is None:
        raise EzImportError(f"{_at(pm_file, pm)}: package_manager {pm.text!r}: vztt has no backend for it "
                            "(apt for dpkg*, dnf for rpm*)")
    if family != FAMILY[distro]:
        raise EzImportError(f"{_at(pm_file, pm)}: package_manager {pm.text!r} is not {distro}'s ({FAMILY[distro]})")
    if tree.osarch not in ARCHES:
        raise EzImportError(f"{where}: arch {tree.osarch!r}: vztt builds {', '.join(ARCHES)}")
    if family == "dnf":
        major = tree.osver.split(".")[0]
        if not major.isdigit() or int(major) < MIN_EL:
            raise EzImportError(f"{_at(pm_file, pm)}: {distro} {tree.osver}: EL {major} keeps its rpm database in "
                                f"BerkeleyDB, which Debian's rpm cannot write; vztt builds EL {MIN_EL} and later")
        return OsFacts(distro, major, tree.osver, tree.osarch)
    repos = t.files.get("repositories")
    entries = lines(repos) if repos else []
    if not entries:
        raise EzImportError(f"{where}: no repositories: the apt suite (release codename) cannot be told")
    suite = _apt_fields(repos, entries[0])[1]          # type: ignore[arg-type]
    return OsFacts(distro, suite.split("/")[0].split("-")[0], tree.osver, tree.osarch)


def _apt_fields(f: EzFile, e: Entry) -> tuple[str, str, list[str], str]:
    """url, suite, components and dropped options of an apt repositories line (`deb <line>`)."""
    text, options = e.text, ""
    if text.startswith("["):
        options, _, text = text[1:].partition("]")
    parts = text.split()
    if len(parts) < 3:
        raise EzImportError(f"{_at(f, e)}: expected URL SUITE COMPONENT... (vztt writes `deb <line>`), "
                            f"got {e.text!r}")
    return parts[0], parts[1], parts[2:], options.strip()


def _repo_name(suite: str, release: str, taken: set[str], prefix: str) -> str:
    name = {release: "main", f"{release}-updates": "updates", f"{release}-security": "security",
            f"{release}/updates": "security"}.get(suite) or "".join(c if c.isalnum() else "-" for c in suite)
    name = prefix + name
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def repositories(d: Draft, t: EzTemplate, facts: OsFacts, taken: set[str], prefix: str = "") -> None:
    """t's repositories into d (apt lines or yum baseurls), url.map names as our variables."""
    for key in ("repositories", "mirrorlist"):
        f = t.files.get(key)
        for e in lines(f) if f else []:
            if key == "mirrorlist":
                d.unsupported.append(Row(f"{key}:{e.line}", f"{e.text}: recipes name repositories by base URL "
                                         "through mirror variables, not by mirror lists"))
                continue
            if FAMILY[facts.distro] == "apt":
                url, suite, components, options = _apt_fields(f, e)
                url = literal(url)
            else:
                url, suite, components, options = yum_vars(literal(e.text)), "", [], ""
            try:
                mapped = translate(url)
            except UrlMapError as err:
                raise EzImportError(f"{_at(f, e)}: {err}") from None
            if mapped.literal:
                d.warnings.append(Row(f"{key}:{e.line}", f"{url} names a host without a url.map variable: kept as "
                                      "a literal URL (set a mirror variable instead)"))
            if options:
                d.warnings.append(Row(f"{key}:{e.line}", f"options [{options}] left out: vztt sets signed-by and "
                                      "arch itself"))
            name = _repo_name(suite, facts.release, taken, prefix) if suite else \
                _repo_name(f"repo{len(taken) + 1}", "", taken, prefix)
            record: dict[str, Any] = {"name": name, "url": mapped.url}
            if suite:
                record.update(suite=literal(suite), components=components)
            record["keyring"] = KEYRINGS[facts.distro]
            record["_comment"] = f"{key}:{e.line}: {e.text}"
            d.repositories.append(record)
            d.mapped.append(Row(f"{key}:{e.line}", f"repositories[{name}] {mapped.url}"
                                + (f" {suite} {' '.join(components)}" if suite else "")))


def environment(d: Draft, t: EzTemplate) -> None:
    f = t.files.get("environment")
    for e in lines(f) if f else []:
        var, sep, value = e.text.partition("=")
        if not sep or not var.replace("_", "").isalnum() or var[0].isdigit():
            raise EzImportError(f"{_at(f, e)}: expected VAR=value, got {e.text!r}")   # type: ignore[arg-type]
        if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]                 # the shell vztt hands it to would take the quotes off
        d.environment[var] = value
    if f is not None:
        d.mapped.append(Row("environment", f"environment ({len(d.environment)} variables)"))


def packages(d: Draft, t: EzTemplate, facts: OsFacts, os_template: bool) -> None:
    found: list[str] = []
    for key in ("packages_0", "packages_1", "packages") if os_template else ("packages",):
        f = t.files.get(key)
        if f is None:
            continue
        entries = words(f)
        rule, rules = (DEB_NAME, DEB_WORDS) if FAMILY[facts.distro] == "apt" else (RPM_SPEC, RPM_WORDS)
        for e in entries:
            if not rule.fullmatch(e.text):      # recipes take package names only, never an option
                raise EzImportError(f"{_at(f, e)}: {e.text!r} is not a package name ({rules})")
        got = [e.text for e in entries]
        found += [p for p in got if p not in found]
        stage = " (vztt's apt bootstrap stage: apt's Essential stage is ours)" if key != "packages" else ""
        d.mapped.append(Row(key, f"{len(got)} packages{stage}"))
    if os_template and FAMILY[facts.distro] == "dnf":
        d.packages["base"] = found
    else:
        if os_template:
            # The EZ template lists its packages; Essential (and apt) is the floor, as vztt's bootstrap.
            d.packages["priority"] = "essential"
        d.packages["include"] = found


def scripts(d: Draft, t: EzTemplate, table: tuple[tuple[str, str, str], ...], fallback: EzTemplate | None,
            recipe_dir: str, hook_prefix: str = "") -> None:
    """The template's scripts (or its base template's, as vztt falls back) as `ez` hooks."""
    for script, where, phase in table:
        f, origin = t.files.get(script), t
        if f is None and fallback is not None and script in fallback.files and not script.startswith("mid-"):
            f, origin = fallback.files[script], fallback
        if f is None:
            continue
        if not f.executable:
            d.unsupported.append(Row(script, "not executable: vztt runs only executable scripts"))
            continue
        if script == "mid-post-install" and "mid-pre-install" not in t.files:
            d.unsupported.append(Row(script, "vztt runs it only after a mid-pre-install, which this template lacks"))
            continue
        text_of(f)                                          # a script that is not text: one line naming it
        path = f"{recipe_dir}/{origin.label}/{script}"
        d.scripts[path] = f
        d.hooks.append({"name": hook_prefix + script, "where": where, "phase": phase, "convention": "ez",
                        "script": path})
        came = f" (os/{DEFAULT_SET}'s, as vztt falls back to the base template's)" if origin is not t else ""
        d.mapped.append(Row(script, f"hook {hook_prefix}{script}: {where}, {phase}{came}"))


def leftovers(d: Draft, t: EzTemplate, handled: set[str], why: dict[str, str]) -> None:
    """Every file of t not mapped, with the reason (`why` first, then WHY_NOT)."""
    for name in sorted(set(t.files) - handled - (READ - set(why))):
        f = t.files[name]
        if name in ("upgradable_versions",) and not words(f):
            continue                                        # empty (the specs `touch` it): nothing to say
        d.unsupported.append(Row(name, why.get(name) or WHY_NOT.get(name, "not a file vztt reads")))


def texts(d: Draft, t: EzTemplate, fallback_summary: str) -> None:
    f = t.files.get("summary")
    s = first(f) if f else None
    d.settings["summary"] = literal(s.text if s else fallback_summary)
    if s:
        d.mapped.append(Row("summary", "summary"))
    f = t.files.get("description")
    d.description = [e.text for e in lines(f)] if f else []
    if d.description:
        d.mapped.append(Row("description", "a comment at the top of the recipe (recipes have no description)"))


def osrelease(d: Draft, t: EzTemplate) -> None:
    f = t.files.get("osrelease")
    e = first(f) if f else None
    if f is None or e is None:
        return
    if not re.fullmatch(OSRELEASE_PATTERN, e.text):
        raise EzImportError(f"{_at(f, e)}: osrelease {e.text!r} is not a kernel release string")
    d.settings["osrelease"] = e.text
    d.mapped.append(Row("osrelease", f"osrelease {e.text}"))
