"""Recipes: TOML files in recipes/, with inheritance (`extends`), validated
against the settings table, merged parent first, then templated.

The result is a frozen Recipe: everything later steps need, with paths made
absolute and templates rendered, so nothing downstream reads TOML again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vztt.base.errors import RecipeError
from vztt.netconfig.settings import RECIPE_FIELDS as NET_FIELDS, RawSettings, check as check_net_settings
from vztt.recipe import layer as layering
from vztt.recipe.inputs import as_text, check_packages, confined_file, read_confined
from vztt.recipe.settings import APPEND, BY_KEY, BY_NAME, GROUPS, MERGE, SETTINGS, Setting
from vztt.recipe.templating import render

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
FAMILY = {"debian": "apt", "ubuntu": "apt", "centos-stream": "dnf", "almalinux": "dnf", "rockylinux": "dnf"}


@dataclass(frozen=True)
class Repository:
    name: str
    url: str                 # may hold mirror variables ($DEBIAN_MIRROR); expanded by recipe/variables.py
    suite: str
    components: tuple[str, ...]
    keyring: Path
    image_sources: bool = True
    repo_gpgcheck: bool = True   # dnf: repomd.xml must verify against its .asc
    image_url: str = ""          # the URL the template ships ("": url); mirror variables as in url


@dataclass(frozen=True)
class FileSpec:
    path: str                # absolute, normalised, inside the image
    content: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Hook:
    name: str
    where: str               # "image" or "host"
    script: str
    phase: str = "after-packages"   # before-packages | after-base | after-packages
    convention: str = "sh"          # sh: /bin/sh -e -c; ez: as vztt called template scripts


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    command: str
    exit_status: int = 0
    output: str | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    chain: tuple[Path, ...]          # the files, leaf first
    distro: str
    release: str
    version: str
    arch: str
    summary: str
    hostname: str
    variables: dict[str, str]
    merged_usr: bool
    priority: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    repositories: tuple[Repository, ...]
    files: tuple[FileSpec, ...]
    environment: dict[str, str]
    hooks: tuple[Hook, ...]
    smoke: tuple[SmokeCheck, ...]
    image_size: int
    format: str                      # a format, all, or several comma-separated (formats.parse reads it)
    disk_size: int
    ext4_features: str
    merged: dict[str, Any] = field(repr=False, compare=False)   # setting key -> value, after templating
    origins: dict[str, Path] = field(repr=False, compare=False)  # setting key -> file that set it last
    # dnf only; left out of an apt recipe's digests (below), so its digests and locks stay as they were
    base: tuple[str, ...] = ()
    install_weak_deps: bool = False
    nodocs: bool = True
    # Layers (`base`): the base template, the root OS template of the chain, the application
    # templates the layer stands for. Empty for other recipes, and then out of the digests.
    base_template: str = ""
    os_template: str = ""
    app_templates: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        return FAMILY[self.distro]

    def _without_dnf_keys(self, doc: dict[str, Any]) -> dict[str, Any]:
        if FAMILY.get(self.distro) != "dnf":
            for k in ("base", "install_weak_deps", "nodocs"):
                doc.pop(k, None)
            for r in doc.get("repositories", ()):
                r.pop("repo_gpgcheck", None)
        return doc

    @property
    def deb_arch(self) -> str:
        return DEB_ARCH[self.arch]

    def resolve_digest(self) -> str:
        """sha256 over what the solver is given: a lock made from other inputs is stale."""
        # image_url is what the template ships, not what the solver reads: a lock stays valid.
        doc = {"distro": self.distro, "release": self.release, "arch": self.arch, "priority": self.priority,
               "include": self.include, "exclude": self.exclude, "merged_usr": self.merged_usr,
               "repositories": [{k: v for k, v in asdict(r).items() if k != "image_url"} for r in self.repositories],
               "base": self.base, "install_weak_deps": self.install_weak_deps}
        if self.base_template:
            doc["base_template"] = self.base_template
        self._without_dnf_keys(doc)
        text = json.dumps(doc, sort_keys=True, default=_json_default, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def digest(self) -> str:
        """sha256 over everything that shapes the template (file contents included)."""
        doc = asdict(self)
        for k in ("path", "chain", "merged", "origins"):
            doc.pop(k)
        for r in doc["repositories"]:
            if not r["image_url"]:       # not set: the digest of a recipe from before the key
                r.pop("image_url")
        self._without_dnf_keys(doc)
        # Keys newer than a recipe's digest count only when set: older recipes keep their digests.
        # (compression.level: only a level other than the default counts.)
        level = self.merged.get("compression.level", BY_NAME["compression.level"].default)
        if level != BY_NAME["compression.level"].default:
            doc["compression_level"] = level
        for d, defaults in [(doc, {"base_template": "", "os_template": "", "app_templates": ()}),
                            *((h, {"phase": "after-packages", "convention": "sh"}) for h in doc["hooks"])]:
            for k in [k for k, default in defaults.items() if d[k] == default]:
                d.pop(k)
        text = json.dumps(doc, sort_keys=True, default=_json_default, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, Path):
        # Keyrings count by content: moving the tree must not change the digest.
        try:
            return hashlib.sha256(value.read_bytes()).hexdigest()
        except OSError:
            return str(value)
    raise TypeError(type(value))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


# --------------------------------------------------------------------------
# Validation of one file against the table
# --------------------------------------------------------------------------

def _check_type(value: Any, setting: Setting, where: str) -> None:
    t = setting.type
    ok = {
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "str|list[str]": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "dict[str,str]": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "records": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    }[t](value)
    if not ok:
        raise RecipeError(f"{where}: expected {setting.toml_type}, got {_describe(value)}")
    if setting.choices:
        # A list (or a comma-separated string) names several: each must be a choice.
        items = value if isinstance(value, list) else value.split(",") if t == "str|list[str]" else [value]
        for item in items:
            if (item.strip() if isinstance(item, str) else item) not in setting.choices:
                raise RecipeError(f"{where}: {item!r} is not one of {', '.join(setting.choices)}")
    if setting.pattern and not re.fullmatch(setting.pattern, value):
        raise RecipeError(f"{where}: {value!r} is not valid: {setting.pattern_doc or setting.pattern}")


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "an array" if not value else f"an array of {type(value[0]).__name__}"
    return f"{type(value).__name__} {value!r}"[:80]


def _flatten(doc: dict[str, Any], file: Path) -> dict[str, Any]:
    """TOML document -> {setting key: value}, rejecting unknown keys."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key in GROUPS:
            if not isinstance(value, dict):
                raise RecipeError(f"{file}: {key}: expected a table, got {_describe(value)}")
            for sub, subval in value.items():
                _put(flat, f"{key}.{sub}", subval, file)
        else:
            _put(flat, key, value, file)
    return flat


def _put(flat: dict[str, Any], key: str, value: Any, file: Path) -> None:
    setting = BY_NAME.get(key)
    if setting is None:
        raise RecipeError(f"{file}: {key}: unknown key (see `vztt settings`)")
    _check_type(value, setting, f"{file}: {key}")
    if setting.type == "records":
        value = [_check_record(item, setting, i, file) for i, item in enumerate(value)]
    flat[key] = value


def _check_record(item: dict[str, Any], setting: Setting, index: int, file: Path) -> dict[str, Any]:
    fields = {f.key: f for f in setting.fields}
    ident = item.get(setting.record_key)
    label = f"{file}: {setting.key}[{ident if isinstance(ident, str) else index}]"
    if not isinstance(ident, str) or not ident:
        raise RecipeError(f"{label}: missing `{setting.record_key}`")
    for k, v in item.items():
        f = fields.get(k)
        if f is None:
            raise RecipeError(f"{label}.{k}: unknown key (one of {', '.join(fields)})")
        _check_type(v, f, f"{label}.{k}")
    out = dict(item)
    # Relative file references belong to the directory of the file that names them, and stay in it.
    for ref in ("source", "script"):
        if ref in out:
            out[ref] = str(confined_file(file, out[ref], f"{label}.{ref}"))
    if setting.key == "repositories" and "keyring" in out:
        kr = Path(out["keyring"])
        p = kr if kr.is_absolute() else file.parent / "keys" / kr
        if not p.is_file():
            raise RecipeError(f"{label}.keyring: no such keyring {p}")
        out["keyring"] = str(p.resolve())
    if setting.key == "files":
        path = out["path"]
        norm = posixpath.normpath(path) if path.startswith("/") else ""
        if not norm.startswith("/") or norm == "/" or ".." in path.split("/") or norm.startswith("//"):
            raise RecipeError(f"{label}.path: {path!r} is outside the image (an absolute path below / is required)")
        sources = [k for k in ("content", "template", "source") if k in out]
        if len(sources) != 1:
            raise RecipeError(f"{label}: exactly one of content, template, source is required")
        try:
            int(out.get("mode", "0644"), 8)
        except ValueError:
            raise RecipeError(f"{label}.mode: {out['mode']!r} is not an octal mode") from None
    if setting.key == "hooks" and sum(k in out for k in ("run", "script")) != 1:
        raise RecipeError(f"{label}: exactly one of run, script is required")
    return out


# --------------------------------------------------------------------------
# Inheritance
# --------------------------------------------------------------------------

def _merge(parent: Any, child: Any, setting: Setting) -> Any:
    if setting.merge == APPEND:
        return list(parent) + [x for x in child if x not in parent]
    if setting.merge == MERGE:
        return {**parent, **child}
    if setting.merge == BY_KEY:
        out = {r[setting.record_key]: dict(r) for r in parent}
        for r in child:
            out[r[setting.record_key]] = {**out.get(r[setting.record_key], {}), **r}
            if setting.key in ("files", "hooks"):
                # A child that switches content/template/source or run/script replaces the old one.
                for group in (("content", "template", "source"), ("run", "script")):
                    given = [k for k in group if k in r]
                    for k in group:
                        if given and k not in given:
                            out[r[setting.record_key]].pop(k, None)
            if setting.key == "repositories" and "url" in r and "image_url" not in r:
                out[r[setting.record_key]].pop("image_url", None)    # another archive: it ships its own url
        return list(out.values())
    return child


class RecipeStore:
    """The recipes directory: lists names and loads merged recipes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._bases: list[str] = []      # layers being loaded, to catch a cycle of bases
        if not self.directory.is_dir():
            raise RecipeError(f"{self.directory}: recipes directory does not exist")

    def path_of(self, name: str) -> Path:
        return self.directory / f"{name}.toml"

    def names(self, include_abstract: bool = False, keep_unreadable: bool = False) -> list[str]:
        """Recipe names; with keep_unreadable, a file that is not valid TOML is listed too
        (as buildable: loading it says what is wrong) instead of failing the listing."""
        out = []
        for p in sorted(self.directory.glob("*.toml")):
            try:
                abstract = self._read(p).get("abstract", False)
            except RecipeError:
                if not keep_unreadable:
                    raise
                abstract = False
            if include_abstract or not abstract:
                out.append(p.stem)
        return out

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: invalid TOML: {e}") from None
        except OSError as e:
            raise RecipeError(f"{path}: cannot read: {e.strerror}") from None

    def load(self, name: str, allow_abstract: bool = False) -> Recipe:
        if not NAME_RE.match(name):
            raise RecipeError(f"{name!r}: not a valid template name")
        path = self.path_of(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise RecipeError(f"{name}: no such recipe in {self.directory} (known: {known})")
        chain: list[Path] = []
        layers: list[dict[str, Any]] = []
        current, referrer, via = path, None, "extends"
        while True:
            if current in chain:
                cycle = " -> ".join(p.stem for p in chain + [current])
                raise RecipeError(f"{chain[-1]}: {via}: inheritance cycle {cycle}")
            if not current.is_file():
                raise RecipeError(f"{referrer}: {via}: parent recipe {current.stem!r} not found in {self.directory}")
            chain.append(current)
            layer = _flatten(self._read(current), current)
            layers.append(layer)
            parent = layer.get(via := "extends" if "extends" in layer else "base")   # a layer's base: its parent too
            if parent is None:
                break
            if not NAME_RE.match(parent):
                raise RecipeError(f"{current}: {via}: {parent!r} is not a recipe name")
            referrer, current = current, self.directory / f"{parent}.toml"

        merged: dict[str, Any] = {s.key: _copy(s.default) for s in SETTINGS if s.inherit}
        origins: dict[str, Path] = {}
        for file, layer in zip(reversed(chain), reversed(layers)):
            for key, value in layer.items():
                setting = BY_NAME[key]
                if not setting.inherit:
                    continue
                merged[key] = _merge(merged[key], value, setting)
                origins[key] = file
        leaf = layers[0]
        if leaf.get("abstract", False) and not allow_abstract:
            raise RecipeError(f"{path}: abstract recipe (a base for others): it cannot be built")
        if "name" in leaf and leaf["name"] != name:
            raise RecipeError(f"{path}: name: {leaf['name']!r} differs from the file name {name!r}")
        merged["name"] = name
        merged["abstract"] = leaf.get("abstract", False)
        merged["extends"] = leaf.get("extends")
        merged["app_templates"] = leaf.get("app_templates", [])
        origins["name"] = path
        for key in ("abstract", "extends"):
            if key in leaf:
                origins[key] = path
        recipe = _finish(name, path, tuple(chain), merged, origins, allow_abstract)
        return self._layered(recipe) if merged.get("base") else recipe

    def _layered(self, recipe: Recipe) -> Recipe:
        """A layer: only what it adds to its base's recipe is built (recipe/layer.py)."""
        where, base_name = f"{recipe.origins.get('base', recipe.path)}: base", recipe.merged["base"]
        layering.check_name(base_name, recipe.name, NAME_RE, where, self._bases)
        try:
            self._bases.append(recipe.name)
            base = self.load(base_name)
        except RecipeError as e:
            raise RecipeError(e.message if e.message.startswith(where) else f"{where}: {e}") from None
        finally:
            self._bases.remove(recipe.name)
        layering.check_fixed(m := recipe.merged, bm := base.merged, where, base_name)
        return dataclasses.replace(
            recipe, base_template=base_name, os_template=base.os_template or base_name,
            app_templates=layering.app_names(recipe.name, m, base.app_templates),
            include=layering.own_packages(recipe.include, bm["packages.include"]),
            files=layering.own_items(recipe.files, m["files"], bm["files"]),
            hooks=layering.own_items(recipe.hooks, m["hooks"], bm["hooks"]))


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, (list, dict)) else value


def _template_vars(merged: dict[str, Any]) -> dict[str, Any]:
    v = {k: merged.get(k) for k in ("name", "distro", "release", "version", "arch", "hostname", "summary",
                                    "cpu_level")}
    v["deb_arch"] = DEB_ARCH.get(merged.get("arch") or "", "")
    v.update(merged.get("variables") or {})
    return v


def _finish(name: str, path: Path, chain: tuple[Path, ...], merged: dict[str, Any],
            origins: dict[str, Path], allow_abstract: bool) -> Recipe:
    def where(key: str) -> str:
        return f"{origins.get(key, path)}: {key}"

    for key in ("distro", "release", "version"):
        if merged.get(key) is None and not (allow_abstract and merged["abstract"]):
            raise RecipeError(f"{path}: {key}: required (set it here or in a parent recipe)")
    family = FAMILY.get(merged.get("distro") or "", "apt")
    for key in ("packages.include", "packages.exclude", "packages.base"):
        check_packages(family, merged[key], where(key))
    # The boot test's network settings, checked as `vztt create` checks its options.
    check_net_settings(RawSettings(**{f: merged[f"boot.{f}"] for f in NET_FIELDS}), RecipeError,
                       lambda f: where(f"boot.{f}"))
    variables = _template_vars(merged)
    if merged.get("summary"):
        merged["summary"] = render(merged["summary"], variables, where("summary"))
        variables["summary"] = merged["summary"]

    repos = []
    apt = FAMILY.get(merged.get("distro") or "", "apt") == "apt"
    for r in merged["repositories"]:
        label = f"{where('repositories')}[{r['name']}]"
        if not r.get("enabled", True):
            continue
        for req in ("url", "suite", "keyring") if apt else ("url", "keyring"):
            if req not in r:
                raise RecipeError(f"{label}.{req}: required")
        repos.append(Repository(
            name=r["name"],
            url=render(r["url"], variables, label + ".url"),
            suite=render(r.get("suite", ""), variables, label + ".suite"),
            components=tuple(r.get("components", ["main"] if apt else [])),
            keyring=Path(r["keyring"]),
            image_sources=r.get("image_sources", True),
            repo_gpgcheck=r.get("repo_gpgcheck", True),
            image_url=render(r["image_url"], variables, label + ".image_url") if "image_url" in r else "",
        ))

    files = []
    for f in merged["files"]:
        label = f"{where('files')}[{f['path']}]"
        if "content" in f:
            content = f["content"].encode()
        elif "template" in f:
            content = render(f["template"], variables, label + ".template").encode()
        else:
            src = Path(f["source"])
            content = read_confined(src, label + ".source")      # a binary file is copied as it is
            if src.suffix == ".j2":
                text = as_text(content, src, label + ".source", "a .j2 template must be")
                content = render(text, variables, f"{src}").encode()
        files.append(FileSpec(path=posixpath.normpath(f["path"]), content=content,
                              mode=int(f.get("mode", "0644"), 8), uid=f.get("uid", 0), gid=f.get("gid", 0)))

    hooks = []
    for h in merged["hooks"]:
        label = f"{where('hooks')}[{h['name']}]"
        if "run" in h:
            script = render(h["run"], variables, label + ".run")
        else:
            src = Path(h["script"])
            script = as_text(read_confined(src, label + ".script"), src, label + ".script", "a hook script must be")
        hook = Hook(name=h["name"], where=h.get("where", "image"), script=script,
                    phase=h.get("phase", "after-packages"), convention=h.get("convention", "sh"))
        if hook.phase == "before-packages" and hook.where != "host":
            raise RecipeError(f"{label}.phase: before-packages hooks run on the host (the image has no shell yet)")
        hooks.append(hook)

    smoke = []
    for s in merged["smoke"]:
        label = f"{where('smoke')}[{s['name']}]"
        if "command" not in s:
            raise RecipeError(f"{label}.command: required")
        command = render(s["command"], variables, label + ".command")
        output = render(s["output"], variables, label + ".output") if "output" in s else None
        if output is not None:
            try:
                re.compile(output)
            except re.error as e:
                raise RecipeError(f"{label}.output: bad regular expression: {e}") from None
        smoke.append(SmokeCheck(name=s["name"], command=command, exit_status=s.get("exit_status", 0), output=output))

    # `vztt show` prints what the build uses: templates rendered, disabled repositories gone.
    merged["repositories"] = [{**r, "url": x.url, **({"suite": x.suite} if apt else {}),
                               **({"image_url": x.image_url} if x.image_url else {})}
                              for r, x in zip([r for r in merged["repositories"] if r.get("enabled", True)], repos)]
    merged["hooks"] = [{**h, "run": x.script} if "run" in h else h for h, x in zip(merged["hooks"], hooks)]
    merged["smoke"] = [{**s, "command": x.command, **({"output": x.output} if x.output is not None else {})}
                       for s, x in zip(merged["smoke"], smoke)]
    level = merged.get("compression.level", BY_NAME["compression.level"].default)
    if not 0 <= level <= 9:
        raise RecipeError(f"{where('compression.level')}: {level} is not a level from 0 to 9")
    sizes = {}
    for key in ("image.size", "disk.size"):
        try:
            sizes[key] = parse_size(merged[key])
        except ValueError as e:
            raise RecipeError(f"{where(key)}: {e}") from None

    return Recipe(
        name=name, path=path, chain=chain,
        distro=merged.get("distro") or "", release=str(merged.get("release") or ""),
        version=str(merged.get("version") or ""), arch=merged["arch"], summary=merged["summary"],
        hostname=merged["hostname"], variables=dict(merged["variables"]), merged_usr=merged["merged_usr"],
        priority=merged["packages.priority"], include=tuple(merged["packages.include"]),
        exclude=tuple(merged["packages.exclude"]), repositories=tuple(repos), files=tuple(files),
        environment=dict(merged["environment"]), hooks=tuple(hooks), smoke=tuple(smoke),
        image_size=sizes["image.size"], disk_size=sizes["disk.size"],
        format=",".join(merged["format"]) if isinstance(merged["format"], list) else merged["format"],
        ext4_features=merged["disk.ext4_features"], merged=merged, origins=origins,
        base=tuple(merged["packages.base"]), install_weak_deps=merged["dnf.install_weak_deps"],
        nodocs=merged["dnf.nodocs"],
    )
