"""Output formats: one module per format, behind one small interface.

A build installs one root tree; every format is made from that tree and the
plain archive of it (which is always written first: other formats are
derived from its sorted, time-clamped entries, so they hold exactly the same
tree and are reproducible). The pipeline asks the registry for the formats a
build wants, calls `write()` for each, and promotes what they wrote together.
`vztt inspect` asks each format whether it recognises a file.

A format may write several files (`Format.parts`: LXC's rootfs.tar.xz and
meta.tar.xz); each has its name in the cache (`<template>.<suffix>`) and its
name in a build's directory on a mirror (what the host's own tool asks for).
A format whose tree vztt can boot says how (`bootable_tree`): the boot test
asks the format, so what is tested is the artifact that ships.

To add a format: a module in this package with a `Format` subclass, listed
in `_MODULES` below; nothing else in vztt names formats.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from vztt.base.errors import RecipeError, VzttError
from vztt.base.proc import Log, require_tool
from vztt.formats.targuard import Limits
from vztt.store.manifest import ArchiveRecord, PackageRecord


class ImageFormatError(VzttError):
    """A file that is not what its format says: bad header, damaged, truncated."""

    exit_code = 6
    kind = "format"


@dataclass(frozen=True)
class AppCache:
    """A layered template as Virtuozzo sees it: an OS template with application templates
    baked in (`vzpkg create appcache`); formats that know app caches name their file after it."""

    os_template: str
    apps: tuple[str, ...]


@dataclass
class FormatContext:
    """What a format is written from."""

    name: str                      # template name
    tree: Path                     # the installed root tree (read only for formats)
    out: Path                      # where to write this format's (primary) file (a temporary name; the pipeline promotes)
    work: Path                     # scratch directory for this build
    source_date_epoch: int         # every timestamp a format writes
    lock_digest: str               # seeds identifiers (UUIDs) so one lock gives one set of bytes
    packages: Sequence[PackageRecord]   # what the image's package database says is installed
    settings: dict[str, Any]       # the recipe's settings (setting key -> value, templated)
    log: Log | None = None
    # The plain archive of `tree`, already written (None while it is the one being written).
    plain: Path | None = None
    plain_record: ArchiveRecord | None = None
    # Every file of the format by its part's suffix -> temporary name (the primary's is `out`).
    outs: dict[str, Path] = field(default_factory=dict)

    def out_for(self, part: "Part") -> Path:
        return self.outs.get(part.suffix, self.out)
    app_cache: AppCache | None = None        # a layered template (recipe `base`)


@dataclass(frozen=True)
class Part:
    """One file a format writes."""

    suffix: str                    # the cached file is <template>.<suffix>
    published: str                 # its name in the build's directory on a mirror; {name} is the template

    def cache_name(self, template: str) -> str:
        return f"{template}.{self.suffix}"

    def mirror_name(self, template: str) -> str:
        return self.published.format(name=template)


@dataclass
class Inspection:
    """What `vztt inspect` found in a file, trusting nothing in it."""

    path: Path
    format: str
    members: int = 0
    tar_size: int = 0
    packages: int | None = None
    member_names: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)     # format-specific findings

    notes: list[str] = field(default_factory=list)           # format-specific lines for people

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("details", "notes")}
        d["path"] = str(self.path)
        d.update(self.details)
        return d

    def text_lines(self) -> list[str]:
        """What `vztt inspect` prints for people."""
        return [str(self.path), f"  format    {self.format}",
                f"  members   {self.members} ({self.tar_size / 1e6:.1f} MB of file data)",
                f"  packages  {self.packages if self.packages is not None else 'unknown'}",
                *self.notes]


class NotBootable(VzttError):
    """A format whose tree vztt cannot boot (the hosts' own tools test those)."""

    exit_code = 3
    kind = "format"


class Format(ABC):
    name: ClassVar[str]            # registry name (`--format NAME`)
    suffix: ClassVar[str]          # the cached (primary) file is <template>.<suffix>
    summary: ClassVar[str]         # one line for --help and docs
    step: ClassVar[str]            # the build step that writes it (shown with its time, kept in the manifest)
    # Its record must say how big the unpacked tar is (`tar_size`): what bounds unpacking
    # it (a mirror's index without it is refused).
    needs_tar_size: ClassVar[bool] = False
    # Every file it writes, the primary first; () means one file, <template>.<suffix>, published as is.
    parts: ClassVar[tuple[Part, ...]] = ()
    # The programs it runs, (program, Debian package): checked before a build starts.
    tools: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Whether a mirror may serve its files from another build's directory when the bytes are
    # the same (False when a host's index names the build's directory and expects the files there).
    shares_files: ClassVar[bool] = True
    # Whether vztt itself unpacks and boots it (`vztt create`, the boot test): its primary file
    # then goes through the tar guard (guard_limits) at pull and at unpack.
    bootable: ClassVar[bool] = False

    def file_name(self, template: str) -> str:
        return f"{template}.{self.suffix}"

    def part_list(self) -> tuple[Part, ...]:
        return self.parts or (Part(self.suffix, "{name}." + self.suffix),)

    def file_names(self, template: str) -> list[str]:
        """Every file's name in the cache, the primary first."""
        return [p.cache_name(template) for p in self.part_list()]

    def mirror_names(self, template: str) -> list[str]:
        """Every file's name in a build's directory on a mirror, in file_names' order."""
        return [p.mirror_name(template) for p in self.part_list()]

    def preflight(self, template: str, settings: dict[str, Any]) -> None:
        """Before a build starts: what this format needs is here (its tools), and the recipe
        is one it can write; EnvironmentProblem or BuildError naming the format otherwise."""
        for tool, package in self.tools:
            require_tool(tool, package, why=f"format {self.name}")

    def bootable_tree(self, files: list[Path], scratch: Path) -> AbstractContextManager[Path]:
        """The root tree in the artifact `files` (the cache's, primary first), ready for the
        boot runtime to lay an overlay on: made below the empty directory `scratch`, gone
        when the context ends. NotBootable for a format vztt does not boot."""
        raise NotBootable(f"format {self.name}: vztt does not boot it (its host's own tools do)")
    def output_name(self, ctx: FormatContext) -> str:
        """The cache file a build writes (a format may name a layered template's file otherwise)."""
        return self.file_name(ctx.name)

    def accepts_file(self, file: str, template: str) -> bool:
        """Whether a manifest may name `file` as this format's file of `template` (pull checks)."""
        return file == self.file_name(template)

    def describe(self, record: ArchiveRecord) -> str:
        """The build step's line about what was written (sizes)."""
        return f"{record.size / 1e6:.0f} MB"

    def guard_limits(self, record: ArchiveRecord, free: int) -> Limits:
        """What the tar guard lets through when a file of this format from elsewhere is
        unpacked (`vztt create`) or checked (`vztt pull`): a root tree, bounded by the
        record's `tar_size`, else by `free` bytes."""
        return Limits(max_bytes=record.tar_size if record.tar_size else max(free, 0))

    @abstractmethod
    def write(self, ctx: FormatContext) -> ArchiveRecord:
        """Write ctx.out; return its record (file = the final name, file_name(ctx.name))."""

    @abstractmethod
    def recognizes(self, path: Path) -> bool:
        """Whether `path` looks like this format (a cheap look: name or first bytes)."""

    @abstractmethod
    def inspect(self, path: Path, workdir: Path) -> Inspection:
        """Open the file and check it; ImageFormatError if it is not sound."""


# Registry order is the order formats are written, listed and published in.
_MODULES = ("plain", "ploop", "lxc", "incus", "oci", "nspawn")
# The format every build writes first, whatever was asked for: the others are made from it
# (FormatContext.plain). It is dropped after the build if it was not asked for.
SOURCE = "plain"
_REGISTRY: dict[str, Format] = {}
ALL = "all"


def _load() -> dict[str, Format]:
    if not _REGISTRY:
        for module in _MODULES:
            mod = importlib.import_module(f"vztt.formats.{module}")
            fmt: Format = mod.FORMAT
            _REGISTRY[fmt.name] = fmt
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every registered format, in registry order."""
    return tuple(_load())


def get(name: str) -> Format:
    try:
        return _load()[name]
    except KeyError:
        raise RecipeError(f"format {name!r}: unknown (one of {', '.join(names())}, or {ALL})") from None


def ordered(selected: Sequence[str]) -> list[str]:
    """`selected` in registry order, without repeats."""
    return [n for n in names() if n in selected]


def parse(choice: str | Sequence[str]) -> tuple[str, ...]:
    """`plain`, `plain,ploop`, `all`, or a list of those -> registered names in registry order."""
    items = choice.split(",") if isinstance(choice, str) else list(choice)
    wanted: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item == ALL:
            return names()
        get(item)
        wanted.append(item)
    if not wanted:
        raise RecipeError(f"format {choice!r}: name at least one of {', '.join(names())}, or {ALL}")
    return tuple(ordered(wanted))


def bootable() -> tuple[str, ...]:
    """The formats vztt can boot, in registry order."""
    return tuple(n for n, f in _load().items() if f.bootable)


def format_of_file(path: Path) -> Format:
    """The format a file is in (for `vztt inspect`); ImageFormatError if none recognises it."""
    for fmt in _load().values():
        if fmt.recognizes(path):
            return fmt
    raise ImageFormatError(f"{path}: not a file of any vztt format ({', '.join(names())})")
