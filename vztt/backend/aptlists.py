"""apt repository metadata shared between templates.

Templates that use the same repository (same URL, suite, components,
architecture and keyring) need the same verified lists. Each such repository
has a state directory of its own, `<cache>/state/.shared/repo-<key>/` (the
backend's `shared_state`), where `apt-get update` fetches and verifies it
with its keyring alone. Templates with the same set of repositories resolve
in one directory, `set-<key>/`, whose lists are hard links of its
repositories' lists: no template runs `apt-get update` itself, and apt's
binary cache of the lists (the slow part of an apt call on a full archive)
is built once for all of them.

A repository is refreshed once per vztt process: `vztt status --all` over
templates that share repositories downloads each Release and index once,
however many templates there are. The next process refreshes again (a
status must see today's archive). A flock on the repository's directory
keeps two processes from updating it at once, and from linking lists that
are being replaced.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LISTS = Path("state") / "lists"          # where apt keeps them below its Dir::State
_refreshed: set[Path] = set()            # repository directories this process has updated


@dataclass(frozen=True)
class SharedRepo:
    name: str                # the recipe's name for it (errors name it)
    source_line: str         # its sources.list line
    directory: Path          # its shared state directory

    @property
    def lists(self) -> Path:
        return self.directory / LISTS


def shared_repo(root: Path, name: str, url: str, suite: str, components: tuple[str, ...] | list[str],
                arch: str, keyring: Path) -> SharedRepo:
    """The shared state of a repository: keyed by everything that makes its verified lists."""
    key = hashlib.sha256("\0".join([url, suite, " ".join(components), arch]).encode()
                         + b"\0" + keyring.read_bytes()).hexdigest()[:24]
    line = f"deb [signed-by={keyring} arch={arch}] {url} {suite} {' '.join(components)}"
    return SharedRepo(name, line, root / f"repo-{key}")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextmanager
def shared_resolve_dir(root: Path, repos: list[SharedRepo], arch: str) -> Iterator[Path]:
    """The directory where templates with exactly these repositories resolve (held for the
    resolve: one at a time, across processes): the same lists, and apt's binary cache of
    them (pkgcache.bin, built once, valid as long as the lists are the same files)."""
    key = hashlib.sha256("\0".join(sorted(r.directory.name for r in repos) + [arch]).encode()).hexdigest()[:24]
    directory = root / f"set-{key}"
    with _locked(directory):
        yield directory


def _refresh(repo: SharedRepo, update: Callable[[SharedRepo], None]) -> int:
    """apt-get update of the repository, once per process (its lock held)."""
    if repo.directory in _refreshed:
        return 0
    update(repo)
    _refreshed.add(repo.directory)
    return 1


def release(repo: SharedRepo, update: Callable[[SharedRepo], None], list_name: str) -> bytes | None:
    """The repository's InRelease as apt verified it (refreshed once per process), without
    resolving: what a status compares with its lock's (`release_sha256`) to skip the solver.
    None when apt holds no InRelease for it."""
    with _locked(repo.directory):
        _refresh(repo, update)
        found = [f for f in repo.lists.glob("*InRelease") if f.name.endswith(list_name)] \
            if repo.lists.is_dir() else []
        return found[0].read_bytes() if found else None


def provide(repos: list[SharedRepo], update: Callable[[SharedRepo], None], dest: Path) -> int:
    """Refresh each repository once per process (`update` runs apt-get update in its
    directory), then make `dest` (a template's lists directory) hold exactly their lists,
    as hard links. Returns how many repositories were refreshed now."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "partial").mkdir(exist_ok=True)
    for old in dest.iterdir():
        if old.is_file() and old.name != "lock":
            old.unlink()
    refreshed = 0
    for repo in repos:
        with _locked(repo.directory):
            refreshed += _refresh(repo, update)
            for f in repo.lists.iterdir():
                if f.is_file() and f.name != "lock":
                    target = dest / f.name
                    target.unlink(missing_ok=True)
                    os.link(f, target)
    return refreshed
