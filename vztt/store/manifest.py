"""The manifest: what a cached template is, and the commit record of the cache.

`<cache>/<name>.manifest.json` is written last when a build (or a pull) is
promoted: an archive without a manifest beside it is not a template. It is
also what a mirror publishes next to the archives, and what `vztt status`,
`diff`, `publish`, `pull` and `create` read. This module is the only place
that parses or writes one; everything else works with the typed `Manifest`.

JSON (format 1), keys sorted, one-space indent:

    {"format": 1, "name": ..., "build_id": "<YYYYmmddTHHMMSSZ>-<lock digest prefix>",
     "created": ISO time, "distro", "release", "version", "arch", "vztt_version",
     "recipe_digest", "lock_digest", "packages_digest", "source_date_epoch",
     "formats": ["plain", ...],                       # the first is the primary archive
     "archive": <the primary archive's record>,       # kept for readers of older vztt
     "archives": {"plain": {"file", "format", "sha256", "size", "tar_size"},
                  "ploop": {"file", "format", "sha256", "size", "disk_size", "clusters", ...},
                  "lxc": {"file": <rootfs>, ..., "parts": [{"file": <meta>, "sha256", "size"}]}},
                                                       # parts: a format's other files (absent: none)
     "packages": [{"name", "arch", "version",                       # the image's package database
                   "sha256", "source", "source_version", "licenses"}],  # (SBOM: these four when known)
     "package_count", "image_used_bytes",
     "build_seconds", "steps": {step: seconds},
     "boot_test": {"result": "passed" | "failed" | "skipped", ...},
     "pulled": {"from", "build", "at", "signer", "index_serial", "manifest_sha256"}   # pulled ones only
     "base": {"name", "build_id", "lock_digest", "archive_sha256"}   # layered templates only: the base build
     "failed_files": [...]}                            # <name>.manifest.json-failed only

Keys this version does not know are kept (`extra`) and written back as read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vztt.base.errors import VzttError
from vztt.base.files import atomic_write
from vztt.recipe.lock import LockedBase

FORMAT = 1
NOT_TESTED = "skipped"


class ManifestError(VzttError):
    """A manifest that cannot be read: not JSON, or a required key missing or malformed."""

    exit_code = 3
    kind = "manifest"


@dataclass(frozen=True)
class ArchivePart:
    """One file of a format that writes several (lxc: meta.tar.xz beside rootfs.tar.xz)."""

    file: str                      # the file name in the cache (no directory)
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ArchivePart":
        return cls(file=str(doc["file"]), sha256=str(doc["sha256"]), size=int(doc["size"]))


@dataclass
class ArchiveRecord:
    """One format's file(s) of a build: the primary file here, the others (if the format
    writes several) in `parts`. Manifests written before parts existed read as one file."""

    file: str                      # the file name in the cache (no directory)
    format: str                    # a formats registry name: plain, ploop, ...
    sha256: str
    size: int                      # bytes of the file
    tar_size: int | None = None    # plain: bytes of the uncompressed tar (bounds unpacking)
    details: dict[str, Any] = field(default_factory=dict)   # format-specific (ploop: disk_size, clusters...)
    parts: list[ArchivePart] = field(default_factory=list)  # the format's other files, in its order

    @property
    def files(self) -> list[ArchivePart]:
        """Every file of this format, the primary first."""
        return [ArchivePart(self.file, self.sha256, self.size), *self.parts]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {**self.details, "file": self.file, "format": self.format, "sha256": self.sha256,
                               "size": self.size}
        if self.tar_size is not None:
            doc["tar_size"] = self.tar_size
        if self.parts:
            doc["parts"] = [p.to_json() for p in self.parts]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], default_format: str) -> "ArchiveRecord":
        known = {"file", "format", "sha256", "size", "tar_size", "parts"}
        return cls(file=str(doc["file"]), format=str(doc.get("format") or default_format),
                   sha256=str(doc["sha256"]), size=int(doc["size"]),
                   tar_size=int(doc["tar_size"]) if doc.get("tar_size") is not None else None,
                   details={k: v for k, v in doc.items() if k not in known},
                   parts=[ArchivePart.from_json(p) for p in doc.get("parts") or []])


@dataclass(frozen=True)
class PackageRecord:
    name: str
    arch: str
    version: str
    # For the SBOM (store/sbom.py); empty in manifests of older vztt and hand-made ones.
    sha256: str = ""                     # of the package file (.deb, .rpm), from the lock
    source: str = ""                     # source package, as the image's package database says
    source_version: str = ""
    licenses: tuple[str, ...] = ()       # as the package database states them (not SPDX)

    @property
    def row(self) -> tuple[str, str, str]:
        return (self.name, self.arch, self.version)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "arch": self.arch, "version": self.version}
        for key in ("sha256", "source", "source_version"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.licenses:
            doc["licenses"] = list(self.licenses)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "PackageRecord":
        return cls(str(doc["name"]), str(doc["arch"]), str(doc["version"]), sha256=str(doc.get("sha256") or ""),
                   source=str(doc.get("source") or ""), source_version=str(doc.get("source_version") or ""),
                   licenses=tuple(str(x) for x in doc.get("licenses") or ()))


@dataclass
class PulledRecord:
    """Where a pulled template came from (local bookkeeping: never published)."""

    source: str                    # JSON "from": the mirror's label
    build: str
    at: str
    signer: str
    index_serial: int | None = None
    manifest_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "build": self.build, "at": self.at, "signer": self.signer,
                "index_serial": self.index_serial, "manifest_sha256": self.manifest_sha256}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "PulledRecord":
        return cls(source=str(doc.get("from", "")), build=str(doc.get("build", "")), at=str(doc.get("at", "")),
                   signer=str(doc.get("signer", "")), index_serial=doc.get("index_serial"),
                   manifest_sha256=str(doc.get("manifest_sha256", "")))


@dataclass
class Manifest:
    name: str
    build_id: str
    created: str                   # ISO 8601, UTC ("" if unknown)
    distro: str
    release: str
    version: str
    arch: str
    formats: list[str]             # formats[0] is the primary archive
    archives: dict[str, ArchiveRecord]
    recipe_digest: str = ""
    lock_digest: str = ""
    packages_digest: str = ""
    source_date_epoch: int = 0
    vztt_version: str = ""
    packages: list[PackageRecord] = field(default_factory=list)
    package_count: int = 0
    image_used_bytes: int = 0
    build_seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    boot_test: dict[str, Any] = field(default_factory=lambda: {"result": NOT_TESTED})
    pulled: PulledRecord | None = None
    failed_files: list[str] = field(default_factory=list)
    base: LockedBase | None = None                           # a layer: the base build it was made on
    extra: dict[str, Any] = field(default_factory=dict)      # keys this version does not know
    format: int = FORMAT

    # -- what readers ask ---------------------------------------------------
    @property
    def archive(self) -> ArchiveRecord:
        """The primary archive (plain when the build made one)."""
        return self.archives[self.formats[0]]

    @property
    def boot_result(self) -> str:
        return str((self.boot_test or {}).get("result", NOT_TESTED))

    @property
    def local_build(self) -> str:
        """The build this cache entry is: the mirror's id if it was pulled, else ours."""
        return self.pulled.build if self.pulled and self.pulled.build else self.build_id

    def package_rows(self) -> list[tuple[str, str, str]]:
        return [p.row for p in self.packages]

    def published(self) -> "Manifest":
        """The manifest as the build wrote it, without local bookkeeping (`pulled`)."""
        doc = self.to_dict()
        doc.pop("pulled", None)
        return Manifest.from_dict(doc, self.name)

    # -- JSON ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(self.extra)
        doc.update({
            "format": self.format, "name": self.name, "build_id": self.build_id, "created": self.created,
            "distro": self.distro, "release": self.release, "version": self.version, "arch": self.arch,
            "recipe_digest": self.recipe_digest, "lock_digest": self.lock_digest,
            "packages_digest": self.packages_digest, "source_date_epoch": self.source_date_epoch,
            "vztt_version": self.vztt_version, "formats": list(self.formats),
            "archive": self.archive.to_json(),
            "archives": {f: a.to_json() for f, a in self.archives.items()},
            "packages": [p.to_json() for p in self.packages],
            "package_count": self.package_count, "image_used_bytes": self.image_used_bytes,
            "build_seconds": self.build_seconds, "steps": dict(self.steps), "boot_test": self.boot_test,
        })
        if self.pulled is not None:
            doc["pulled"] = self.pulled.to_json()
        if self.failed_files:
            doc["failed_files"] = list(self.failed_files)
        if self.base is not None:
            doc["base"] = dict(self.base.__dict__)
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def to_bytes(self) -> bytes:
        return self.to_json().encode()

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> "Manifest":
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: not a manifest (a JSON object is expected)")
        try:
            archives_doc = doc.get("archives")
            if not archives_doc:           # manifests of the first vztt had the primary archive only
                primary = doc["archive"]
                archives_doc = {primary.get("format", "plain"): primary}
            archives = {str(f): ArchiveRecord.from_json(a, str(f)) for f, a in archives_doc.items()}
            formats = [str(f) for f in (doc.get("formats") or archives)]
            if not formats or any(f not in archives for f in formats):
                raise ValueError("formats and archives disagree")
            # A cache entry needs its archive only (a template put in the cache by hand may say
            # no more): the rest defaults.
            created = str(doc.get("created") or "")
            build_id = doc.get("build_id")
            if (not isinstance(build_id, str) or not build_id) and created:
                # Older manifests: time and primary archive digest (as the mirror index names them).
                when = datetime.fromisoformat(created).astimezone(timezone.utc)
                build_id = f"{when:%Y%m%dT%H%M%SZ}-{archives[formats[0]].sha256[:12]}"
            build_id = build_id if isinstance(build_id, str) else ""
            known = {f.name for f in fields(cls)} | {"archive"}
            packages = [PackageRecord.from_json(p) for p in doc.get("packages") or []]
            return cls(
                name=str(doc["name"]), build_id=str(build_id or ""), created=created,
                distro=str(doc.get("distro", "")), release=str(doc.get("release", "")),
                version=str(doc.get("version", "")), arch=str(doc.get("arch", "")),
                formats=formats, archives=archives,
                recipe_digest=str(doc.get("recipe_digest") or ""), lock_digest=str(doc.get("lock_digest") or ""),
                packages_digest=str(doc.get("packages_digest") or ""),
                source_date_epoch=int(doc.get("source_date_epoch") or 0),
                vztt_version=str(doc.get("vztt_version") or ""),
                packages=packages, package_count=int(doc.get("package_count", len(packages))),
                image_used_bytes=int(doc.get("image_used_bytes") or 0),
                build_seconds=float(doc.get("build_seconds") or 0), steps=dict(doc.get("steps") or {}),
                boot_test=dict(doc.get("boot_test") or {"result": NOT_TESTED}),
                pulled=PulledRecord.from_json(doc["pulled"]) if isinstance(doc.get("pulled"), dict) else None,
                failed_files=[str(f) for f in doc.get("failed_files") or []],
                base=LockedBase(**{k: str(v) for k, v in doc["base"].items()}) if isinstance(doc.get("base"), dict) else None,
                extra={k: v for k, v in doc.items() if k not in known},
                format=int(doc.get("format", FORMAT)),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{where}: not a valid manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def from_json(cls, data: str | bytes, where: str) -> "Manifest":
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not JSON ({e})") from None
        return cls.from_dict(doc, where)

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest") from None
        except OSError as e:
            raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
        return cls.from_json(data, str(path))

    def write(self, path: Path) -> None:
        """Atomically (base.files.atomic_write)."""
        atomic_write(Path(path), self.to_bytes())
