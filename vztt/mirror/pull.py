"""`vztt pull`: a template's build from the first mirror that has it and passes every check.

Pull verifies index.json with gpgv against the host's trusted keys before
believing anything in it, and its freshness (mirror/freshness.py: no older
serial than seen before, not past its expiry), then downloads (base.http:
resume and retries) into `<cache>/.downloads/<sha256>.part` (kept across
runs, locked while written),
checks size and sha256, runs every archive through the tar guard `vztt create`
unpacks through (a bad archive never sits in the cache as if good), and
installs archives and manifest into the cache with the cache's atomic promote
(the `-old` rule).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote

from vztt import formats as formats_registry
from vztt.base import signing
from vztt.base.errors import FetchError, RecipeError
from vztt.base.http import CHUNK, HttpClient, PartFile
from vztt.base.progress import Progress
from vztt.base.space import SLACK, check_space, free_bytes
from vztt.formats.safetar import UnsafeArchive, file_chunks, scan_lz4
from vztt.mirror.config import check_name, is_http, keyring_for, local_path
from vztt.mirror.freshness import check_index
from vztt.mirror.index import (INDEX, MAX_INDEX, MAX_MANIFEST, MAX_SIGNATURE, SIGNATURE, Build, Index, MirrorError,
                               archive_files, build_id, builds_of, newest_first, now, parse_index)
from vztt.store.manifest import ArchiveRecord, Manifest, ManifestError, PulledRecord
from vztt.store.templates import Entry, TemplateCache

T = TypeVar("T")

LOCK_WAIT = 3600.0      # a pull waits this long for another pull or build of the same template
PART_MAX_AGE = 7 * 86400


class Source:
    """A mirror to read from: http(s):// (base.http: resume, retries) or a local directory / file:// URL."""

    def __init__(self, location: str, retries: int = 5, backoff: float = 0.5, timeout: float = 30.0):
        self.location = location
        self.http = HttpClient(error=MirrorError, retries=retries, backoff=backoff, timeout=timeout) \
            if is_http(location) else None
        self.base = location.rstrip("/") + "/" if self.http else ""
        self.root = None if self.http else local_path(location)
        self.label = self.base if self.http else str(self.root)
        self.resumed = 0

    def where(self, rel: str) -> str:
        return self.base + quote(rel) if self.http else str(self.root / rel)  # type: ignore[operator]

    def get_small(self, rel: str, limit: int) -> bytes:
        """A small file (index, signature, manifest), whole; MirrorError if missing or too big."""
        if self.http:
            # A dead mirror should not hold up the next one for long: two more tries at most.
            return self.http.get_bounded(self.where(rel), limit, retries=min(self.http.retries, 2))
        assert self.root is not None
        try:
            with open(self.root / rel, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as e:
            raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        if len(data) > limit:
            raise MirrorError(f"{self.where(rel)}: larger than {limit} bytes")
        return data

    def chunks(self, rel: str, part_path: Path, size: int, sha256: str) -> Iterator[bytes]:
        """The file's bytes, in order, exactly once: what `part_path` already holds, then
        the rest from the mirror (resumed with Range after a cut, retried with
        backoff). Written to the part file on the way; size and sha256 are checked at
        the end (FetchError, the part file removed). It is locked while this runs."""
        with PartFile.locked(part_path, size) as part:
            yield from part.kept()
            try:
                if self.http:
                    yield from self.http.ranged(self.where(rel), part, size)
                else:
                    yield from self._file_chunks(rel, part, size)
            finally:
                self.resumed += part.resumes
            part.verify(size, sha256, self.where(rel))
            part.sync()

    def _file_chunks(self, rel: str, part: PartFile, size: int) -> Iterator[bytes]:
        assert self.root is not None
        try:
            src = open(self.root / rel, "rb")
        except OSError as e:
            raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        with src:
            src.seek(part.have)
            while part.have < size and (data := src.read(min(CHUNK, size - part.have))):
                fresh = part.add(data)
                if fresh:
                    yield fresh
            if part.have == size and src.read(1):
                raise FetchError(f"{self.root / rel}: larger than the {size} bytes the index says")

    def close(self) -> None:
        if self.http:
            self.http.close()


@dataclass
class Remote:
    """A build on a mirror, from an index whose signature checked out."""

    source: Source
    index: Index
    build: Build
    signer: signing.Verified

    @property
    def id(self) -> str:
        return self.build["id"]


@dataclass
class PullResult:
    name: str
    build: str
    mirror: str
    signer: str
    formats: list[str]
    up_to_date: bool = False
    bytes_downloaded: int = 0
    resumed: int = 0
    seconds: float = 0.0
    boot_test: str = ""
    failed_mirrors: list[str] = field(default_factory=list)
    entry: Entry | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "entry"}
        if self.entry is not None:
            d["manifest"] = str(self.entry.manifest_path)
            d["archives"] = {f: str(self.entry.manifest_path.parent / a.file)
                             for f, a in self.entry.manifest.archives.items()}
        return d


def find_build(source: Source, name: str, keyring: bytes, cache: TemplateCache, build: str | None = None) -> Remote:
    """Fetch and verify the mirror's index (signature, then freshness against what `cache`
    saw from this mirror before), and pick NAME's build (newest, or `build`)."""
    where = source.where(INDEX)
    for attempt in (1, 2):
        data = source.get_small(INDEX, MAX_INDEX)
        sig = source.get_small(SIGNATURE, MAX_SIGNATURE)
        try:
            verified = signing.verify(data, sig, keyring, where)
            break
        except signing.SignatureError:
            if attempt == 2:
                raise
            time.sleep(0.5)      # a publisher between its two renames: read the pair again
    index = parse_index(data, where)
    check_index(cache, index, source.label, verified.fingerprint, where)
    builds = newest_first(builds_of(index, name))
    if not builds:
        raise MirrorError(f"{where}: no template {name} on this mirror")
    if build:
        chosen = next((b for b in builds if b["id"] == build), None)
        if chosen is None:
            raise MirrorError(f"{where}: {name} has no build {build} (builds: {', '.join(b['id'] for b in builds)})")
    else:
        chosen = builds[0]
    if chosen.get("boot_test") == "failed":
        raise MirrorError(f"{where}: {name} build {chosen['id']} failed its boot test")
    return Remote(source=source, index=index, build=chosen, signer=verified)


def local_build(entry: Entry | None) -> str | None:
    """The build a cache entry is: the mirror's id if it was pulled, else its own."""
    if entry is None:
        return None
    pulled = entry.manifest.pulled
    try:
        return (pulled.build if pulled else "") or build_id(entry.manifest)
    except (KeyError, ValueError, TypeError):
        return None


def part_path(cache: TemplateCache, sha256: str) -> Path:
    return cache.downloads_dir / f"{sha256}.part"


def clean_old_parts(cache: TemplateCache, max_age: float = PART_MAX_AGE) -> None:
    """Part files nobody resumed for `max_age` seconds (and nobody holds)."""
    d = cache.downloads_dir
    if not d.is_dir():
        return
    cutoff = time.time() - max_age
    for p in d.glob("*.part"):
        try:
            if p.stat().st_mtime > cutoff:
                continue
            with open(p, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                p.unlink()
        except OSError:
            continue


def wanted_formats(remote: Remote, formats: tuple[str, ...] | None) -> list[str]:
    have = formats_registry.ordered(list(remote.build["archives"]))      # formats this vztt knows
    if not formats:
        return formats_registry.ordered(have)
    missing = [f for f in formats if f not in have]
    if missing:
        raise MirrorError(f"{remote.source.label}: {remote.id} has no {', '.join(missing)} archive "
                          f"(formats: {', '.join(have)})")
    return formats_registry.ordered(formats)


def check_space_for(remote: Remote, cache: TemplateCache, formats: list[str]) -> None:
    """Room in the cache for what is left to download of these formats' files (exit 7 at
    once, before the first byte, for a full disk or an index that claims absurd sizes)."""
    need = 0
    for f in formats:
        for rec in archive_files(remote.build["archives"][f]):
            part = part_path(cache, rec["sha256"])
            need += max(rec["size"] - (part.stat().st_size if part.is_file() else 0), 0)
    check_space(cache.root, need, f"{remote.id} ({', '.join(formats)}) from {remote.source.label}")


def download(remote: Remote, cache: TemplateCache, fmt: str) -> list[Path]:
    """One format's files of the build (a format may write several) into their part files,
    each verified by size and sha256 (resumes what an earlier run left), primary first.
    A format vztt itself unpacks (plain, ploop: `vztt create`, the boot test) is then read
    through the tar guard with the same checks, so a bad archive never enters the cache;
    its part file is removed. The other hosts' formats are their tools' to unpack."""
    parts = []
    for rec in archive_files(remote.build["archives"][fmt]):
        part = part_path(cache, rec["sha256"])
        for _ in remote.source.chunks(rec["path"], part, rec["size"], rec["sha256"]):
            pass
        parts.append(part)
    fmt_obj = formats_registry.get(fmt)
    if fmt_obj.bootable:
        rec = remote.build["archives"][fmt]
        on_mirror = ArchiveRecord.from_json({**rec, "file": rec["path"].rsplit("/", 1)[-1]}, fmt)
        limits = fmt_obj.guard_limits(on_mirror, free_bytes(cache.root) - SLACK)
        try:
            scan_lz4(file_chunks(parts[0]), limits, what=remote.source.where(rec["path"]))
        except UnsafeArchive:
            parts[0].unlink(missing_ok=True)        # never resumed, never installed
            raise
    return parts


def _remote_manifest(remote: Remote, name: str, formats: list[str]) -> Manifest:
    """The build's manifest from the mirror: the bytes the index names, describing this build."""
    rec = remote.build["manifest"]
    where = remote.source.where(rec["path"])
    data = remote.source.get_small(rec["path"], MAX_MANIFEST)
    if len(data) != rec["size"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise FetchError(f"{where}: does not match the sha256 and size the index says")
    try:
        manifest = Manifest.from_json(data, where)
        ok = (manifest.name == name and build_id(manifest) == remote.id
              and all([p.sha256 for p in manifest.archives[f].files]
                      == [r["sha256"] for r in archive_files(remote.build["archives"][f])]
                      and manifest.archives[f].tar_size == remote.build["archives"][f].get("tar_size")
                      and formats_registry.get(f).accepts_file(manifest.archives[f].file, name)
                      and [p.file for p in manifest.archives[f].parts] == formats_registry.get(f).file_names(name)[1:]
                      for f in formats))
    except (ManifestError, KeyError, ValueError):
        ok = False
    if not ok:
        raise MirrorError(f"{where}: the manifest does not describe {name} build {remote.id}")
    return manifest


def install(cache: TemplateCache, name: str, remote: Remote, parts: dict[str, list[Path]]) -> Entry:
    """The downloaded archives (`parts`: each format's files, verified, primary first) and
    the build's manifest into the cache, with promote's `-old` rule. The manifest keeps
    only the formats pulled, and records where it came from under `pulled`."""
    formats = formats_registry.ordered(list(parts))
    manifest = _remote_manifest(remote, name, formats)
    manifest.archives = {f: manifest.archives[f] for f in formats}
    manifest.formats = formats
    manifest.pulled = PulledRecord(source=remote.source.label, build=remote.id, at=now(),
                                   signer=remote.signer.fingerprint, index_serial=remote.index.get("serial"),
                                   manifest_sha256=remote.build["manifest"]["sha256"])
    pairs: list[tuple[Path, Path]] = []
    temps: list[Path] = []
    try:
        for f in formats:
            # the names were checked above (accepts_file, file_names): bare names in the cache
            for part, file_name in zip(parts[f], [p.file for p in manifest.archives[f].files]):
                final = cache.file(file_name)
                tmp = cache.temp_path(final)
                temps.append(tmp)
                os.replace(part, tmp)
                os.chmod(tmp, 0o644)
                pairs.append((tmp, final))
        final_manifest = cache.manifest(name)
        tmp_manifest = cache.temp_path(final_manifest)
        temps.append(tmp_manifest)
        manifest.write(tmp_manifest)
        cache.promote(name, pairs + [(tmp_manifest, final_manifest)])
        for f in set(formats_registry.names()) - set(formats):          # the manifest no longer names them
            for file_name in formats_registry.get(f).file_names(name):
                cache.file(file_name).unlink(missing_ok=True)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    entry = cache.entry(name)
    assert entry is not None
    return entry


def from_first_mirror(name: str, mirrors: list[str], progress: Progress,
                      attempt: Callable[[Source, list[str]], T]) -> T:
    """attempt(source, the failures so far as 'mirror: error') on each mirror
    in turn, until one does not raise FetchError; every mirror's error in one
    if none succeeds. Each Source is closed after its attempt."""
    failures: list[tuple[str, FetchError]] = []
    for location in mirrors:
        source = Source(location)
        try:
            return attempt(source, [f"{label}: {e}" for label, e in failures])
        except FetchError as e:
            failures.append((source.label, e))
            if len(mirrors) > 1:
                progress.say(f"  {source.label}: {e}; trying the next mirror")
        finally:
            source.close()
    raise _all_failed(name, failures)


def _all_failed(name: str, failures: list[tuple[str, FetchError]]) -> FetchError:
    if len(failures) == 1:
        err = failures[0][1]
        if not err.message.startswith(name):
            err.message = f"{name}: {err.message}"
        return err
    kinds = {type(e) for _, e in failures}
    cls = kinds.pop() if len(kinds) == 1 else FetchError
    return cls(f"{name}: every mirror failed: " + "; ".join(f"{i}) {e}" for i, (_, e) in enumerate(failures, 1)))


def _pull_from(source: Source, remote: Remote, cache: TemplateCache, name: str, want: list[str],
               progress: Progress, result: PullResult) -> None:
    """Download the formats `want` of `remote` and install them."""
    check_space_for(remote, cache, want)
    parts: dict[str, list[Path]] = {}
    for f in want:
        with progress.step("download") as st:
            t0 = time.monotonic()
            parts[f] = download(remote, cache, f)
            size = sum(rec["size"] for rec in archive_files(remote.build["archives"][f]))
            st.note(f"{f}: {size / 1e6:.1f} MB, {size / 1e6 / max(time.monotonic() - t0, 1e-3):.0f} "
                    "MB/s, sha256 ok, archive checked" + (f", resumed {source.resumed}x" if source.resumed else ""))
        result.bytes_downloaded += size
    with progress.step("install") as st:
        result.entry = install(cache, name, remote, parts)
        st.note(str(result.entry.manifest_path))


def pull(cache: TemplateCache, name: str, mirrors: list[str], keyrings: tuple[Path, ...] = (),
         build: str | None = None, formats: tuple[str, ...] | None = None,
         progress: Progress | None = None) -> PullResult:
    """NAME's build from the first mirror that has it and passes every check."""
    progress = progress or Progress(quiet=True)
    check_name(name)
    cache.require_writable("vztt pull")
    keyring = keyring_for(keyrings)
    started = time.monotonic()
    cache.clean_stale_work()
    clean_old_parts(cache)
    with cache.building(name, timeout=LOCK_WAIT, on_wait=waiting_for(progress, name)):
        def attempt(source: Source, failed: list[str]) -> PullResult:
            with progress.step("index") as st:
                remote = find_build(source, name, keyring, cache, build)
                st.note(f"{source.label}: {name} {remote.id} (boot test {remote.build.get('boot_test')}), "
                        f"signed by {remote.signer.fingerprint}")
            want = wanted_formats(remote, formats)
            result = PullResult(name=name, build=remote.id, mirror=source.label,
                                signer=remote.signer.fingerprint, formats=want,
                                boot_test=str(remote.build.get("boot_test")),
                                failed_mirrors=failed)
            entry = cache.entry(name)
            if entry is not None and local_build(entry) == remote.id and all(f in entry.manifest.archives
                                                                             for f in want):
                result.up_to_date, result.entry = True, entry
                progress.say(f"  {name} {remote.id} is in the cache already")
            else:
                _pull_from(source, remote, cache, name, want, progress, result)
            result.resumed = source.resumed
            result.seconds = round(time.monotonic() - started, 3)
            return result

        return from_first_mirror(name, mirrors, progress, attempt)


def waiting_for(progress: Progress, name: str) -> Callable[[str], None]:
    """What a pull (or create) that has to wait for the template's lock says at once."""
    return lambda holder: progress.say(f"  {name}: waiting for {holder} to finish with it")


def offline_entry(cache: TemplateCache, name: str, build: str | None = None) -> Entry:
    check_name(name)
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root} (--offline: no mirror is asked)")
    if build and local_build(entry) != build:
        raise RecipeError(f"{name}: the cache holds build {local_build(entry)}, not {build} (--offline)")
    return entry
