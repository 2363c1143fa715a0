"""Lock files: the exact package set a template is built from.

JSON, one per template, at `<cache>/locks/<name>.lock.json` (or wherever
--lock points: a template repository can commit its locks). Repositories are
kept with their mirror variables unexpanded, so a lock resolved against one
mirror builds from another. The lock's digest is the sha256 of its canonical
form; `source_date_epoch` (the newest repository Release date) stamps every
timestamp the build makes, so one lock gives one set of bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vztt.base.errors import ResolveError
from vztt.base.files import atomic_write

FORMAT = 1


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str            # apt: the full version with epoch; dnf: [epoch:]version-release
    arch: str
    size: int
    sha256: str
    filename: str           # path below the repository URL (pool/main/..., Packages/...)
    repository: str         # a Lock.repositories name
    essential: bool = False # apt: part of the Essential closure, unpacked first
    # dnf: rpm's Epoch, Version and Release apart (version is "[epoch:]ver-rel"); None for apt,
    # and then not written, so apt locks keep their bytes and digests.
    epoch: int | None = None
    ver: str | None = None
    rel: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.arch}"


@dataclass(frozen=True)
class LockedRepository:
    name: str
    url: str                # with mirror variables, as the recipe says
    suite: str
    components: tuple[str, ...]
    release_sha256: str = ""  # digest of the verified Release/repomd the lock was made from


@dataclass(frozen=True)
class LockedBase:
    """A layer's base: the promoted build it was resolved on and is built on."""
    name: str
    build_id: str
    lock_digest: str
    archive_sha256: str     # the base's plain archive, checked before it is unpacked


@dataclass(frozen=True)
class Lock:
    recipe: str
    inputs_digest: str      # Recipe.resolve_digest(): what the solver was given
    distro: str
    release: str
    arch: str
    source_date_epoch: int
    repositories: tuple[LockedRepository, ...]
    packages: tuple[LockedPackage, ...]
    format: int = FORMAT
    request: tuple[str, ...] = field(default_factory=tuple)  # what was asked of the solver
    # A layer's lock: its base build; `packages` then holds only what the layer adds or changes.
    # None (other locks): not written, so their bytes and digests stay as they were.
    base: LockedBase | None = None

    def to_json(self) -> str:
        doc = asdict(self)
        if doc["base"] is None:
            doc.pop("base")
        doc["packages"] = sorted(({k: v for k, v in p.items() if v is not None} for p in doc["packages"]),
                                 key=lambda p: (p["name"], p["arch"]))
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def packages_digest(self) -> str:
        """The package set alone: a fresh Release date with the same packages is not an update."""
        rows = sorted(f"{p.name} {p.arch} {p.version} {p.sha256}" for p in self.packages)
        return "sha256:" + hashlib.sha256("\n".join(rows).encode()).hexdigest()

    def repository(self, name: str) -> LockedRepository:
        for r in self.repositories:
            if r.name == name:
                return r
        raise ResolveError(f"lock for {self.recipe}: package repository {name!r} is not in the lock")

    @classmethod
    def from_json(cls, text: str, where: str) -> "Lock":
        try:
            doc: dict[str, Any] = json.loads(text)
            if doc.get("format") != FORMAT:
                raise ResolveError(f"{where}: lock format {doc.get('format')!r} is not {FORMAT}; run `vztt resolve`")
            return cls(
                recipe=doc["recipe"], inputs_digest=doc["inputs_digest"], distro=doc["distro"],
                release=doc["release"], arch=doc["arch"], source_date_epoch=int(doc["source_date_epoch"]),
                repositories=tuple(LockedRepository(**{**r, "components": tuple(r["components"])})
                                   for r in doc["repositories"]),
                packages=tuple(LockedPackage(**p) for p in doc["packages"]),
                request=tuple(doc.get("request", ())),
                base=LockedBase(**doc["base"]) if doc.get("base") else None,
            )
        except ResolveError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ResolveError(f"{where}: not a valid lock file ({type(e).__name__}: {e}); run `vztt resolve`") from None

    @classmethod
    def read(cls, path: Path) -> "Lock":
        try:
            return cls.from_json(path.read_text(), str(path))
        except FileNotFoundError:
            raise ResolveError(f"{path}: no lock file; run `vztt resolve` first") from None

    def write(self, path: Path) -> None:
        """Atomically (base.files.atomic_write): a reader sees the old lock or the new one."""
        atomic_write(path, self.to_json())


@dataclass(frozen=True)
class LockDiff:
    added: tuple[LockedPackage, ...]
    removed: tuple[LockedPackage, ...]
    changed: tuple[tuple[LockedPackage, LockedPackage], ...]   # (old, new)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        out = [f"+ {p.name} {p.version}" for p in self.added]
        out += [f"- {p.name} {p.version}" for p in self.removed]
        out += [f"~ {o.name} {o.version} -> {n.version}" for o, n in self.changed]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": [{"name": p.name, "version": p.version} for p in self.added],
            "removed": [{"name": p.name, "version": p.version} for p in self.removed],
            "changed": [{"name": o.name, "old": o.version, "new": n.version} for o, n in self.changed],
        }


def diff(old: Lock | None, new: Lock) -> LockDiff:
    before = {p.key: p for p in old.packages} if old else {}
    after = {p.key: p for p in new.packages}
    return LockDiff(
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple((before[k], after[k]) for k in sorted(before.keys() & after.keys())
                      if (before[k].version, before[k].sha256) != (after[k].version, after[k].sha256)),
    )
