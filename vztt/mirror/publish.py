"""`vztt publish`: cached templates to a mirror, under a signed index.

Publish writes archives first, then manifests, then the signature and the
index, each through a temporary name and a rename (directory) or a temporary
path and MOVE (WebDAV): the index never names a file that is missing or half
written. The mirror's current index must verify against the signing key (or
a --keyring key) before it is re-signed. Old builds beyond `keep` go only
after the new index is in place. Every index written says until when hosts
may believe it (`expires`, mirror/freshness.py); an index with less than half
of its validity left (or none) is signed again even when nothing else changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from vztt import __version__
from vztt import formats as formats_registry
from vztt.base import signing
from vztt.base.errors import PublishRefused, RecipeError
from vztt.base.progress import Progress
from vztt.mirror.config import NAME_RE, check_name
from vztt.mirror.freshness import DEFAULT_VALIDITY, expiry, needs_refresh, parse_duration
from vztt.mirror.index import (INDEX, MAX_INDEX, MAX_SIGNATURE, SIGNATURE, Index, build_dir, build_id, builds_of,
                               dropped, empty_index, files_by_sha256, has_build, index_bytes, index_entry,
                               keep_newest, now, parse_index)
from vztt.mirror.targets import Target, target_for
from vztt.store.templates import Entry, TemplateCache

DEFAULT_KEEP = 3


@dataclass
class PublishOptions:
    sign_key: str
    keep: int = DEFAULT_KEEP             # newest builds kept per published template; 0 keeps all
    allow_untested: bool = False
    keyrings: tuple[Path, ...] = ()      # more keys the mirror's current index may be signed with
    validity: timedelta = field(default_factory=lambda: parse_duration(DEFAULT_VALIDITY))   # until `expires`


@dataclass
class PublishResult:
    target: str
    published: list[dict[str, Any]] = field(default_factory=list)    # {name, id, uploaded: [...], bytes}
    unchanged: list[str] = field(default_factory=list)               # templates the mirror already had
    removed: list[str] = field(default_factory=list)                 # build ids dropped by retention
    serial: int = 0
    signer: str = ""
    index_written: bool = False
    expires: str | None = None                                       # of the index on the mirror now

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cached_names(cache: TemplateCache) -> list[str]:
    names = []
    for m in sorted(cache.root.glob("*.manifest.json")):
        name = m.name[:-len(".manifest.json")]
        if NAME_RE.fullmatch(name) and cache.entry(name) is not None:
            names.append(name)
    return names


def _publishable(cache: TemplateCache, name: str, allow_untested: bool) -> Entry:
    check_name(name)
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; build or pull it first")
    result = entry.manifest.boot_result
    if result == "failed":
        raise PublishRefused(f"{name}: refused: its boot test failed ({entry.manifest_path})")
    if result != "passed" and not allow_untested:
        raise PublishRefused(f"{name}: refused: its boot test was {result}; run `vztt build {name}` with the test, "
                             f"or publish with --allow-untested")
    for fmt, a in entry.manifest.archives.items():
        if not (cache.root / a.file).is_file():
            raise RecipeError(f"{name}: the manifest names {a.file} ({fmt}), which is not in {cache.root}")
        if formats_registry.get(fmt).needs_tar_size and not a.tar_size:
            raise RecipeError(f"{name}: the manifest's {fmt} archive has no tar_size, which hosts need to bound "
                              f"unpacking it (and refuse an index without); build {name} again")
    return entry


def _current_index(target: Target, trusted: bytes, progress: Progress) -> Index:
    """The mirror's index, verified against `trusted`; an empty one for a new mirror."""
    with progress.step("index") as st:
        current_raw = target.read(INDEX, MAX_INDEX)
        if current_raw is None:
            st.note("new mirror")
            return empty_index()
        sig = target.read(SIGNATURE, MAX_SIGNATURE)
        if sig is None:
            raise signing.SignatureError(f"{target.label}: {INDEX} has no {SIGNATURE}: refusing to sign "
                                         "an index nobody signed")
        signing.verify(current_raw, sig, trusted, f"{target.label}{'' if target.label.endswith('/') else '/'}{INDEX}")
        index = parse_index(current_raw, f"{target.label} {INDEX}")
        st.note(f"serial {index.get('serial', 0)}, {len(index['templates'])} templates")
        return index


def _upload(target: Target, cache: TemplateCache, entry: Entry, index: Index, have: dict[str, str],
            keep: int, progress: Progress, result: PublishResult) -> None:
    """One template's build onto the mirror (what it lacks, by sha256) and into `index`."""
    name, manifest = entry.name, entry.manifest.published()
    bid = build_id(manifest)
    builds = builds_of(index, name)
    if has_build(builds, manifest, bid):
        result.unchanged.append(name)
        progress.say(f"  {name}: the mirror has this build already")
        if builds:
            index["templates"][name]["builds"] = keep_newest(builds, keep)
        return
    uploaded, sent = [], 0
    paths: dict[str, str] = {}
    with progress.step("upload") as st:
        for fmt in formats_registry.names():
            a = manifest.archives.get(fmt)
            if a is None:
                continue
            if a.sha256 in have:
                paths[fmt] = have[a.sha256]
                continue
            rel = f"{build_dir(name, bid)}/{a.file}"
            target.put_file(rel, cache.root / a.file, a.sha256, a.size)
            paths[fmt] = have[a.sha256] = rel
            uploaded.append(rel)
            sent += a.size
        mbytes = manifest.to_bytes()
        mrel = f"{build_dir(name, bid)}/{name}.manifest.json"
        target.put_bytes(mrel, mbytes)
        uploaded.append(mrel)
        st.note(f"{name} {bid}: {len(uploaded)} files, {sent / 1e6:.1f} MB")
    new = index_entry(manifest, mbytes, paths, mrel)
    index["templates"].setdefault(name, {"builds": []})
    index["templates"][name]["builds"] = keep_newest([b for b in builds if b["id"] != bid] + [new], keep)
    result.published.append({"name": name, "id": bid, "uploaded": uploaded, "bytes": sent,
                             "boot_test": new["boot_test"]})


def _commit(target: Target, index: Index, old_serial: int, fingerprint: str, own_key: bytes, validity: timedelta,
            progress: Progress, result: PublishResult) -> None:
    """The signature, then the index: the new index is what readers see from here on."""
    index["serial"] = old_serial + 1
    index["generated"] = now()
    index["expires"] = expiry(validity)
    index["generator"] = f"vztt {__version__}"
    data = index_bytes(index)
    with progress.step("sign") as st:
        sig = signing.sign_detached(data, fingerprint)
        signing.verify(data, sig, own_key, "the new index")      # what readers will check
        st.note(f"key {fingerprint}")
    with progress.step("commit") as st:
        target.put_bytes(SIGNATURE, sig)
        target.put_bytes(INDEX, data)
        result.index_written, result.serial, result.expires = True, index["serial"], index["expires"]
        st.note(f"{INDEX} serial {index['serial']}, expires {index['expires']}")


def _retention(target: Target, old: Index, new: Index, progress: Progress, result: PublishResult) -> None:
    """Delete what only builds the new index dropped used (it is in place: nobody is sent there)."""
    with progress.step("retention") as st:
        for gone in dropped(old, new):
            for rel in gone.files:
                target.delete(rel)
            if gone.directory:
                target.delete_dir(gone.directory)
            result.removed.append(f"{gone.name} {gone.id}")
        st.note(f"{len(result.removed)} old builds removed" if result.removed else "nothing to remove")


def publish(cache: TemplateCache, names: list[str], location: str, options: PublishOptions,
            progress: Progress | None = None) -> PublishResult:
    progress = progress or Progress(quiet=True)
    if options.keep < 0:
        raise RecipeError(f"--keep {options.keep}: must be 0 (keep all) or more")
    names = names or cached_names(cache)
    if not names:
        raise RecipeError(f"nothing to publish: no template in the cache {cache.root}")
    entries = [_publishable(cache, n, options.allow_untested) for n in names]   # refuse before touching anything
    fingerprint = signing.secret_key_fingerprint(options.sign_key)
    own_key = signing.export_public(fingerprint)
    trusted = own_key + (signing.keyring_bytes(list(options.keyrings)) if options.keyrings else b"")
    target = target_for(location)
    result = PublishResult(target=target.label, signer=fingerprint)
    with target.locked():
        index = _current_index(target, trusted, progress)
        old_index = copy.deepcopy(index)
        have = files_by_sha256(index)          # what the mirror has is not uploaded again
        for entry in entries:
            _upload(target, cache, entry, index, have, options.keep, progress, result)
        if index == old_index and not needs_refresh(index, options.validity):
            result.serial, result.expires = index.get("serial", 0), index.get("expires")
            return result
        _commit(target, index, int(old_index.get("serial") or 0), fingerprint, own_key, options.validity, progress,
                result)
        _retention(target, old_index, index, progress, result)
    return result
