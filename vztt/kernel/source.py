"""Debian's kernel source package (linux-source-6.1): apt's candidate, the
.deb fetched into the kernel cache with `apt-get download`, the date the
build takes from it, and the kernel tree unpacked from it."""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from vztt.base.errors import BuildError, FetchError
from vztt.base.files import replace_into_place, temp_name
from vztt.base.proc import DEVNULL, PIPE, Log, kill_tree, run, spawn
from vztt.kernel import STEP_TIMEOUT
from vztt.store.packages import sha256_file

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = f"./usr/src/{SOURCE_PACKAGE}.tar.xz"   # inside the .deb
SOURCE_TOP = SOURCE_PACKAGE                              # top directory of the tarball


@dataclass
class SourcePackage:
    name: str
    version: str
    sha256: str
    size: int

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.split(':')[-1]}_all.deb"


def source_package(log: Log | None = None) -> SourcePackage:
    """apt's candidate of the kernel source package (from the host's apt lists)."""
    proc = run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE], log=log, check=False,
               what=f"apt-cache show {SOURCE_PACKAGE}", error=FetchError, timeout=120)
    fields: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if ":" in line and not line.startswith(" "):
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if proc.returncode != 0 or "Version" not in fields:
        raise FetchError(f"{SOURCE_PACKAGE}: apt does not know the package (run `apt-get update`; it is in "
                         f"Debian 12's main and security archives): {proc.stderr.strip()[-300:]}")
    return SourcePackage(SOURCE_PACKAGE, fields["Version"], fields.get("SHA256", ""), int(fields.get("Size", "0")))


def fetch_source(source: SourcePackage, kcache: Path, log: Log | None = None) -> tuple[Path, bool]:
    """The source .deb in the kernel cache: fetched with `apt-get download`
    unless it is there already. Returns (path, whether it was downloaded).
    Other versions' .debs are removed once the new one is in place."""
    src = kcache / "source"
    src.mkdir(parents=True, exist_ok=True)
    deb = src / source.deb_name
    if deb.is_file() and (not source.sha256 or sha256_file(deb) == source.sha256):
        return deb, False
    deb.unlink(missing_ok=True)
    tmp = temp_name(deb)              # apt-get download writes where it runs: a directory of our own
    tmp.mkdir()
    try:
        # apt drops to the _apt user to download unless told; our cache is root's.
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{source.name}={source.version}"],
            log=log, cwd=tmp, what=f"apt-get download {source.name}={source.version}", error=FetchError,
            timeout=STEP_TIMEOUT)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise FetchError(f"apt-get download {source.name}: expected one .deb, found {len(got)}")
        if source.sha256 and (digest := sha256_file(got[0])) != source.sha256:
            raise FetchError(f"{got[0].name}: sha256 {digest} does not match apt's {source.sha256}")
        replace_into_place(got[0], deb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in src.glob(f"{source.name}_*.deb"):
        if old != deb:
            old.unlink(missing_ok=True)
    return deb, True


def source_date_epoch(deb: Path) -> int:
    """When the source package was made: the mtime of the kernel tarball in
    the .deb, which Debian's reproducible builds set to the changelog's date.
    The kernel's build timestamp comes from it, not from the clock."""
    proc = spawn(["dpkg-deb", "--fsys-tarfile", deb], what=f"reading {deb.name}", stdout=PIPE, stderr=DEVNULL)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.name == SOURCE_TARBALL:
                    return int(member.mtime)
    except tarfile.TarError as e:
        raise BuildError(f"{deb}: not a readable .deb: {e}") from None
    finally:
        kill_tree(proc)               # it is done, or we stopped reading
        proc.stdout.close()
    raise BuildError(f"{deb.name}: no {SOURCE_TARBALL} in the package")


def extract_source(deb: Path, dest: Path, log: Log | None = None) -> Path:
    """Unpack the kernel tree from the source .deb into dest; returns the tree."""
    dest.mkdir(parents=True, exist_ok=True)
    script = 'set -eo pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | tar -xJ --no-same-owner -C "$3"'
    run(["bash", "-c", script, "extract", str(deb), SOURCE_TARBALL, str(dest)], log=log,
        what=f"unpacking {deb.name}", timeout=STEP_TIMEOUT)
    tree = dest / SOURCE_TOP
    if not (tree / "Makefile").is_file():
        raise BuildError(f"{deb.name}: no kernel tree {SOURCE_TOP}/ in {SOURCE_TARBALL}")
    return tree
