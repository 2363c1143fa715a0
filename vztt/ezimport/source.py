"""Finding the EZ templates in what `vztt import-ez` is given.

Two kinds of SOURCE:

- an installed tree, the `config/` directory of one OS template
  (`/vz/template/<os>/<ver>/<arch>/config`, or its parent): `os/default` is
  the OS template `<os>-<ver>-<arch>`, `os/<set>` an extra OS set, and
  `app/<app>/<set>` the application templates. A directory is a template
  when it holds `packages` (vztt's is_tmpl()).
- a source tree, as OpenVZ's `*-ez` repositories are: files named
  `<tmpl>_<file>` and a spec whose %install puts them into that layout. The
  spec is read, not run: its `%define`s (template name, version, arch,
  package manager), the files each `installfile` call installs (and with
  which mode), and the files it writes with `echo "..." > $dir/<file>`
  (summary, description, package_manager). The templates are the `*_packages`
  files (the spec's templates_list): `os` is the OS template, `os_<set>` an
  extra OS set, anything else an application template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vztt.ezimport.rules import EzFile, EzImportError, read_file

DEFAULT_SET = "default"


@dataclass
class EzTemplate:
    kind: str                        # "os" or "app"
    set: str                         # "default", or the extra set's name
    app: str = ""                    # an application template's name
    files: dict[str, EzFile] = field(default_factory=dict)
    where: str = ""                  # the directory (or the spec tree's files) messages name

    @property
    def label(self) -> str:
        return f"os/{self.set}" if self.kind == "os" else f"app/{self.app}/{self.set}"


@dataclass
class EzTree:
    source: Path
    osname: str
    osver: str
    osarch: str
    templates: list[EzTemplate]
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (file, why): read by nobody

    @property
    def name(self) -> str:
        return f"{self.osname}-{self.osver}-{self.osarch}"

    def os(self, set_name: str = DEFAULT_SET) -> EzTemplate | None:
        return next((t for t in self.templates if t.kind == "os" and t.set == set_name), None)


def load(source: Path) -> EzTree:
    source = Path(source)
    if not source.is_dir():
        raise EzImportError(f"{source}: no such directory")
    if (source / "config" / "os").is_dir():
        source = source / "config"
    if (source / "os").is_dir():
        return _installed(source.resolve())
    specs = sorted(source.glob("*.spec"))
    if len(specs) == 1:
        return _spec_tree(source.resolve(), specs[0].resolve())
    if len(specs) > 1:
        raise EzImportError(f"{source}: {len(specs)} spec files ({', '.join(p.name for p in specs)}); one is expected")
    raise EzImportError(f"{source}: neither an EZ template tree (a config/ directory with os/default/) "
                        "nor a source tree with a .spec file")


# --------------------------------------------------------------------------
# An installed tree
# --------------------------------------------------------------------------

def _installed(config: Path) -> EzTree:
    parts = config.parts
    if len(parts) < 5:
        raise EzImportError(f"{config}: not in vztt's layout <os>/<version>/<arch>/config")
    osname, osver, osarch = parts[-4], parts[-3], parts[-2]
    templates = []
    if not (config / "os" / DEFAULT_SET).is_dir():
        raise EzImportError(f"{config}/os/{DEFAULT_SET}: missing: the OS template itself")
    for d in sorted(p for p in (config / "os").iterdir() if p.is_dir()):
        templates.append(_template_dir(d, "os", d.name))
    app_root = config / "app"
    for app in sorted(p for p in app_root.iterdir() if p.is_dir()) if app_root.is_dir() else []:
        for d in sorted(p for p in app.iterdir() if p.is_dir()):
            templates.append(_template_dir(d, "app", d.name, app.name))
    return EzTree(source=config, osname=osname, osver=osver, osarch=osarch, templates=templates)


def _template_dir(d: Path, kind: str, set_name: str, app: str = "") -> EzTemplate:
    t = EzTemplate(kind=kind, set=set_name, app=app, where=str(d))
    for f in sorted(d.iterdir()):
        if f.is_file() and not f.is_symlink():
            t.files[f.name] = read_file(f)
    if "packages" not in t.files:
        raise EzImportError(f"{d}: no `packages` file: not an EZ template (vztt requires one in every template)")
    return t


# --------------------------------------------------------------------------
# A source tree with a spec
# --------------------------------------------------------------------------

_DEFINE = re.compile(r"^%define\s+(\w+)\s+(.*?)\s*$")
_INSTALLFILE = re.compile(r"^\s*installfile\s+\$tmpl\s+(\d+)\s+\$dir\s+(\S+)\s*$")
_ECHO = re.compile(r'^\s*echo\s+"(.*)"\s*>\s*\$dir/(\S+)\s*$')


@dataclass
class _Spec:
    defines: dict[str, str]
    installs: dict[str, dict[str, int]]      # context ("os", "app", "common") -> file name -> mode
    echoes: dict[str, dict[str, str]]        # context -> file name -> text (macros not yet expanded)

    def expand(self, text: str, depth: int = 0) -> str:
        if depth > 10:
            return text
        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name.startswith("?"):
                return ""                    # %{?dist}: not defined outside rpmbuild
            return self.defines.get(name, m.group(0))
        out = re.sub(r"%\{(\??\w+)\}|%(\w+)", sub, text)
        return out if out == text else self.expand(out, depth + 1)

    def files_for(self, kind: str) -> dict[str, int]:
        return {**self.installs.get(kind, {}), **self.installs.get("common", {})}


def _read_spec(path: Path) -> _Spec:
    spec = _Spec(defines={}, installs={}, echoes={})
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EzImportError(f"{path}: cannot read the spec: {e}") from None
    context, in_install = "common", False
    for raw in text.splitlines():
        if m := _DEFINE.match(raw):
            if not m.group(2).endswith("\\") and "(" not in raw.split()[1]:
                spec.defines[m.group(1)] = m.group(2)
            continue
        if raw.startswith("%"):
            in_install = raw.strip() == "%install"
            continue
        if not in_install:
            continue
        line = raw.strip()
        if re.match(r'^if \[ \$tmpl = "?os"? \]', line):
            context = "os"
        elif line == "else" and context == "os":
            context = "app"
        elif line == "fi":
            context = "common"
        elif m := _INSTALLFILE.match(raw):
            spec.installs.setdefault(context, {})[m.group(2)] = int(m.group(1), 8)
        elif m := _ECHO.match(raw):
            spec.echoes.setdefault(context, {})[m.group(2)] = m.group(1)
    for key in ("templatename", "templatever", "templatearch"):
        if key not in spec.defines:
            raise EzImportError(f"{path}: no `%define {key}`: not an EZ template spec")
    return spec


def _spec_tree(source: Path, spec_path: Path) -> EzTree:
    spec = _read_spec(spec_path)
    names = sorted(p.name[:-len("_packages")] for p in source.glob("*_packages") if p.is_file())
    if "os" not in names:
        raise EzImportError(f"{source}: no os_packages: the OS template needs a `packages` file "
                            "(vztt requires one in every template)")
    tree = EzTree(source=source, osname=spec.expand("%templatename"), osver=spec.expand("%templatever"),
                  osarch=spec.expand("%templatearch"), templates=[])
    claimed: set[str] = set()
    for tmpl in sorted(names, key=lambda n: (n != "os", not n.startswith("os_"), n)):
        kind = "os" if tmpl == "os" or tmpl.startswith("os_") else "app"
        t = EzTemplate(kind=kind, set=DEFAULT_SET if tmpl in ("os",) or kind == "app" else tmpl[3:],
                       app=tmpl if kind == "app" else "", where=f"{source}/{tmpl}_*")
        for name, mode in sorted(spec.files_for(kind).items()):
            path = source / f"{tmpl}_{name}"
            if path.is_file():
                f = read_file(path)
                t.files[name] = EzFile(name=name, where=str(path), data=f.data, executable=bool(mode & 0o111))
                claimed.add(path.name)
        for name, text in sorted({**spec.echoes.get(kind, {}), **spec.echoes.get("common", {})}.items()):
            value = spec.expand(text).replace("$tmpl", tmpl).replace("${tmpl}", tmpl)
            t.files.setdefault(name, EzFile(name=name, where=f"{spec_path} (echo > $dir/{name})",
                                            data=(value + "\n").encode(), executable=False))
        tree.templates.append(t)
    for p in sorted(source.iterdir()):
        if p.is_file() and p != spec_path and p.name not in claimed and "_" in p.name:
            tree.skipped.append((str(p), "the spec does not install it (rpmbuild would leave it out)"))
    return tree
