"""The other hosts' indexes on a mirror, written by `vztt publish` in the same step
as index.json and signed with the same publishing key.

Per build, beside its files (builds that have a format for another host):

    SHA256SUMS                 `<sha256> *<file>` of every file of the build in its directory
    SHA256SUMS.gpg             binary detached signature: `systemd-pull tar --verify=signature`
                               (machinectl pull-tar) checks it with /etc/systemd/import-pubring.gpg
    rootfs.tar.xz.asc, meta.tar.xz.asc   armored detached signatures of LXC's files (lxc-download
                               up to LXC 4 verified them with gpg; LXC 5's no longer does)

For the whole mirror (rewritten from the new index.json at every publish):

    meta/1.0/index-system, index-user (+ .asc)   LXC: `os;release;arch;variant;build;path`, the newest
                               build of each image, once per release name (12 and bookworm)
    streams/v1/index.json, images.json            Incus and LXD (mirror/simplestreams.py)

The signature is made at publish, not at build: the publisher holds the key,
a build needs none, and one SHA256SUMS.gpg covers every file of the build's
directory. The files are recorded in the build's index entry (`host_files`),
so retention removes them with the build, and every index here is made from
index.json alone: the same index gives the same files.
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path
from typing import Any

from vztt.base import signing
from vztt.base.progress import Progress
from vztt.formats.hostmeta import TOKEN_RE
from vztt.mirror.index import Build, Index, archive_files, files_of
from vztt.mirror.simplestreams import streams
from vztt.mirror.targets import Target

SUMS, SUMS_SIGNATURE = "SHA256SUMS", "SHA256SUMS.gpg"
LXC_FORMAT = "lxc"                    # the format whose files LXC's index lists
LXC_INDEXES = ("meta/1.0/index-system", "meta/1.0/index-user")


def has_host_formats(build: Build) -> bool:
    return any(isinstance(rec.get("host"), dict) for rec in build["archives"].values())


def _put(target: Target, rel: str, data: bytes) -> dict[str, Any]:
    target.put_bytes(rel, data)
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def sha256sums(build: Build) -> bytes:
    """SHA256SUMS of a build: its files in its own directory, by name (sha256sum's
    binary mode: `<sha256> *<name>`, which systemd-pull reads)."""
    directory = posixpath.dirname(build["manifest"]["path"])
    listed = {posixpath.basename(rec["path"]): rec["sha256"] for rec in files_of(build)
              if posixpath.dirname(rec["path"]) == directory and rec not in build.get("host_files", [])}
    return "".join(f"{sha} *{name}\n" for name, sha in sorted(listed.items())).encode()


def build_files(target: Target, build: Build, local: dict[str, Path], fingerprint: str) -> list[dict[str, Any]]:
    """SHA256SUMS(.gpg) and LXC's .asc for a build just uploaded (`local`: mirror path ->
    the cache's file of the same bytes, to sign). Returns their records for the index."""
    if not has_host_formats(build):
        return []
    directory = posixpath.dirname(build["manifest"]["path"])
    sums = sha256sums(build)
    records = [_put(target, f"{directory}/{SUMS}", sums),
               _put(target, f"{directory}/{SUMS_SIGNATURE}", signing.sign_detached(sums, fingerprint, armor=False))]
    lxc = build["archives"].get(LXC_FORMAT)
    for rec in archive_files(lxc) if lxc else []:
        records.append(_put(target, f"{rec['path']}.asc", signing.sign_file(local[rec["path"]], fingerprint)))
    return records


def lxc_index(index: Index) -> bytes:
    """LXC's image index: the newest build of each (os, release, arch, variant), one line
    per release name (lxc-download takes the first line that matches). The path is the
    build's directory, relative: `lxc-create -t download -- --server HOST/PREFIX` works
    for a mirror below a prefix too."""
    newest: dict[tuple[str, ...], tuple[str, str, str]] = {}     # -> (created, build id, directory)
    for template in index["templates"].values():
        for build in template["builds"]:
            rec = build["archives"].get(LXC_FORMAT)
            host = rec.get("host") if rec else None
            if not isinstance(host, dict):
                continue
            directory = posixpath.dirname(rec["path"])
            if any(posixpath.dirname(f["path"]) != directory for f in archive_files(rec)):
                continue             # LXC wants rootfs.tar.xz and meta.tar.xz side by side
            for release in host["releases"]:
                key = tuple(str(f) for f in (host["os"], release, host["arch"], host["variant"]))
                if not all(TOKEN_RE.fullmatch(f) for f in key):
                    continue         # nothing LXC's parser would split on (;) gets in
                candidate = (build.get("created") or "", build["id"], directory)
                if key not in newest or candidate[:2] > newest[key][:2]:
                    newest[key] = candidate
    return "".join(f"{';'.join(key)};{bid};{directory}\n"
                   for key, (_, bid, directory) in sorted(newest.items())).encode()


def write_indexes(target: Target, old: Index, new: Index, fingerprint: str, progress: Progress) -> list[str]:
    """LXC's and Incus's indexes for the mirror, from the new index.json, when it (or the
    one before: its host images may just have gone) has a build for another host."""
    every = [b for index in (old, new) for t in index["templates"].values() for b in t["builds"]]
    if not any(has_host_formats(b) for b in every):
        return []
    written = []
    with progress.step("hostindex") as st:
        text = lxc_index(new)
        signature = signing.sign_detached(text, fingerprint)
        for rel in LXC_INDEXES:
            target.put_bytes(f"{rel}.asc", signature)
            target.put_bytes(rel, text)
            written += [f"{rel}.asc", rel]
        for rel, data in streams(new).items():
            target.put_bytes(rel, data)
            written.append(rel)
        st.note(f"LXC index {len(text.splitlines())} lines, simplestreams, signed by {fingerprint[-16:]}")
    return written
