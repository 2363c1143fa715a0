"""The reference SBOM validators, as the tests use them: SPDX 2.3 JSON with
spdx-tools (what `pyspdxtools -i FILE` does: parse into its model, validate the
model), CycloneDX 1.6 JSON with cyclonedx-python-lib's strict JSON-schema
validator, plus the two rules that schema cannot state (bom-refs unique,
dependencies naming known refs). Both from PyPI, pinned in
tests/requirements-sbom.txt (the Makefile's test set-up installs them).

Importing the validators costs about 2 s of CPU: import this module once per
session (pytest does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.error import SPDXParsingError
from spdx_tools.spdx.parser.json.json_parser import parse_from_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

_CYCLONEDX = JsonStrictValidator(SchemaVersion.V1_6)


def spdx_problems(path: Path) -> list[str]:
    """What spdx-tools finds wrong with an SPDX JSON file (empty: valid)."""
    try:
        document = parse_from_file(str(path))
    except SPDXParsingError as error:
        return [f"parse: {m}" for m in error.get_messages()]
    return [m.validation_message for m in validate_full_spdx_document(document, "SPDX-2.3")]


def _refs(bom: dict[str, Any]) -> list[str]:
    refs: list[str] = []

    def collect(components: list[dict[str, Any]]) -> None:
        for c in components:
            if "bom-ref" in c:
                refs.append(c["bom-ref"])
            collect(c.get("components", []))
    root = bom.get("metadata", {}).get("component")
    collect([root] if root else [])
    collect(bom.get("components", []))
    return refs


def cyclonedx_problems(path: Path) -> list[str]:
    """What the CycloneDX 1.6 schema (and the two checks it lacks) find wrong (empty: valid)."""
    text = path.read_text()
    errors = _CYCLONEDX.validate_str(text, all_errors=True)
    problems = [f"schema: {e.data.message} at {'/'.join(map(str, e.data.absolute_path))}" for e in errors or ()]
    bom = json.loads(text)
    refs = _refs(bom)
    problems += [f"bom-ref not unique: {r}" for r in sorted({r for r in refs if refs.count(r) > 1})]
    for d in bom.get("dependencies", []):
        problems += [f"dependency names an unknown bom-ref: {r}" for r in [d.get("ref"), *d.get("dependsOn", [])]
                     if r not in set(refs)]
    return problems


def problems(path: Path) -> list[str]:
    if path.name.endswith(".spdx.json"):
        return spdx_problems(path)
    if path.name.endswith(".cdx.json"):
        return cyclonedx_problems(path)
    raise ValueError(f"{path}: neither *.spdx.json nor *.cdx.json")
