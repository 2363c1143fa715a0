"""Layered templates (recipe `base`): the base's promoted build, as a layer is
resolved and built on it.

A layer starts from its base's plain archive, as the cache holds it: the
archive's sha256 must be the one the base's manifest records before anything
is read from it. Resolution reads only the base's package database out of it
(the backend's `package_db` files, into a scratch root); the build unpacks it
whole into the build image, where the layer's packages, files and hooks go on
top. The layer's lock records which base build it was made on
(`LockedBase`), and a locked build refuses any other.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path
from typing import IO

import lz4.frame

from vztt.backend import BaseSystem
from vztt.base.errors import FetchError, RecipeError, ResolveError
from vztt.base.inroot import write_in_root
from vztt.boot.report import PASSED
from vztt.formats.plain import CHUNK
from vztt.formats.safetar import Limits, extract_lz4, file_chunks
from vztt.recipe.lock import Lock, LockedBase
from vztt.recipe.recipe import Recipe
from vztt.store.manifest import ArchiveRecord
from vztt.store.templates import Entry, TemplateCache


def base_entry(recipe: Recipe, cache: TemplateCache, tested: bool = False) -> Entry:
    """The base's promoted build in the cache, with a plain archive; `tested`: one that passed
    its boot test (a layer built with its boot test stands on a boot-tested base)."""
    base = recipe.base_template
    entry = cache.entry(base)
    if entry is None:
        raise RecipeError(f"{recipe.name}: base {base} is not built in {cache.root}: build the base first "
                          f"(`vztt build {base}`), or build with --build-base")
    if "plain" not in entry.manifest.archives:
        raise RecipeError(f"{recipe.name}: base {base} has no plain archive in the cache (formats: "
                          f"{', '.join(entry.manifest.archives)}); rebuild it with --format all")
    if tested and entry.manifest.boot_result != PASSED:
        raise RecipeError(f"{recipe.name}: base {base} build {entry.manifest.build_id} did not pass a boot test "
                          f"(boot test: {entry.manifest.boot_result}); rebuild the base with its boot test, "
                          "or build the layer with --no-test")
    return entry


def base_record(entry: Entry) -> LockedBase:
    m = entry.manifest
    return LockedBase(name=entry.name, build_id=m.build_id, lock_digest=m.lock_digest,
                      archive_sha256=m.archives["plain"].sha256)


def check_locked_base(lock: Lock, lock_path: Path, entry: Entry) -> None:
    """A layer's lock is only good on the base build it was resolved on."""
    current = base_record(entry)
    if lock.base != current:
        made_on = f"base build {lock.base.build_id}" if lock.base else "no base (not a layer's lock)"
        raise ResolveError(f"{lock_path}: made on {made_on}; the cache holds {entry.name} build "
                           f"{current.build_id}: run `vztt resolve {lock.recipe}` or build without --locked")


def _plain(cache: TemplateCache, entry: Entry) -> tuple[Path, ArchiveRecord]:
    record = entry.manifest.archives["plain"]
    return cache.path(record), record


def _mismatch(entry: Entry, archive: Path, got: str, want: str) -> FetchError:
    return FetchError(f"base {entry.name}: {archive} does not match the sha256 its manifest records "
                      f"(sha256 {got[:16]}..., manifest {want[:16]}...); rebuild or pull the base")


class _Hashing:
    """A read-only file that hashes what is read through it."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.sha = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return self.sha.hexdigest()


def verify_archive(cache: TemplateCache, entry: Entry) -> Path:
    """The base's plain archive, once its sha256 is the manifest's."""
    archive, record = _plain(cache, entry)
    with open(archive, "rb") as fh:
        got = _Hashing(fh).drain()
    if got != record.sha256:
        raise _mismatch(entry, archive, got, record.sha256)
    return archive


def unpack_base(cache: TemplateCache, entry: Entry, root: Path) -> int:
    """The base's tree into the (empty) build image root, after its archive's sha256 was
    checked, through the guard every archive from elsewhere goes through (a base may have
    been pulled): nothing lands outside the root. The bytes of tar it held."""
    archive = verify_archive(cache, entry)
    record = entry.manifest.archives["plain"]
    limits = Limits(max_bytes=record.tar_size or shutil.disk_usage(root).free)
    result = extract_lz4(file_chunks(archive), root, limits, what=f"base {entry.name}: {archive}",
                         hash_input=False)
    return result.stats.bytes


def base_system(cache: TemplateCache, entry: Entry, package_db: tuple[str, ...], scratch: Path) -> BaseSystem:
    """What a layer resolves on: the base's package database (`package_db`: file names, or
    directories ending in /) read from its archive into `scratch` once the archive's sha256
    is the manifest's, and the base's record."""
    archive = verify_archive(cache, entry)
    wanted = tuple(p.strip("/") for p in package_db)
    found: dict[str, bytes] = {}
    try:
        with lz4.frame.open(archive, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and any(name == w or name.startswith(w + "/") for w in wanted):
                    fh = tar.extractfile(member)
                    found[name] = fh.read() if fh else b""
    except (OSError, RuntimeError, EOFError, tarfile.TarError) as e:
        raise FetchError(f"base {entry.name}: cannot read {archive}: {type(e).__name__}: {e}") from None
    if not found:
        raise ResolveError(f"base {entry.name}: its archive holds no package database ({', '.join(package_db)})")
    for name, data in sorted(found.items()):
        write_in_root(scratch, name, data)
    return BaseSystem(record=base_record(entry), source_date_epoch=entry.manifest.source_date_epoch, root=scratch)


def base_package_files(cache: TemplateCache, entry: Entry) -> dict[tuple[str, str, str], str]:
    """The sha256 of the base's package files, by (name, arch, version), for a layer's SBOM:
    as the base's manifest records them (a manifest of this vztt has them, its own base's
    too), else from the lock the base was built from (kept in the cache's history, if its
    digest is the manifest's). A package neither gives is absent (its SBOM says NOASSERTION)."""
    m = entry.manifest
    files = {p.row: p.sha256 for p in m.packages if p.sha256}
    lock_path = cache.history_dir(entry.name) / f"{m.build_id}.lock.json"
    try:
        lock = Lock.read(lock_path) if lock_path.is_file() else None
    except (OSError, ResolveError):
        lock = None
    if lock is not None and lock.digest == m.lock_digest:
        for p in lock.packages:
            files.setdefault((p.name, p.arch, p.version), p.sha256)
    return files
