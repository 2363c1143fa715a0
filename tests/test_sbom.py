"""SBOMs of builds (issue 20): SPDX 2.3 and CycloneDX 1.6 JSON beside the
manifest, from the lock and the image's package database, checked with the
reference validators (spdx-tools, cyclonedx-python-lib: tests/sbomcheck.py)
and against what the archive itself holds (dpkg's status file, the
copyright files), not only parsed.

The real debian-12 build of the session (conftest's `debian12`) is the
subject; the dnf backend's SBOM is checked in test_rpm.py on its build.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from packageurl import PackageURL

from conftest import BuiltTemplate, one_line_error, run_vztt
from minidist import dpkg_status, read_archive
from mirrorkit import tiny_template
from sbomcheck import cyclonedx_problems, spdx_problems
from vztt.store import licenses


def _sboms(t: BuiltTemplate) -> tuple[dict, dict]:
    spdx = json.loads((t.cache / f"{t.name}.spdx.json").read_text())
    cdx = json.loads((t.cache / f"{t.name}.cdx.json").read_text())
    return spdx, cdx


@pytest.mark.network          # the real debian-12 build
def test_the_build_writes_valid_sboms(debian12: BuiltTemplate) -> None:
    for suffix, check in (("spdx.json", spdx_problems), ("cdx.json", cyclonedx_problems)):
        path = debian12.cache / f"{debian12.name}.{suffix}"
        assert check(path) == [], path
    assert "sbom" in debian12.manifest["steps"]          # a step of the build, with its time


@pytest.mark.network
def test_sbom_lists_what_the_image_holds(debian12: BuiltTemplate) -> None:
    spdx, cdx = _sboms(debian12)
    manifest = debian12.manifest
    archive = read_archive(debian12.archive, ("./var/lib/dpkg/status", "./usr/share/doc/grep/copyright",
                                              "./usr/share/doc/zlib1g/copyright", "./usr/share/doc/libc6/copyright"))
    status = {n: p for n, p in dpkg_status(archive.text("./var/lib/dpkg/status")).items()
              if p["Status"] == "install ok installed"}
    locked = {(p["name"], p["version"], p["arch"]): p["sha256"] for p in debian12.lock["packages"]}

    root, *packages = spdx["packages"]
    assert root["name"] == debian12.name and root["versionInfo"] == manifest["build_id"]
    assert root["checksums"] == [{"algorithm": "SHA256", "checksumValue": manifest["archive"]["sha256"]}]
    assert cdx["metadata"]["component"]["hashes"] == [{"alg": "SHA-256", "content": manifest["archive"]["sha256"]}]
    assert {(p["name"], p["versionInfo"]) for p in packages} == {(n, p["Version"]) for n, p in status.items()}
    assert len(cdx["components"]) == len(packages) == manifest["package_count"]

    by_name = {p["name"]: p for p in packages}
    for name, para in status.items():
        p = by_name[name]
        arch = para["Architecture"]
        # the package file's sha256, as the lock has it
        assert p["checksums"] == [{"algorithm": "SHA256", "checksumValue": locked[(name, para["Version"], arch)]}]
        # the purl as the reference implementation writes it (canonical form)
        (ref,) = [r["referenceLocator"] for r in p["externalRefs"] if r["referenceType"] == "purl"]
        parsed = PackageURL.from_string(ref)
        assert (parsed.type, parsed.namespace, parsed.name, parsed.version) == ("deb", "debian", name, para["Version"])
        assert parsed.qualifiers == {"arch": arch, "distro": "debian-12"} and parsed.to_string() == ref
        # the source package, as dpkg's status says it (Source:, else the package itself)
        source = para.get("Source", name).split()[0]
        assert p["sourceInfo"].startswith(f"built package from: {source} "), p["sourceInfo"]
    assert by_name["libc6"]["sourceInfo"].startswith("built package from: glibc ")

    # Licenses: what a machine-readable copyright file says, as SPDX; NOASSERTION otherwise.
    assert archive.text("./usr/share/doc/grep/copyright").startswith("Format:")
    assert by_name["grep"]["licenseDeclared"] == "GPL-3.0-or-later"
    assert by_name["zlib1g"]["licenseDeclared"] == "Zlib"
    assert not archive.text("./usr/share/doc/libc6/copyright").startswith("Format:")
    assert by_name["libc6"]["licenseDeclared"] == "NOASSERTION" and "licenseComments" not in by_name["libc6"]
    components = {c["name"]: c for c in cdx["components"]}
    assert components["grep"]["licenses"] == [{"expression": "GPL-3.0-or-later"}]
    assert "licenses" not in components["libc6"]
    known = sum(p["licenseDeclared"] != "NOASSERTION" for p in packages)
    assert known > len(packages) // 4, f"only {known} of {len(packages)} packages with a license"


@pytest.mark.network
def test_vztt_sbom_prints_the_files(debian12: BuiltTemplate) -> None:
    for fmt, suffix in (("spdx", "spdx.json"), ("cyclonedx", "cdx.json")):
        r = run_vztt("sbom", debian12.name, "--format", fmt, cache=debian12.cache)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (debian12.cache / f"{debian12.name}.{suffix}").read_text()
    assert run_vztt("sbom", debian12.name, "--json", cache=debian12.cache).json()["spdxVersion"] == "SPDX-2.3"


@pytest.mark.network
def test_the_validators_can_fail(debian12: BuiltTemplate, tmp_path: Path) -> None:
    """The checks above would catch a broken document: Debian's license names are
    not SPDX, a time with fractions is not SPDX's, a bom-ref used twice."""
    spdx, cdx = _sboms(debian12)
    bad = copy.deepcopy(spdx)
    bad["packages"][1]["licenseDeclared"] = "GPL-3+"
    bad["creationInfo"]["created"] = bad["creationInfo"]["created"].replace("Z", ".5Z")
    path = tmp_path / "bad.spdx.json"
    path.write_text(json.dumps(bad))
    assert spdx_problems(path)
    bad = copy.deepcopy(cdx)
    bad["components"][1]["bom-ref"] = bad["components"][0]["bom-ref"]
    path = tmp_path / "bad.cdx.json"
    path.write_text(json.dumps(bad))
    assert any("bom-ref not unique" in p for p in cyclonedx_problems(path))


def test_a_manifest_without_packages_has_no_sbom(tmp_path: Path) -> None:
    tiny_template(tmp_path / "cache")                # hand-made: no package list
    r = run_vztt("sbom", "tiny-1-x86_64", cache=tmp_path / "cache")
    assert r.returncode == 3 and r.stdout == ""
    line = one_line_error(r)
    assert "tiny-1-x86_64.manifest.json" in line and "no package list" in line, line
    missing = run_vztt("sbom", "not-cached", cache=tmp_path / "cache")
    assert missing.returncode == 3 and "not in the cache" in one_line_error(missing)


@pytest.mark.parametrize("declared, spdx", [
    (["GPL-2+"], "GPL-2.0-or-later"),
    (["GPL-1+ or Artistic", "Expat"], "(GPL-1.0-or-later OR Artistic-1.0-Perl) AND MIT"),
    (["LGPL-3+ or GPL-2+, and BSD-3-clause"], "(LGPL-3.0-or-later OR GPL-2.0-or-later) AND BSD-3-Clause"),
    (["GPL-3+ with Bison exception"], "GPL-3.0-or-later WITH Bison-exception-2.2"),
    (["GPLv2+ and LGPLv2+"], "GPL-2.0-or-later AND LGPL-2.0-or-later"),       # rpm's old names
    (["GPL-2.0-or-later AND MIT"], "GPL-2.0-or-later AND MIT"),                  # rpm's SPDX tags
    (["GPL-2+", "public-domain"], None),          # not an SPDX license: NOASSERTION, no guess
    (["BSD"], None), (["GPL-2+ with OpenSSL exception"], None), ([], None),
])
def test_declared_licenses_as_spdx(declared: list[str], spdx: str | None) -> None:
    assert licenses.spdx_expression(declared) == spdx


def test_every_license_we_name_is_on_the_spdx_list() -> None:
    from license_expression import get_spdx_licensing
    spdx = get_spdx_licensing()
    assert [i for i in sorted(licenses.identifiers()) if spdx.validate(i, strict=True).errors] == []
    assert [t for t in licenses.exception_terms() if spdx.validate(t, strict=True).errors] == []


def test_a_layer_sbom_lists_its_base_packages(tmp_path: Path) -> None:
    """A layer's image holds its base's packages: their files' sha256 come from the base's
    manifest, else from the base's lock in the history; a package neither gives says
    NOASSERTION for its checksum (and both documents still validate)."""
    import dataclasses
    from vztt.backend import InstalledPackage, PackageInfo
    from vztt.builder import layer as layers
    from vztt.builder.pipeline import _package_records
    from vztt.recipe.lock import Lock, LockedPackage
    from vztt.store import sbom
    from vztt.store.manifest import Manifest, PackageRecord
    from vztt.store.templates import TemplateCache

    cache = TemplateCache(tmp_path / "cache")
    tiny_template(cache.root, "base-1-x86_64", build_id="20260101T000000Z-base")
    entry = cache.entry("base-1-x86_64")
    assert entry is not None
    m = entry.manifest
    m.packages = [PackageRecord("libc6", "amd64", "2.36", sha256="a" * 64), PackageRecord("bash", "amd64", "5.2")]
    lock = Lock(recipe="base-1-x86_64", inputs_digest="sha256:" + "0" * 64, distro="debian", release="tiny",
                arch="amd64", source_date_epoch=1, repositories=(), request=(),
                packages=(LockedPackage(name="bash", version="5.2", arch="amd64", size=1, sha256="b" * 64,
                                        filename="b.deb", repository="main"),))
    m.lock_digest = lock.digest
    cache.record_history(m.name, m, lock)
    known = layers.base_package_files(cache, dataclasses.replace(entry, manifest=m))
    assert known == {("libc6", "amd64", "2.36"): "a" * 64, ("bash", "amd64", "5.2"): "b" * 64}

    layer_lock = dataclasses.replace(lock, recipe="layer-1-x86_64", packages=(
        LockedPackage(name="nginx", version="1.22", arch="amd64", size=1, sha256="c" * 64, filename="n.deb",
                      repository="main"),))
    installed = [InstalledPackage(n, "amd64", v, "ii") for n, v in
                 (("libc6", "2.36"), ("bash", "5.2"), ("nginx", "1.22"), ("mawk", "1.3"))]
    records = _package_records(installed, {("nginx", "amd64"): PackageInfo(licenses=("BSD-2-clause",))},
                               layer_lock, known)
    assert {p.name: p.sha256 for p in records} == {"bash": "b" * 64, "libc6": "a" * 64, "mawk": "",
                                                  "nginx": "c" * 64}
    layer = Manifest.read(cache.manifest("base-1-x86_64"))
    layer.name, layer.packages, layer.package_count = "layer-1-x86_64", records, len(records)
    spdx_doc = json.loads(sbom.render(layer, "spdx"))
    mawk = next(p for p in spdx_doc["packages"] if p["name"] == "mawk")
    assert "checksums" not in mawk and "NOASSERTION" in mawk["comment"]
    cdx_doc = json.loads(sbom.render(layer, "cyclonedx"))
    mawk = next(c for c in cdx_doc["components"] if c["name"] == "mawk")
    assert {"name": "vztt:package_sha256", "value": "NOASSERTION"} in mawk["properties"]
    for kind, check in (("spdx", spdx_problems), ("cyclonedx", cyclonedx_problems)):
        path = tmp_path / f"layer.{kind}.json"
        path.write_bytes(sbom.render(layer, kind))
        assert check(path) == [], kind
