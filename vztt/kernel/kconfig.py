"""Configuring the kernel: `make tinyconfig`, the fragment merged in,
`make olddefconfig`; each fragment option compared with what survived, and a
dropped one explained from the Kconfig files (what it depends on, with the
values found). Also kbuild's command line and reproducible environment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from vztt.base.proc import Log, run, tool_env
from vztt.kernel import STEP_TIMEOUT

ARCH = "x86_64"
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

    @property
    def survived(self) -> bool:
        return self.wanted == self.got

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "wanted": self.wanted, "got": self.got, "survived": self.survived}
        if self.needs:
            d["needs"] = self.needs
        return d


def compare_options(fragment: dict[str, str], final: dict[str, str]) -> list[Option]:
    """Each fragment option against the configuration olddefconfig wrote."""
    return [Option(name, wanted, final.get(name, "n")) for name, wanted in fragment.items()]


def explain_dropped(tree: Path, options: list[Option], final: dict[str, str]) -> None:
    """Fill `needs` of each dropped option from the Kconfig files, read from
    the top one along `source` lines: the `if` blocks and `menu ... depends
    on` around its entry and its own `depends on` lines, each symbol with its
    value in the final configuration (SYMBOL[y])."""
    dropped = {o.name[len("CONFIG_"):]: o for o in options if not o.survived}
    if not dropped:
        return
    found: dict[str, list[str]] = {}
    for symbol, conditions in _kconfig_entries(tree, tree / "Kconfig", [], set()):
        if symbol in dropped and symbol not in found:
            found[symbol] = conditions

    def annotate(expr: str) -> str:
        # A symbol, unless it is compared (FOO=y): FOO[value].
        return re.sub(r"\b([A-Z][A-Z0-9_]+)\b(?!\s*!?=)",
                      lambda m: f"{m.group(1)}[{final.get('CONFIG_' + m.group(1), 'n')}]", expr)

    for symbol, option in dropped.items():
        conditions = found.get(symbol)
        if conditions is None:
            option.needs = "no such option in this kernel's Kconfig"
        elif not conditions:
            option.needs = "no dependency found (set by a `select`, or a choice?)"
        else:
            option.needs = "; ".join(annotate(c) for c in conditions)


def _kconfig_entries(tree: Path, path: Path, outer: list[str], seen: set[Path]) -> Iterator[tuple[str, list[str]]]:
    """(symbol, its conditions) for every config entry of a Kconfig file and
    the files it sources, in order."""
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
                name = m.group(1).replace("$(SRCARCH)", "x86").replace("$SRCARCH", "x86")
                base = path.parent if word.startswith(("r", "or")) else tree
                for sub in sorted(base.glob(name)) if any(c in name for c in "*?[") else [base / name]:
                    yield from _kconfig_entries(tree, sub, outer + [c for c in stack if c], seen)
    if entry:
        yield entry


def make_command(tree: Path, *targets: str, jobs: int = 1) -> list[str]:
    return ["make", "-C", str(tree), f"ARCH={ARCH}", f"-j{jobs}", *targets]


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


def configure(tree: Path, fragment: Path, log: Log | None = None) -> tuple[list[Option], dict[str, str]]:
    """tinyconfig, the fragment merged in, olddefconfig. Returns the fragment's
    options with what survived (dropped ones explained) and the whole config."""
    env = make_env()
    run(make_command(tree, "tinyconfig"), log=log, env=env, what="make tinyconfig", timeout=STEP_TIMEOUT)
    run(["bash", str(tree / "scripts/kconfig/merge_config.sh"), "-m", ".config", str(fragment.resolve())],
        log=log, env={**env, "ARCH": ARCH}, cwd=tree, what="merge_config.sh", timeout=STEP_TIMEOUT)
    run(make_command(tree, "olddefconfig"), log=log, env=env, what="make olddefconfig", timeout=STEP_TIMEOUT)
    final = parse_config((tree / ".config").read_text())
    options = compare_options(parse_config(fragment.read_text()), final)
    explain_dropped(tree, options, final)
    return options, final


def dropped_message(options: list[Option]) -> str:
    return "; ".join(f"{o.name}={o.wanted} became {o.got} ({o.needs})" for o in options if not o.survived)
