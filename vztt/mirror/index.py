"""A template mirror's layout and its index.

Layout of a mirror (a directory a web server serves, or a WebDAV location):

    index.json                                    every template and its builds (the commit record)
    index.json.asc                                detached OpenPGP signature of index.json
    templates/<name>/<build id>/<name>.plain.tar.lz4
    templates/<name>/<build id>/<name>.plain.ploopv2.tar.lz4     (builds made with --format ploop/all)
    templates/<name>/<build id>/<name>.manifest.json

`serial` grows by one with every publish; `expires` (ISO 8601, UTC) is when hosts stop
believing this index (publish --expires, default 30 days): mirror/freshness.py refuses an
older serial than one seen before, and an index past or without its expiry.

A build id is the manifest's `build_id` (`<created, UTC, YYYYmmddTHHMMSSZ>-<lock
digest prefix>`), or for older manifests `<created>-<first 12 hex of the primary
archive's sha256>`: sortable by time, and the same build gets the same id on
every mirror. index.json (format 1):

    {"format": 1, "serial": 7, "generated": "...", "expires": "...", "generator": "vztt 0.1.0",
     "templates": {"<name>": {"builds": [            # newest first
        {"id": ..., "created": ..., "published": ..., "distro": ..., "release": ..., "version": ...,
         "arch": ..., "recipe_digest": ..., "lock_digest": ..., "package_count": 135,
         "formats": ["plain"], "boot_test": "passed",
         "manifest": {"path": "templates/...json", "sha256": ..., "size": ...},
         "archives": {"plain": {"path": "templates/...tar.lz4", "sha256": ..., "size": ..., "tar_size": ...}}}]}}}

This module reads, checks and builds that document; mirror/publish.py writes
it, mirror/pull.py believes it only after its signature checked out.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from vztt import __version__
from vztt import formats as formats_registry
from vztt.base.errors import FetchError
from vztt.mirror.config import NAME_RE
from vztt.store.manifest import Manifest

INDEX, SIGNATURE = "index.json", "index.json.asc"
INDEX_FORMAT = 1
TEMPLATES = "templates"
MAX_INDEX = 32 << 20
MAX_SIGNATURE = 1 << 20
MAX_MANIFEST = 16 << 20
ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8,64}")
SHA_RE = re.compile(r"[0-9a-f]{64}")

Build = dict[str, Any]          # one build's entry in the index (the JSON above)
Index = dict[str, Any]


class MirrorError(FetchError):
    """A mirror that cannot be read or written: HTTP errors, a malformed index, a missing build."""

    kind = "mirror"


def build_id(manifest: Manifest | dict[str, Any]) -> str:
    """The manifest's own `build_id` (time and lock), else time and primary archive sha256.
    (A manifest as a dict, as tests and older callers hold it, is read as a Manifest.)"""
    m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, "manifest")
    if ID_RE.fullmatch(m.build_id):
        return m.build_id
    created = datetime.fromisoformat(m.created).astimezone(timezone.utc)
    return f"{created:%Y%m%dT%H%M%SZ}-{m.archive.sha256[:12]}"


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def empty_index() -> Index:
    return {"format": INDEX_FORMAT, "serial": 0, "generated": None, "generator": f"vztt {__version__}",
            "templates": {}}


def index_bytes(index: Index) -> bytes:
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


# -- reading ---------------------------------------------------------------------------------

def _safe_rel(path: Any, where: str) -> str:
    """A path inside the mirror: relative, no '..', no scheme, no oddities."""
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*", path) \
            or any(p in (".", "..") for p in path.split("/")):
        raise MirrorError(f"{where}: bad path {str(path)[:100]!r} in the index")
    return path


def _count(value: Any) -> bool:
    """A JSON integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _file_record(doc: Any, where: str, needs_tar_size: bool = False) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise MirrorError(f"{where}: not a file record")
    _safe_rel(doc.get("path"), where)
    if not isinstance(doc.get("sha256"), str) or not SHA_RE.fullmatch(doc["sha256"]):
        raise MirrorError(f"{where}: bad sha256")
    if not _count(doc.get("size")):
        raise MirrorError(f"{where}: bad size")
    if needs_tar_size and not _count(doc.get("tar_size")):
        raise MirrorError(f"{where}: no tar_size (the unpacked size, which bounds unpacking it): refused")
    return doc


def expires_at(index: Index) -> datetime | None:
    """When the index stops being believed (None: it does not say; parse_index checked the rest)."""
    value = index.get("expires")
    return None if value is None else datetime.fromisoformat(value)


def _check_dates(doc: Index, where: str) -> None:
    if doc.get("serial") is not None and not _count(doc.get("serial")):
        raise MirrorError(f"{where}: bad serial {str(doc.get('serial'))[:40]!r}")
    expires = doc.get("expires")
    if expires is None:
        return
    try:
        ok = isinstance(expires, str) and datetime.fromisoformat(expires).tzinfo is not None
    except ValueError:
        ok = False
    if not ok:
        raise MirrorError(f"{where}: bad expires {str(expires)[:40]!r} (an ISO 8601 time with its time zone)")


def parse_index(data: bytes, where: str) -> Index:
    """index.json, checked for shape (after its signature was)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MirrorError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("templates"), dict):
        raise MirrorError(f"{where}: not a vztt mirror index of format {INDEX_FORMAT}")
    _check_dates(doc, where)
    for name, tmpl in doc["templates"].items():
        if not NAME_RE.fullmatch(name) or not isinstance(tmpl, dict) or not isinstance(tmpl.get("builds"), list):
            raise MirrorError(f"{where}: bad template entry {name[:100]!r}")
        for b in tmpl["builds"]:
            if not isinstance(b, dict) or not isinstance(b.get("id"), str) or not ID_RE.fullmatch(b["id"]):
                raise MirrorError(f"{where}: {name}: bad build entry")
            w = f"{where}: {name} build {b['id']}"
            _file_record(b.get("manifest"), f"{w}: manifest")
            archives = b.get("archives")
            if not isinstance(archives, dict) or not archives or any(f not in formats_registry.names() for f in archives):
                raise MirrorError(f"{w}: bad archives")
            for fmt, rec in archives.items():
                _file_record(rec, f"{w}: {fmt} archive", formats_registry.get(fmt).needs_tar_size)
    return doc


def builds_of(index: Index, name: str) -> list[Build]:
    return list(index["templates"].get(name, {}).get("builds", []))


def newest_first(builds: list[Build]) -> list[Build]:
    return sorted(builds, key=lambda b: (b.get("created") or "", b["id"]), reverse=True)


def files_of(build: Build) -> list[dict[str, Any]]:
    """The file records of a build: its manifest, then its archives."""
    return [build["manifest"], *build["archives"].values()]


def files_by_sha256(index: Index) -> dict[str, str]:
    """Every file the mirror holds, by sha256 -> its path."""
    return {rec["sha256"]: rec["path"] for t in index["templates"].values() for b in t["builds"]
            for rec in files_of(b)}


def has_build(builds: list[Build], manifest: Manifest, bid: str) -> bool:
    """The mirror has this build: same id, or the same primary archive in the same formats."""
    primary = manifest.archive
    return any(b["id"] == bid or (b["archives"].get(primary.format, {}).get("sha256") == primary.sha256
                                  and set(b["archives"]) == set(manifest.archives)) for b in builds)


# -- writing ---------------------------------------------------------------------------------

def index_entry(manifest: Manifest, mbytes: bytes, paths: dict[str, str], manifest_path: str) -> Build:
    """The index's entry for a build whose manifest (as published: `mbytes`) is at
    `manifest_path` and whose archives are at `paths` (format -> path)."""
    archives = {}
    for fmt, a in manifest.archives.items():
        doc = a.to_json()
        archives[fmt] = {"path": paths[fmt], "sha256": a.sha256, "size": a.size,
                         **{extra: doc[extra] for extra in ("tar_size", "disk_size", "clusters") if extra in doc}}
    return {
        "id": build_id(manifest), "created": manifest.created, "published": now(),
        **{k: getattr(manifest, k) for k in ("distro", "release", "version", "arch", "recipe_digest", "lock_digest",
                                             "package_count", "vztt_version")},
        "formats": list(manifest.formats or archives),
        "boot_test": manifest.boot_result,
        "manifest": {"path": manifest_path, "sha256": hashlib.sha256(mbytes).hexdigest(), "size": len(mbytes)},
        "archives": archives,
    }


def keep_newest(builds: list[Build], keep: int) -> list[Build]:
    """The `keep` newest builds (0: all)."""
    return newest_first(builds)[:keep or None]


@dataclass
class Dropped:
    """A build an old index had and the new one has not: what of it may be deleted now."""

    name: str
    id: str
    files: list[str]            # its files no build of the new index uses
    directory: str | None       # its directory, unless a build of the new index keeps a file there


def dropped(old: Index, new: Index) -> list[Dropped]:
    referenced = {rec["path"] for t in new["templates"].values() for b in t["builds"] for rec in files_of(b)}
    live = {(n, b["id"]) for n, t in new["templates"].items() for b in t["builds"]}
    out = []
    for name, t in old["templates"].items():
        for b in t["builds"]:
            if (name, b["id"]) in live:
                continue
            directory = build_dir(name, b["id"])
            out.append(Dropped(name, b["id"], [rec["path"] for rec in files_of(b) if rec["path"] not in referenced],
                               None if any(r.startswith(directory + "/") for r in referenced) else directory))
    return out


def build_dir(name: str, bid: str) -> str:
    """Where a build's files go on the mirror."""
    return f"{TEMPLATES}/{name}/{bid}"
