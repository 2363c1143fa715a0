"""A build's SBOMs on a mirror: SPDX and CycloneDX JSON in the build's
directory, beside its manifest, listed in index.json under the build's
`sbom` ({"spdx": {path, sha256, size}, "cyclonedx": {...}}).

The documents are made from the manifest as published (store/sbom.py), so
they are the bytes the build wrote beside it in the cache. A manifest without
a package list (hand-made, very old) has no SBOM: the build is published
without one.
"""

from __future__ import annotations

import hashlib
from typing import Any

from vztt.mirror.targets import Target
from vztt.store import sbom
from vztt.store.manifest import Manifest
from vztt.store.templates import SBOM_FILES


def upload(target: Target, manifest: Manifest, directory: str) -> dict[str, dict[str, Any]]:
    """Put the build's SBOMs into `directory` on the mirror; their index records, by kind."""
    if not manifest.packages:
        return {}
    records = {}
    for kind in sbom.KINDS:
        data = sbom.render(manifest, kind)
        rel = f"{directory}/{manifest.name}.{SBOM_FILES[kind]}"
        target.put_bytes(rel, data)
        records[kind] = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return records
