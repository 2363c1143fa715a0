"""Output formats: one module per format, behind one small interface.

A build installs one root tree; every format is made from that tree and the
plain archive of it (which is always written first: other formats are
derived from its sorted, time-clamped entries, so they hold exactly the same
tree and are reproducible). The pipeline asks the registry for the formats a
build wants, calls `write()` for each, and promotes what they wrote together.
`vztt inspect` asks each format whether it recognises a file.

To add a format: a module in this package with a `Format` subclass, listed
in `_MODULES` below; nothing else in vztt names formats.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from vztt.base.errors import RecipeError, VzttError
from vztt.base.proc import Log
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
    out: Path                      # where to write this format's file (a temporary name; the pipeline promotes)
    work: Path                     # scratch directory for this build
    source_date_epoch: int         # every timestamp a format writes
    lock_digest: str               # seeds identifiers (UUIDs) so one lock gives one set of bytes
    packages: Sequence[PackageRecord]   # what the image's package database says is installed
    settings: dict[str, Any]       # the recipe's settings (setting key -> value, templated)
    log: Log | None = None
    # The plain archive of `tree`, already written (None while it is the one being written).
    plain: Path | None = None
    plain_record: ArchiveRecord | None = None
    app_cache: AppCache | None = None        # a layered template (recipe `base`)


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


class Format(ABC):
    name: ClassVar[str]            # registry name (`--format NAME`)
    suffix: ClassVar[str]          # the cached file is <template>.<suffix>
    summary: ClassVar[str]         # one line for --help and docs
    step: ClassVar[str]            # the build step that writes it (shown with its time, kept in the manifest)
    # Its record must say how big the unpacked tar is (`tar_size`): what bounds unpacking
    # it (a mirror's index without it is refused).
    needs_tar_size: ClassVar[bool] = False

    def file_name(self, template: str) -> str:
        return f"{template}.{self.suffix}"

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
_MODULES = ("plain", "ploop")
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


def format_of_file(path: Path) -> Format:
    """The format a file is in (for `vztt inspect`); ImageFormatError if none recognises it."""
    for fmt in _load().values():
        if fmt.recognizes(path):
            return fmt
    raise ImageFormatError(f"{path}: not a file of any vztt format ({', '.join(names())})")
