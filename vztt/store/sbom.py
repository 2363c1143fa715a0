"""The SBOM of a build: SPDX 2.3 JSON and CycloneDX 1.6 JSON, made from its manifest.

The manifest is the build's commit record and holds what an SBOM needs: every
package the image's database lists (name, version, architecture), the sha256
of its package file (from the lock), its source package and the licenses it
states (from the image: `builder/pipeline.py`'s sbom step), the archive's
sha256. So an SBOM is a function of the manifest: the build writes both
documents beside it (`TemplateCache.sbom`), `vztt publish` puts the same
bytes on the mirror, `vztt sbom` prints them, for a pulled template too.

Rules the reference validators hold us to (spdx-tools, cyclonedx-python-lib;
the tests run both):

- SPDX: `created` exactly `YYYY-MM-DDTHH:MM:SSZ`; a documentNamespace URI
  without `#`; SPDXIDs of letters, digits, `.` and `-` only, unique; checksum
  algorithm `SHA256`, lowercase hex; licenses only as expressions of listed
  identifiers (Debian's `GPL-3+` is not one: NOASSERTION, the package's own
  words in licenseComments); supplier `Organization: ...`; the document
  DESCRIBES the template, which CONTAINS every package.
- CycloneDX: serialNumber a lowercase `urn:uuid:` (a uuid5 of the build, so
  the same build gives the same bytes); hash `SHA-256`; no NOASSERTION
  license (an unknown license is left out, or given by name as the package
  states it); bom-refs unique (the schema does not check it: we do).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from vztt.recipe.recipe import FAMILY
from vztt.store.licenses import spdx_expression
from vztt.store.manifest import Manifest, ManifestError, PackageRecord

KINDS = ("spdx", "cyclonedx")
NOASSERTION = "NOASSERTION"
# A package whose file's sha256 the build does not know: a layer's base package when the
# base's manifest and lock do not give it (a base built by an older vztt).
NO_SHA256 = "not in the lock, nor in the base build's manifest or lock"
NAMESPACE = "https://spdx.org/spdxdocs/vztt"      # SPDX's convention for namespaces nobody serves

# recipe distro -> (purl namespace, supplier): purl's names for the vendors.
DISTROS = {"debian": ("debian", "Debian"), "ubuntu": ("ubuntu", "Ubuntu"),
           "centos-stream": ("centos", "CentOS"), "almalinux": ("almalinux", "AlmaLinux"),
           "rockylinux": ("rocky", "Rocky Enterprise Software Foundation")}


def require_packages(manifest: Manifest, where: str) -> None:
    """An SBOM lists packages: a manifest without a package list cannot give one."""
    if not manifest.packages:
        raise ManifestError(f"{where}: the manifest of {manifest.name} has no package list, so there is no SBOM "
                            "to make (a hand-made or very old manifest: rebuild the template)")


def _timestamp(manifest: Manifest) -> str:
    """When the build was made, as SPDX wants it (seconds, `Z`)."""
    if manifest.created:
        when = datetime.fromisoformat(manifest.created).astimezone(timezone.utc)
    else:
        when = datetime.fromtimestamp(manifest.source_date_epoch, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def document_name(manifest: Manifest) -> str:
    return f"{manifest.name}-{manifest.build_id or manifest.archive.sha256[:12]}"


def purl(manifest: Manifest, p: PackageRecord) -> str:
    """pkg:deb/<distro>/<name>@<version>?arch=..&distro=<distro>-<version>, or pkg:rpm/... with
    the epoch as a qualifier (qualifiers sorted, as purl's canonical form has them)."""
    namespace = DISTROS.get(manifest.distro, (manifest.distro, ""))[0]
    qualifiers = {"arch": p.arch, "distro": f"{namespace}-{manifest.version}"}
    version = p.version
    kind = "deb" if FAMILY.get(manifest.distro) == "apt" else "rpm"
    if kind == "rpm" and ":" in version:
        qualifiers["epoch"], version = version.split(":", 1)
    query = "&".join(f"{k}={quote(v, safe=':')}" for k, v in sorted(qualifiers.items()))
    return f"pkg:{kind}/{namespace}/{quote(p.name, safe='')}@{quote(version, safe=':')}?{query}"


def _declared(p: PackageRecord) -> str:
    """The licenses as the package states them, for readers (not an SPDX expression)."""
    return "; ".join(p.licenses)


# -- SPDX 2.3 -----------------------------------------------------------------------------

def _spdx_id(p: PackageRecord, taken: set[str]) -> str:
    base = "SPDXRef-Package-" + re.sub(r"[^A-Za-z0-9.-]+", "-", f"{p.name}-{p.version}-{p.arch}")
    spdx_id, n = base, 1
    while spdx_id in taken:              # two names can sanitize alike (a+b, a-b)
        n += 1
        spdx_id = f"{base}-{n}"
    taken.add(spdx_id)
    return spdx_id


def spdx(manifest: Manifest) -> dict[str, Any]:
    require_packages(manifest, manifest.name)
    supplier = DISTROS.get(manifest.distro, ("", ""))[1]
    root = {
        "SPDXID": "SPDXRef-Template", "name": manifest.name, "versionInfo": manifest.build_id,
        "packageFileName": manifest.archive.file, "downloadLocation": NOASSERTION, "filesAnalyzed": False,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "checksums": [{"algorithm": "SHA256", "checksumValue": manifest.archive.sha256.lower()}],
        "licenseConcluded": NOASSERTION, "licenseDeclared": NOASSERTION, "copyrightText": NOASSERTION,
        "description": f"{manifest.distro} {manifest.version} ({manifest.release}) {manifest.arch} template, "
                       f"{len(manifest.packages)} packages",
    }
    packages, relationships = [root], [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                                        "relatedSpdxElement": "SPDXRef-Template"}]
    taken = {"SPDXRef-DOCUMENT", "SPDXRef-Template"}
    for p in manifest.packages:
        doc: dict[str, Any] = {
            "SPDXID": _spdx_id(p, taken), "name": p.name, "versionInfo": p.version,
            "downloadLocation": NOASSERTION, "filesAnalyzed": False,
            "supplier": f"Organization: {supplier}" if supplier else NOASSERTION,
            "licenseConcluded": NOASSERTION, "licenseDeclared": spdx_expression(p.licenses) or NOASSERTION,
            "copyrightText": NOASSERTION,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(manifest, p)}],
        }
        if p.sha256:
            doc["checksums"] = [{"algorithm": "SHA256", "checksumValue": p.sha256.lower()}]
        else:
            # SPDX has no NOASSERTION checksum: the field is left out, and this says why.
            doc["comment"] = f"package file SHA256: {NOASSERTION} ({NO_SHA256})"
        if p.source:
            doc["sourceInfo"] = f"built package from: {p.source} {p.source_version}".rstrip()
        if p.licenses:
            doc["licenseComments"] = f"as the package declares it: {_declared(p)}"
        packages.append(doc)
        relationships.append({"spdxElementId": "SPDXRef-Template", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": doc["SPDXID"]})
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": document_name(manifest),
        "documentNamespace": spdx_namespace(manifest),
        "creationInfo": {"created": _timestamp(manifest),
                         "creators": [f"Tool: vztt-{manifest.vztt_version or 'unknown'}"]},
        "packages": packages, "relationships": relationships,
    }


# -- CycloneDX 1.6 -------------------------------------------------------------------------

def serial_number(manifest: Manifest) -> str:
    """The same build, the same serial: a uuid5 of the SPDX namespace of the build."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, spdx_namespace(manifest))}"


def spdx_namespace(manifest: Manifest) -> str:
    return f"{NAMESPACE}/{manifest.name}/{manifest.build_id or manifest.archive.sha256}"


def cyclonedx(manifest: Manifest) -> dict[str, Any]:
    require_packages(manifest, manifest.name)
    supplier = DISTROS.get(manifest.distro, ("", ""))[1]
    root_ref = f"template:{manifest.name}@{manifest.build_id or manifest.archive.sha256}"
    components, refs = [], {root_ref}
    for p in manifest.packages:
        ref = purl(manifest, p)
        if ref in refs:                      # never in a real package database; be safe anyway
            ref = f"{ref}#{len(refs)}"
        refs.add(ref)
        c: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": p.name, "version": p.version,
                             "purl": purl(manifest, p)}
        if supplier:
            c["supplier"] = {"name": supplier}
        if p.sha256:
            c["hashes"] = [{"alg": "SHA-256", "content": p.sha256.lower()}]
        expression = spdx_expression(p.licenses)
        if expression:
            c["licenses"] = [{"expression": expression}]
        elif p.licenses:
            c["licenses"] = [{"license": {"name": _declared(p)}}]
        properties = [{"name": "vztt:arch", "value": p.arch}]
        if p.source:
            properties += [{"name": "vztt:source_package", "value": p.source}]
        if p.source_version:
            properties += [{"name": "vztt:source_version", "value": p.source_version}]
        if not p.sha256:
            properties += [{"name": "vztt:package_sha256", "value": NOASSERTION}]
        c["properties"] = properties
        components.append(c)
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.6", "serialNumber": serial_number(manifest), "version": 1,
        "metadata": {
            "timestamp": _timestamp(manifest),
            "tools": {"components": [{"type": "application", "name": "vztt",
                                      "version": manifest.vztt_version or "unknown"}]},
            "component": {"type": "operating-system", "bom-ref": root_ref, "name": manifest.name,
                          "version": manifest.build_id,
                          "hashes": [{"alg": "SHA-256", "content": manifest.archive.sha256.lower()}],
                          "description": f"{manifest.distro} {manifest.version} ({manifest.release}) "
                                         f"{manifest.arch} template"},
        },
        "components": components,
        "dependencies": [{"ref": root_ref, "dependsOn": [c["bom-ref"] for c in components]}],
    }


def render(manifest: Manifest, kind: str) -> bytes:
    """The document as bytes: keys sorted, one-space indent (the same build, the same bytes)."""
    doc = spdx(manifest) if kind == "spdx" else cyclonedx(manifest)
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
