"""One backend per distro family, behind one small interface.

A backend turns a recipe into a lock with the distro's own solver, says
where each locked package is downloaded from, installs the fetched packages
into a mounted root, and removes what its tools leave behind.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vztt.base.errors import RecipeError
from vztt.store.packages import Download
from vztt.recipe.lock import Lock, LockedBase
from vztt.recipe.variables import Mirrors
from vztt.base.proc import Log
from vztt.recipe.recipe import Recipe


@dataclass(frozen=True)
class InstalledPackage:
    name: str
    arch: str
    version: str
    state: str        # dpkg: "ii"; rpm: "installed"


@dataclass(frozen=True)
class PackageInfo:
    """What the image's package database says about an installed package, for its SBOM."""

    source: str = ""                     # the source package it was built from
    source_version: str = ""
    licenses: tuple[str, ...] = ()       # as the database states them (DEP-5 short names, rpm License tag)


@dataclass(frozen=True)
class BaseSystem:
    """A layer's base, to resolve on: its build (as the layer's lock records it), the
    time its lock stamps, and a scratch root holding its package database (`package_db`)."""

    record: LockedBase
    source_date_epoch: int
    root: Path


class Backend(ABC):
    family: str
    # The files of an installed root that are its package database: a layer resolves on them.
    package_db: tuple[str, ...] = ()

    def __init__(self, recipe: Recipe, mirrors: Mirrors, state_dir: Path, log: Log, shared_state: Path | None = None):
        self.recipe = recipe
        self.mirrors = mirrors
        self.state_dir = state_dir       # persistent per template: solver state (apt lists, dnf metadata)
        self.shared_state = shared_state  # repository metadata shared between templates (apt), if given
        self.log = log

    def release_digests(self) -> dict[str, str] | None:
        """Repository name -> the sha256 of its signed Release/repomd as the solver would read
        it now (refreshed, verified), without resolving; None where the backend cannot tell
        without resolving (then a status always resolves)."""
        return None

    def base_urls(self) -> dict[str, str]:
        """Repository name -> URL with the mirror variables expanded."""
        return {r.name: self.mirrors.expand(r.url, f"{self.recipe.path}: repositories[{r.name}].url").rstrip("/")
                for r in self.recipe.repositories}

    def image_urls(self) -> dict[str, str]:
        """Repository name -> the URL the template ships (image_url, else url), expanded; the
        repositories the recipe keeps out of the image (image_sources = false) are not named."""
        return {r.name: self.mirrors.expand(r.image_url or r.url,
                                            f"{self.recipe.path}: repositories[{r.name}].image_url").rstrip("/")
                for r in self.recipe.repositories if r.image_sources}

    @abstractmethod
    def resolve(self, base: BaseSystem | None = None) -> Lock:
        """The full package set, with verified metadata, as a lock. On a layer's `base`:
        what the layer adds to or changes in the base's installed set."""

    def downloads(self, lock: Lock) -> list[Download]:
        out = []
        for p in lock.packages:
            repo = lock.repository(p.repository)
            base = self.mirrors.expand(repo.url, f"lock {lock.recipe}: repositories[{repo.name}].url")
            out.append(Download(label=f"{p.name} {p.version}", url=f"{base.rstrip('/')}/{p.filename}",
                                sha256=p.sha256, size=p.size))
        return out

    @abstractmethod
    def install(self, lock: Lock, files: dict[str, Path], root: Path, env: dict[str, str],
                after_base: Callable[[], None] | None = None) -> None:
        """Install exactly the locked packages (files: sha256 -> cached file) into root;
        `after_base` runs once the base system is in (apt: the Essential stage; a layer's
        lock: the base's tree, before the layer's packages)."""

    @abstractmethod
    def finish(self, root: Path) -> None:
        """Remove the package manager's build-time leftovers (caches, logs, build-only config)."""

    @abstractmethod
    def installed(self, root: Path) -> list[InstalledPackage]:
        """What the image's package database says is installed."""

    def package_info(self, root: Path) -> dict[tuple[str, str], PackageInfo]:
        """(name, arch) -> source package and declared licenses, from the image's package database."""
        return {}


# Distro family (recipe.FAMILY) -> the module of its backend and the class in it. A module
# is imported only when a recipe of its family is used.
_BACKENDS = {"apt": ("vztt.backend.apt", "AptBackend"), "dnf": ("vztt.backend.dnf", "DnfBackend")}


def backend_for(recipe: Recipe, mirrors: Mirrors, state_dir: Path, log: Log,
                shared_state: Path | None = None) -> Backend:
    if recipe.family not in _BACKENDS:
        raise RecipeError(f"{recipe.path}: distro: {recipe.distro!r} has no backend yet")
    module, cls = _BACKENDS[recipe.family]
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend(recipe, mirrors, state_dir, log, shared_state)
