"""Configuring the kernel: `make tinyconfig`, the fragments merged in (the
shared one, then the architecture's), `make olddefconfig`; each fragment
option compared with what survived, and a dropped one explained from the
Kconfig files (what it depends on, with the values found). Also the
architectures the kernel is built for (TARGETS), kbuild's command line and
reproducible environment."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from vztt.base.proc import Log, run, tool_env
from vztt.kernel import STEP_TIMEOUT



@dataclass(frozen=True)
class Target:
    """An architecture the kernel is built for. vztt names it as `uname -m`
    does (recipes' `arch`, kernel/arch/<arch>.config, the cache entry's name);
    kbuild has names of its own for it."""
    arch: str               # uname -m
    make_arch: str          # kbuild's ARCH=
    srcarch: str            # arch/<srcarch>/ in the tree: $(SRCARCH) in Kconfig's `source` lines
    image: str              # the make target, also the file's name in arch/<srcarch>/boot/ and in the cache
    cross_compile: str      # CROSS_COMPILE= when the host is another architecture
    cross_package: str      # the Debian package with that compiler

    @property
    def image_path(self) -> str:
        """Where the build leaves the image, in the tree."""
        return f"arch/{self.srcarch}/boot/{self.image}"

    def cross_prefix(self) -> str:
        """CROSS_COMPILE for this host: empty when the host is the target."""
        return "" if self.arch == host_arch() else self.cross_compile


TARGETS: dict[str, Target] = {
    # bzImage: what qemu's -kernel boots on microvm (and what carries the version in its setup header)
    "x86_64": Target("x86_64", "x86_64", "x86", "bzImage", "x86_64-linux-gnu-", "gcc-x86-64-linux-gnu"),
    # Image: uncompressed; qemu's -kernel boots it on virt (Image.gz would need gzip and qemu's unpacking)
    "aarch64": Target("aarch64", "arm64", "arm64", "Image", "aarch64-linux-gnu-", "gcc-aarch64-linux-gnu"),
}


def host_arch() -> str:
    return platform.machine()


def target(arch: str | None = None) -> Target:
    """The target for `arch` (uname -m; None: the host's). BadUsage for an
    architecture vztt builds no kernel for."""
    from vztt.base.errors import BadUsage
    name = arch or host_arch()
    if name not in TARGETS:
        raise BadUsage(f"no container kernel for architecture {name!r} (vztt builds {', '.join(sorted(TARGETS))})")
    return TARGETS[name]

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value as written ('y', 'm', '"str"', '8'), 'n' for `is not set`."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _OPTION.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            options[m.group(1)] = "n"
    return options


@dataclass
class Option:
    name: str
    wanted: str
    got: str            # 'n' when the option is unset or invisible in .config
    needs: str = ""     # for a dropped option: what it depends on, with the values found
    fragment: str = ""  # the fragment file that sets it (kernel/'s relative name)

    @property
    def survived(self) -> bool:
        return self.wanted == self.got

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "wanted": self.wanted, "got": self.got, "survived": self.survived,
                             "fragment": self.fragment}
        if self.needs:
            d["needs"] = self.needs
        return d


def compare_options(fragment: dict[str, str], final: dict[str, str],
                    origin: dict[str, str] | None = None) -> list[Option]:
    """Each fragment option against the configuration olddefconfig wrote
    (origin: option -> the fragment file that sets it)."""
    origin = origin or {}
    return [Option(name, wanted, final.get(name, "n"), fragment=origin.get(name, ""))
            for name, wanted in fragment.items()]


def read_fragments(fragments: list[tuple[str, Path]]) -> tuple[dict[str, str], dict[str, str]]:
    """The fragments' options as merge_config.sh merges them (a later file's
    value wins; the order is the first file's), and option -> the file that
    set the value kept."""
    options: dict[str, str] = {}
    origin: dict[str, str] = {}
    for name, path in fragments:
        for option, value in parse_config(path.read_text()).items():
            options[option] = value
            origin[option] = name
    return options, origin


def explain_dropped(tree: Path, options: list[Option], final: dict[str, str], srcarch: str = "x86") -> None:
    """Fill `needs` of each dropped option from the Kconfig files, read from
    the top one along `source` lines: the `if` blocks and `menu ... depends
    on` around its entry and its own `depends on` lines, each symbol with its
    value in the final configuration (SYMBOL[y])."""
    dropped = {o.name[len("CONFIG_"):]: o for o in options if not o.survived}
    if not dropped:
        return
    found: dict[str, list[str]] = {}
    for symbol, conditions in _kconfig_entries(tree, tree / "Kconfig", [], set(), srcarch):
        if symbol in dropped and symbol not in found:
            found[symbol] = conditions

    def annotate(expr: str) -> str:
        # A symbol, unless it is compared (FOO=y): FOO[value].
        return re.sub(r"\b([A-Z][A-Z0-9_]+)\b(?!\s*!?=)",
                      lambda m: f"{m.group(1)}[{final.get('CONFIG_' + m.group(1), 'n')}]", expr)

    for symbol, option in dropped.items():
        conditions = found.get(symbol)
        if conditions is None:
            option.needs = f"no such option in this kernel's Kconfig for {srcarch}"
        elif not conditions:
            option.needs = "no dependency found (set by a `select`, or a choice?)"
        else:
            option.needs = "; ".join(annotate(c) for c in conditions)


def _kconfig_entries(tree: Path, path: Path, outer: list[str], seen: set[Path],
                     srcarch: str) -> Iterator[tuple[str, list[str]]]:
    """(symbol, its conditions) for every config entry of a Kconfig file and
    the files it sources, in order: only the target's arch/ (an x86-only
    option is not an option of arm64's kernel)."""
    if path in seen or not path.is_file():
        return
    seen.add(path)
    stack: list[str] = []                  # this file's `if` and `menu` conditions
    entry: tuple[str, list[str]] | None = None
    menu: list[str] | None = None          # the `depends on` of the menu being opened
    help_indent: int | None = None
    for raw in path.read_text(errors="replace").splitlines():
        indent = len(raw.expandtabs(8)) - len(raw.expandtabs(8).lstrip())
        if help_indent is not None:
            if not raw.strip() or indent > help_indent:
                continue
            help_indent = None
        line = raw.split("#", 1)[0].strip() if '"' not in raw else raw.strip()
        if not line:
            continue
        word = line.split()[0]
        if word in ("help", "---help---"):
            help_indent = indent
            continue
        if word in ("config", "menuconfig") and len(line.split()) == 2:
            if entry:
                yield entry
            entry = (line.split()[1], outer + [c for c in stack if c])
            menu = None
        elif line.startswith("depends on "):
            cond = line[len("depends on "):]
            if entry:
                entry[1].append(f"depends on {cond}")
            elif menu is not None:
                menu.append(cond)
                stack[-1] = "within menu depending on " + " && ".join(f"({c})" for c in menu)
        elif word in ("if", "menu", "choice", "endif", "endmenu", "endchoice", "source", "rsource",
                      "osource", "orsource", "comment", "mainmenu"):
            if entry:
                yield entry
                entry = None
            menu = None
            if word == "if":
                stack.append(f"within `if {line[3:].strip()}`")
            elif word in ("menu", "choice"):
                stack.append("")
                if word == "menu":
                    menu = []
            elif word in ("endif", "endmenu", "endchoice") and stack:
                stack.pop()
            elif word in ("source", "rsource", "osource", "orsource") and (m := re.search(r'"([^"]+)"', line)):
                name = m.group(1).replace("$(SRCARCH)", srcarch).replace("$SRCARCH", srcarch)
                base = path.parent if word.startswith(("r", "or")) else tree
                for sub in sorted(base.glob(name)) if any(c in name for c in "*?[") else [base / name]:
                    yield from _kconfig_entries(tree, sub, outer + [c for c in stack if c], seen, srcarch)
    if entry:
        yield entry


def make_command(tree: Path, target: Target, *goals: str, jobs: int = 1) -> list[str]:
    """kbuild for `target`: ARCH= always, CROSS_COMPILE= when the host is
    another architecture (kconfig too runs the compiler: it checks what the
    compiler supports)."""
    cross = target.cross_prefix()
    return ["make", "-C", str(tree), f"ARCH={target.make_arch}", *([f"CROSS_COMPILE={cross}"] if cross else []),
            f"-j{jobs}", *goals]


def make_env(epoch: int | None = None) -> dict[str, str]:
    """kbuild's environment. With the source's date (source_date_epoch) the
    build is reproducible: what it would take from the clock, the user, the
    host and the build counter (.version) is fixed, and the tree's paths are
    relative (an in-tree build), so another directory gives the same bytes."""
    env = tool_env(KBUILD_BUILD_USER="vztt", KBUILD_BUILD_HOST="vztt", KBUILD_BUILD_VERSION="1")
    if epoch is not None:
        env["KBUILD_BUILD_TIMESTAMP"] = build_timestamp(epoch)
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    return env


def build_timestamp(epoch: int) -> str:
    """`date -u` of the epoch, as kbuild writes its own (in uname -v)."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%a %b %e %H:%M:%S UTC %Y")


def configure(tree: Path, fragments: list[tuple[str, Path]], target: Target,
              log: Log | None = None) -> tuple[list[Option], dict[str, str]]:
    """tinyconfig, the fragments merged in order ((name, path): the shared
    one, then the architecture's), olddefconfig. Returns the fragments'
    options with what survived (dropped ones explained) and the whole config."""
    env = make_env()
    run(make_command(tree, target, "tinyconfig"), log=log, env=env, what="make tinyconfig", timeout=STEP_TIMEOUT)
    run(["bash", str(tree / "scripts/kconfig/merge_config.sh"), "-m", ".config",
         *(str(path.resolve()) for _, path in fragments)],
        log=log, env={**env, "ARCH": target.make_arch}, cwd=tree, what="merge_config.sh", timeout=STEP_TIMEOUT)
    run(make_command(tree, target, "olddefconfig"), log=log, env=env, what="make olddefconfig", timeout=STEP_TIMEOUT)
    final = parse_config((tree / ".config").read_text())
    wanted, origin = read_fragments(fragments)
    options = compare_options(wanted, final, origin)
    explain_dropped(tree, options, final, target.srcarch)
    return options, final


def dropped_message(options: list[Option]) -> str:
    return "; ".join(f"{o.name}={o.wanted} became {o.got} ({o.needs})" for o in options if not o.survived)
