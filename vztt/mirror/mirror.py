"""Template mirrors: publish cached templates to one, pull them from one.

Layout of a mirror (a directory a web server serves, or a WebDAV location):

    index.json                                    every template and its builds (the commit record)
    index.json.asc                                detached OpenPGP signature of index.json
    templates/<name>/<build id>/<name>.plain.tar.lz4
    templates/<name>/<build id>/<name>.plain.ploopv2.tar.lz4     (builds made with --format ploop/all)
    templates/<name>/<build id>/<name>.manifest.json

A build id is the manifest's `build_id` (`<created, UTC, YYYYmmddTHHMMSSZ>-<lock
digest prefix>`), or for older manifests `<created>-<first 12 hex of the primary
archive's sha256>`: sortable by time, and the same build gets the same id on
every mirror. index.json (format 1):

    {"format": 1, "serial": 7, "generated": "...", "generator": "vztt 0.1.0",
     "templates": {"<name>": {"builds": [            # newest first
        {"id": ..., "created": ..., "published": ..., "distro": ..., "release": ..., "version": ...,
         "arch": ..., "recipe_digest": ..., "lock_digest": ..., "package_count": 135,
         "formats": ["plain"], "boot_test": "passed",
         "manifest": {"path": "templates/...json", "sha256": ..., "size": ...},
         "archives": {"plain": {"path": "templates/...tar.lz4", "sha256": ..., "size": ..., "tar_size": ...}}}]}}}

Publish writes archives first, then manifests, then the signature and the
index, each through a temporary name and a rename (directory) or a temporary
path and MOVE (WebDAV): the index never names a file that is missing or half
written. Old builds beyond `keep` go only after the new index is in place.

Pull verifies index.json with gpgv against the host's trusted keys before
believing anything in it, then downloads with resume and retries into
`<cache>/.downloads/<sha256>.part` (kept across runs, locked while written),
checks size and sha256, and installs archives and manifest into the cache
with the cache's atomic promote (the `-old` rule).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote, unquote, urlparse

import requests

from vztt import __version__

from vztt.base import signing
from vztt.store.templates import Entry, TemplateCache
from vztt.base.errors import FetchError, PublishRefused, RecipeError
from vztt.base.progress import Progress
from vztt import formats as formats_registry

T = TypeVar("T")

INDEX, SIGNATURE = "index.json", "index.json.asc"
INDEX_FORMAT = 1
TEMPLATES = "templates"
DOWNLOADS = ".downloads"
CHUNK = 1 << 20
MAX_INDEX = 32 << 20
MAX_SIGNATURE = 1 << 20
MAX_MANIFEST = 16 << 20
DEFAULT_KEEP = 3
USER_AGENT = f"vztt/{__version__}"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8,64}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
PART_MAX_AGE = 7 * 86400

SYSTEM_KEYRING = Path("/etc/vztt/trusted.gpg")
SYSTEM_KEYRING_DIR = Path("/etc/vztt/trusted.gpg.d")
SYSTEM_MIRROR_LIST = Path("/etc/vztt/template-mirrors.list")


class MirrorError(FetchError):
    """A mirror that cannot be read or written: HTTP errors, a malformed index, a missing build."""

    kind = "mirror"


# --------------------------------------------------------------------------
# Configuration: trusted keys, the mirror list
# --------------------------------------------------------------------------

def trusted_keyrings(given: tuple[Path, ...] | list[Path] = ()) -> list[Path]:
    """--keyring, else VZTT_KEYRING (colon-separated), else /etc/vztt/trusted.gpg(.d/)."""
    if given:
        return [Path(p) for p in given]
    env = os.environ.get("VZTT_KEYRING", "").strip()
    if env:
        return [Path(p) for p in env.split(":") if p]
    found = [SYSTEM_KEYRING] if SYSTEM_KEYRING.is_file() else []
    if SYSTEM_KEYRING_DIR.is_dir():
        found += sorted(p for p in SYSTEM_KEYRING_DIR.iterdir() if p.suffix in (".gpg", ".asc") and p.is_file())
    return found


def keyring_for(given: tuple[Path, ...] | list[Path] = ()) -> bytes:
    paths = trusted_keyrings(given)
    if not paths:
        raise signing.SignatureError(f"no trusted keys: give --keyring FILE, set VZTT_KEYRING, or install the "
                                     f"publisher's key as {SYSTEM_KEYRING} (or in {SYSTEM_KEYRING_DIR}/)")
    return signing.keyring_bytes(paths)


def mirror_list(given: tuple[str, ...] | list[str] = ()) -> list[str]:
    """--from (repeatable, in order), else VZTT_TEMPLATE_MIRRORS (space-separated), else the list file."""
    if given:
        return list(given)
    env = os.environ.get("VZTT_TEMPLATE_MIRRORS", "").split()
    if env:
        return env
    try:
        lines = SYSTEM_MIRROR_LIST.read_text().splitlines()
    except OSError:
        lines = []
    found = [l.split("#", 1)[0].strip() for l in lines]
    found = [l for l in found if l]
    if not found:
        raise RecipeError(f"no template mirror: give --from URL, set VZTT_TEMPLATE_MIRRORS, or list mirrors in "
                          f"{SYSTEM_MIRROR_LIST}")
    return found


# --------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------

def build_id(manifest: dict[str, Any]) -> str:
    """The manifest's own `build_id` (time and lock), else time and archive sha256."""
    given = manifest.get("build_id")
    if isinstance(given, str) and ID_RE.fullmatch(given):
        return given
    created = datetime.fromisoformat(manifest["created"]).astimezone(timezone.utc)
    return f"{created:%Y%m%dT%H%M%SZ}-{manifest['archive']['sha256'][:12]}"


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "serial": 0, "generated": None, "generator": f"vztt {__version__}",
            "templates": {}}


def clean_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as the build wrote it: local bookkeeping (`pulled`) left out."""
    return {k: v for k, v in manifest.items() if k != "pulled"}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _safe_rel(path: Any, where: str) -> str:
    """A path inside the mirror: relative, no '..', no scheme, no oddities."""
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*", path) \
            or any(p in (".", "..") for p in path.split("/")):
        raise MirrorError(f"{where}: bad path {str(path)[:100]!r} in the index")
    return path


def _file_record(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise MirrorError(f"{where}: not a file record")
    _safe_rel(doc.get("path"), where)
    if not isinstance(doc.get("sha256"), str) or not SHA_RE.fullmatch(doc["sha256"]):
        raise MirrorError(f"{where}: bad sha256")
    if not isinstance(doc.get("size"), int) or isinstance(doc.get("size"), bool) or doc["size"] < 0:
        raise MirrorError(f"{where}: bad size")
    return doc


def parse_index(data: bytes, where: str) -> dict[str, Any]:
    """index.json, checked for shape (after its signature was)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MirrorError(f"{where}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("templates"), dict):
        raise MirrorError(f"{where}: not a vztt mirror index of format {INDEX_FORMAT}")
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
                _file_record(rec, f"{w}: {fmt} archive")
    return doc


def builds_of(index: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return list(index["templates"].get(name, {}).get("builds", []))


def newest_first(builds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(builds, key=lambda b: (b.get("created") or "", b["id"]), reverse=True)


def index_entry(manifest: dict[str, Any], mbytes: bytes, paths: dict[str, str], manifest_path: str) -> dict[str, Any]:
    archives = {}
    for fmt, a in manifest["archives"].items():
        rec = {"path": paths[fmt], "sha256": a["sha256"], "size": a["size"]}
        for extra in ("tar_size", "disk_size", "clusters"):
            if extra in a:
                rec[extra] = a[extra]
        archives[fmt] = rec
    return {
        "id": build_id(manifest), "created": manifest["created"], "published": _now(),
        **{k: manifest.get(k) for k in ("distro", "release", "version", "arch", "recipe_digest", "lock_digest",
                                        "package_count", "vztt_version")},
        "formats": list(manifest.get("formats") or archives),
        "boot_test": (manifest.get("boot_test") or {}).get("result", "skipped"),
        "manifest": {"path": manifest_path, "sha256": hashlib.sha256(mbytes).hexdigest(), "size": len(mbytes)},
        "archives": archives,
    }


def index_bytes(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------
# Where a mirror is
# --------------------------------------------------------------------------

def _is_http(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def _local_path(location: str) -> Path:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise RecipeError(f"{location}: a mirror is a directory, file:///path or http(s):// URL")
    return Path(location).absolute()


def _session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    return s


def _http_error(url: str, r: requests.Response) -> str:
    return f"{url}: HTTP {r.status_code} {r.reason}"


class _Transient(Exception):
    """Worth another try: connection trouble, a 5xx, a short read."""


# --------------------------------------------------------------------------
# Publish targets
# --------------------------------------------------------------------------

class _HashingReader:
    """A file read for an upload, hashed on the way; `len()` gives requests its Content-Length."""

    def __init__(self, fh: Any, size: int):
        self.fh, self.size, self.sha = fh, size, hashlib.sha256()
        self.read_bytes = 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.sha.update(data)
        self.read_bytes += len(data)
        return data


def _check_upload(src: Path, got_sha: str, got_size: int, sha256: str, size: int) -> None:
    if got_size != size or got_sha != sha256:
        raise MirrorError(f"{src}: the cached file does not match its manifest (sha256 {got_sha[:16]}..., "
                          f"expected {sha256[:16]}...); rebuild or pull it again before publishing")


class DirTarget:
    """A mirror directory: temporary name + rename, fsync'ed; one publisher at a time (flock)."""

    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".vztt-publish.lock", "a+")
        except OSError as e:
            raise MirrorError(f"{self.root}: cannot write to the mirror: {e.strerror}") from None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise MirrorError(f"{self.root}: another publish to this mirror is running") from None
            yield

    def read(self, rel: str, limit: int) -> bytes | None:
        try:
            with open(self.root / rel, "rb") as fh:
                data = fh.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        if len(data) > limit:
            raise MirrorError(f"{self.root / rel}: larger than {limit} bytes")
        return data

    def _tmp(self, final: Path) -> Path:
        return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _commit(self, tmp: Path, final: Path) -> None:
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_file(self, rel: str, src: Path, sha256: str, size: int) -> None:
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self._tmp(final)
        try:
            h, n = hashlib.sha256(), 0
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while data := fin.read(CHUNK):
                    h.update(data)
                    n += len(data)
                    fout.write(data)
                fout.flush()
                os.fsync(fout.fileno())
            _check_upload(src, h.hexdigest(), n, sha256, size)
            self._commit(tmp, final)
        except OSError as e:
            raise MirrorError(f"{final}: cannot write: {e.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, rel: str, data: bytes) -> None:
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        tmp = self._tmp(final)
        try:
            with open(tmp, "wb") as fout:
                fout.write(data)
                fout.flush()
                os.fsync(fout.fileno())
            self._commit(tmp, final)
        except OSError as e:
            raise MirrorError(f"{final}: cannot write: {e.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def delete_dir(self, rel: str) -> None:
        """Remove a build directory once it holds nothing the index names (what is left is ours)."""
        d = self.root / rel
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file():
                    p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()          # the template's directory, when its last build went


class DavTarget:
    """A WebDAV location: PUT to a temporary path, MOVE into place, DELETE.

    Credentials: VZTT_PUBLISH_USER and VZTT_PUBLISH_PASSWORD, else netrc
    (requests reads ~/.netrc or $NETRC), else none."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.base = url.rstrip("/") + "/"
        self.label = self.base
        self.timeout = timeout
        self.session = _session()
        user = os.environ.get("VZTT_PUBLISH_USER")
        if user:
            self.session.auth = (user, os.environ.get("VZTT_PUBLISH_PASSWORD", ""))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield           # WebDAV LOCK is not something every server has: one publisher at a time, by convention

    def url(self, rel: str) -> str:
        return self.base + quote(rel)

    def _request(self, method: str, rel: str, ok: tuple[int, ...], **kw: Any) -> requests.Response:
        url = kw.pop("url", None) or self.url(rel)
        try:
            r = self.session.request(method, url, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise MirrorError(f"{method} {url}: {type(e).__name__}: {str(e)[:200]}") from None
        if r.status_code not in ok:
            hint = ""
            if r.status_code in (401, 403):
                hint = (f" (credentials: VZTT_PUBLISH_USER/VZTT_PUBLISH_PASSWORD or a netrc entry for "
                        f"{urlparse(url).hostname})")
            elif r.status_code == 405 and method != "GET":
                hint = " (does this location accept WebDAV?)"
            raise MirrorError(f"{method} {_http_error(url, r)}{hint}")
        return r

    def read(self, rel: str, limit: int) -> bytes | None:
        r = self._request("GET", rel, (200, 404), stream=True)
        with r:
            if r.status_code == 404:
                return None
            buf = bytearray()
            for chunk in r.iter_content(CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise MirrorError(f"{self.url(rel)}: larger than {limit} bytes")
            return bytes(buf)

    def _mkcols(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self._request("MKCOL", "/".join(parts[:i]) + "/", (201, 301, 405, 409))

    def _move_into_place(self, tmp_rel: str, rel: str) -> None:
        try:
            self._request("MOVE", tmp_rel, (201, 204), headers={"Destination": self.url(rel), "Overwrite": "T"})
        except MirrorError:
            with contextlib.suppress(MirrorError):
                self._request("DELETE", tmp_rel, (200, 204, 404))
            raise

    def _tmp_rel(self, rel: str) -> str:
        head, _, name = rel.rpartition("/")
        return f"{head}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}".lstrip("/")

    def put_file(self, rel: str, src: Path, sha256: str, size: int) -> None:
        self._mkcols(rel)
        tmp = self._tmp_rel(rel)
        with open(src, "rb") as fh:
            body = _HashingReader(fh, os.fstat(fh.fileno()).st_size)
            self._request("PUT", tmp, (200, 201, 204), data=body)
        try:
            _check_upload(src, body.sha.hexdigest(), body.read_bytes, sha256, size)
        except MirrorError:
            with contextlib.suppress(MirrorError):
                self._request("DELETE", tmp, (200, 204, 404))
            raise
        self._move_into_place(tmp, rel)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._mkcols(rel)
        tmp = self._tmp_rel(rel)
        self._request("PUT", tmp, (200, 201, 204), data=data)
        self._move_into_place(tmp, rel)

    def delete(self, rel: str) -> None:
        self._request("DELETE", rel, (200, 204, 404))

    def delete_dir(self, rel: str) -> None:
        self._request("DELETE", rel.rstrip("/") + "/", (200, 204, 404), headers={"Depth": "infinity"})


def target_for(location: str) -> DirTarget | DavTarget:
    return DavTarget(location) if _is_http(location) else DirTarget(_local_path(location))


# --------------------------------------------------------------------------
# Publish
# --------------------------------------------------------------------------

@dataclass
class PublishOptions:
    sign_key: str
    keep: int = DEFAULT_KEEP             # newest builds kept per published template; 0 keeps all
    allow_untested: bool = False
    keyrings: tuple[Path, ...] = ()      # more keys the mirror's current index may be signed with


@dataclass
class PublishResult:
    target: str
    published: list[dict[str, Any]] = field(default_factory=list)    # {name, id, uploaded: [...], bytes}
    unchanged: list[str] = field(default_factory=list)               # templates the mirror already had
    removed: list[str] = field(default_factory=list)                 # build ids dropped by retention
    serial: int = 0
    signer: str = ""
    index_written: bool = False

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
    if not NAME_RE.fullmatch(name):
        raise RecipeError(f"{name!r}: not a template name")
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root}; build or pull it first")
    result = (entry.data.get("boot_test") or {}).get("result", "skipped")
    if result == "failed":
        raise PublishRefused(f"{name}: refused: its boot test failed ({entry.manifest_path})")
    if result != "passed" and not allow_untested:
        raise PublishRefused(f"{name}: refused: its boot test was {result}; run `vztt build {name}` with the test, "
                             f"or publish with --allow-untested")
    for fmt, a in entry.data.get("archives", {}).items():
        if not (cache.root / a["file"]).is_file():
            raise RecipeError(f"{name}: the manifest names {a['file']} ({fmt}), which is not in {cache.root}")
    return entry


def _has_build(builds: list[dict[str, Any]], manifest: dict[str, Any], bid: str) -> bool:
    """The mirror has this build: same id, or the same primary archive in the same formats."""
    primary = manifest["archive"]
    fmt = primary.get("format", "plain")
    return any(b["id"] == bid or (b["archives"].get(fmt, {}).get("sha256") == primary["sha256"]
                                  and set(b["archives"]) == set(manifest["archives"])) for b in builds)


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
        with progress.step("index") as st:
            current_raw = target.read(INDEX, MAX_INDEX)
            if current_raw is None:
                index = empty_index()
                st.note("new mirror")
            else:
                sig = target.read(SIGNATURE, MAX_SIGNATURE)
                if sig is None:
                    raise signing.SignatureError(f"{target.label}: {INDEX} has no {SIGNATURE}: refusing to sign "
                                                 "an index nobody signed")
                signing.verify(current_raw, sig, trusted, f"{target.label}{'' if target.label.endswith('/') else '/'}{INDEX}")
                index = parse_index(current_raw, f"{target.label} {INDEX}")
                st.note(f"serial {index.get('serial', 0)}, {len(index['templates'])} templates")
        old_index = copy.deepcopy(index)
        # Every file the mirror holds, by sha256: what it has is not uploaded again.
        have = {rec["sha256"]: rec["path"] for t in index["templates"].values() for b in t["builds"]
                for rec in [b["manifest"], *b["archives"].values()]}
        for entry in entries:
            name, manifest = entry.name, clean_manifest(entry.data)
            bid = build_id(manifest)
            builds = builds_of(index, name)
            if _has_build(builds, manifest, bid):
                result.unchanged.append(name)
                progress.say(f"  {name}: the mirror has this build already")
                if builds:
                    index["templates"][name]["builds"] = newest_first(builds)[:options.keep or None]
                continue
            uploaded, sent = [], 0
            paths: dict[str, str] = {}
            with progress.step("upload") as st:
                for fmt in formats_registry.names():
                    a = manifest["archives"].get(fmt)
                    if a is None:
                        continue
                    rel = f"{TEMPLATES}/{name}/{bid}/{a['file']}"
                    if a["sha256"] in have:
                        paths[fmt] = have[a["sha256"]]
                        continue
                    target.put_file(rel, cache.root / a["file"], a["sha256"], a["size"])
                    paths[fmt] = rel
                    have[a["sha256"]] = rel
                    uploaded.append(rel)
                    sent += a["size"]
                mbytes = manifest_bytes(manifest)
                mrel = f"{TEMPLATES}/{name}/{bid}/{name}.manifest.json"
                target.put_bytes(mrel, mbytes)
                uploaded.append(mrel)
                st.note(f"{name} {bid}: {len(uploaded)} files, {sent / 1e6:.1f} MB")
            new = index_entry(manifest, mbytes, paths, mrel)
            index["templates"].setdefault(name, {"builds": []})
            index["templates"][name]["builds"] = newest_first([b for b in builds if b["id"] != bid] + [new])[
                :options.keep or None]
            result.published.append({"name": name, "id": bid, "uploaded": uploaded, "bytes": sent,
                                     "boot_test": new["boot_test"]})
        if index == old_index:
            result.serial = index.get("serial", 0)
            return result
        index["serial"] = int(old_index.get("serial") or 0) + 1
        index["generated"] = _now()
        index["generator"] = f"vztt {__version__}"
        data = index_bytes(index)
        with progress.step("sign") as st:
            sig = signing.sign_detached(data, fingerprint)
            signing.verify(data, sig, own_key, "the new index")      # what readers will check
            st.note(f"key {fingerprint}")
        with progress.step("commit") as st:
            target.put_bytes(SIGNATURE, sig)
            target.put_bytes(INDEX, data)
            result.index_written, result.serial = True, index["serial"]
            st.note(f"{INDEX} serial {index['serial']}")
        # Retention, only now that no index names what goes.
        referenced = {rec["path"] for t in index["templates"].values() for b in t["builds"]
                      for rec in [b["manifest"], *b["archives"].values()]}
        live_ids = {(n, b["id"]) for n, t in index["templates"].items() for b in t["builds"]}
        with progress.step("retention") as st:
            for name, t in old_index["templates"].items():
                for b in t["builds"]:
                    if (name, b["id"]) in live_ids:
                        continue
                    files = [rec["path"] for rec in [b["manifest"], *b["archives"].values()]]
                    for rel in files:
                        if rel not in referenced:
                            target.delete(rel)
                    build_dir = f"{TEMPLATES}/{name}/{b['id']}"
                    if not any(r.startswith(build_dir + "/") for r in referenced):
                        target.delete_dir(build_dir)
                    result.removed.append(f"{name} {b['id']}")
            st.note(f"{len(result.removed)} old builds removed" if result.removed else "nothing to remove")
    return result


# --------------------------------------------------------------------------
# Pull: sources, verified index, resumable downloads
# --------------------------------------------------------------------------

class Source:
    """A mirror to read from: http(s):// (resume, retries) or a local directory / file:// URL."""

    def __init__(self, location: str, retries: int = 5, backoff: float = 0.5, timeout: float = 30.0):
        self.location = location
        self.http = _is_http(location)
        self.base = location.rstrip("/") + "/" if self.http else ""
        self.root = None if self.http else _local_path(location)
        self.label = self.base if self.http else str(self.root)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self._session: requests.Session | None = None
        self.resumed = 0

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = _session()
        return self._session

    def where(self, rel: str) -> str:
        return self.base + quote(rel) if self.http else str(self.root / rel)  # type: ignore[operator]

    def get_small(self, rel: str, limit: int) -> bytes:
        """A small file (index, signature, manifest), whole; MirrorError if missing or too big."""
        if not self.http:
            assert self.root is not None
            try:
                with open(self.root / rel, "rb") as fh:
                    data = fh.read(limit + 1)
            except OSError as e:
                raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        else:
            url = self.where(rel)
            retries = min(self.retries, 2)       # a dead mirror should not hold up the next one for long
            for attempt in range(retries + 1):
                try:
                    with self.session.get(url, stream=True, timeout=self.timeout) as r:
                        if r.status_code >= 500 or r.status_code == 429:
                            raise _Transient(f"HTTP {r.status_code}")
                        if r.status_code != 200:
                            raise MirrorError(_http_error(url, r))
                        buf = bytearray()
                        for chunk in r.iter_content(CHUNK):
                            buf += chunk
                            if len(buf) > limit:
                                break
                        data = bytes(buf)
                    break
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        _Transient) as e:
                    if attempt == retries:
                        raise MirrorError(f"{url}: {_why(e)} (gave up after {retries + 1} tries)") from None
                    time.sleep(self.backoff * 2 ** attempt)
        if len(data) > limit:
            raise MirrorError(f"{self.where(rel)}: larger than {limit} bytes")
        return data

    def chunks(self, rel: str, part: Path, size: int, sha256: str) -> Iterator[bytes]:
        """The file's bytes, in order, exactly once: what `part` already holds, then
        the rest from the mirror (resumed with Range after a cut, retried with
        backoff). Written to `part` on the way; size and sha256 are checked at the
        end (FetchError, `part` removed). `part` is locked while this runs."""
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)          # another pull may be fetching the same file
            state = _Part(fh)
            if state.have > size:
                state.restart()
            fh.seek(0)
            while state.hashed < state.have:       # what an earlier run left: hashed, and handed on
                data = fh.read(min(CHUNK, state.have - state.hashed))
                if not data:
                    break
                state.h.update(data)
                state.hashed += len(data)
                state.delivered = state.hashed
                yield data
            fh.seek(0, os.SEEK_END)
            if self.http:
                yield from self._http_chunks(rel, state, size)
            else:
                yield from self._file_chunks(rel, state, size)
            fh.flush()
            got, digest = os.fstat(fh.fileno()).st_size, state.h.hexdigest()
            if got != size or digest != sha256:
                fh.truncate(0)
                part.unlink(missing_ok=True)
                what = (f"size {got}, the index says {size}" if got != size
                        else f"sha256 {digest[:16]}..., the index says {sha256[:16]}...")
                raise FetchError(f"{self.where(rel)}: {what} (damaged or tampered download; removed)")
            os.fsync(fh.fileno())

    def _file_chunks(self, rel: str, state: "_Part", size: int) -> Iterator[bytes]:
        assert self.root is not None
        try:
            src = open(self.root / rel, "rb")
        except OSError as e:
            raise MirrorError(f"{self.root / rel}: {e.strerror}") from None
        with src:
            src.seek(state.have)
            while state.have < size and (data := src.read(min(CHUNK, size - state.have))):
                yield from state.add(data)
            if state.have == size and src.read(1):
                raise FetchError(f"{self.root / rel}: larger than the {size} bytes the index says")

    def _http_chunks(self, rel: str, state: "_Part", size: int) -> Iterator[bytes]:
        url = self.where(rel)
        failures = 0
        while state.have < size:
            headers = {"Range": f"bytes={state.have}-"} if state.have else {}
            try:
                with self.session.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                    if r.status_code == 206:
                        start = _content_range_start(r.headers.get("Content-Range", ""))
                        if start != state.have:
                            raise _Transient(f"the server resumed at byte {start}, not {state.have}")
                        self.resumed += 1
                    elif r.status_code == 200:
                        state.restart()             # no Range support: from the start (the consumer skips)
                    elif r.status_code == 416:
                        if state.have == size:
                            break
                        raise FetchError(f"{url}: the file on the mirror ends before byte {state.have + 1}; "
                                         f"the index says {size} bytes (truncated on the mirror?)")
                    elif r.status_code >= 500 or r.status_code == 429:
                        raise _Transient(f"HTTP {r.status_code}")
                    else:
                        raise MirrorError(_http_error(url, r))
                    for data in r.iter_content(CHUNK):
                        if state.have + len(data) > size:
                            raise FetchError(f"{url}: the server sends more than the {size} bytes the index says")
                        yield from state.add(data)
                    if state.have < size:
                        raise _Transient(f"connection closed after {state.have} of {size} bytes")
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    _Transient) as e:
                failures += 1
                if failures > self.retries:
                    raise MirrorError(f"{url}: {_why(e)} (gave up after {failures} tries)") from None
                state.fh.flush()
                time.sleep(min(self.backoff * 2 ** (failures - 1), 10))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


def _content_range_start(value: str) -> int:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    return int(m.group(1)) if m else -1


def _why(e: BaseException) -> str:
    if isinstance(e, _Transient):
        return str(e)
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.ConnectionError) and "refused" in str(e).lower():
        return "connection refused"
    return f"{type(e).__name__}: {str(e)[:200]}"


class _Part:
    """A download's part file: bytes written and hashed so far, bytes handed to the consumer."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.h = hashlib.sha256()
        self.have = os.fstat(fh.fileno()).st_size    # bytes in the file
        self.hashed = 0
        self.delivered = 0

    def restart(self) -> None:
        self.fh.truncate(0)
        self.fh.seek(0)
        self.h = hashlib.sha256()
        self.have = self.hashed = 0

    def add(self, data: bytes) -> Iterator[bytes]:
        self.fh.write(data)
        self.h.update(data)
        start = self.have
        self.have += len(data)
        self.hashed = self.have
        if self.have > self.delivered:           # after a restart from 0, what was handed on already is skipped
            yield data[max(0, self.delivered - start):]
            self.delivered = self.have


# --------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------

LOCK_WAIT = 3600.0      # a pull waits this long for another pull or build of the same template


@dataclass
class Remote:
    """A build on a mirror, from an index whose signature checked out."""

    source: Source
    index: dict[str, Any]
    build: dict[str, Any]
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
            d["archives"] = {f: str(self.entry.manifest_path.parent / a["file"])
                             for f, a in self.entry.data.get("archives", {}).items()}
        return d


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise RecipeError(f"{name!r}: not a template name")


def find_build(source: Source, name: str, keyring: bytes, build: str | None = None) -> Remote:
    """Fetch and verify the mirror's index, and pick NAME's build (newest, or `build`)."""
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
    if entry is None:
        return None
    pulled = entry.data.get("pulled") or {}
    try:
        return pulled.get("build") or build_id(entry.data)
    except (KeyError, ValueError, TypeError):
        return None


def part_path(cache: TemplateCache, sha256: str) -> Path:
    return cache.root / DOWNLOADS / f"{sha256}.part"


def clean_old_parts(cache: TemplateCache, max_age: float = PART_MAX_AGE) -> None:
    d = cache.root / DOWNLOADS
    if not d.is_dir():
        return
    now = time.time()
    for p in d.glob("*.part"):
        try:
            if now - p.stat().st_mtime < max_age:
                continue
            with open(p, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                p.unlink()
        except OSError:
            continue


def wanted_formats(remote: Remote, formats: tuple[str, ...] | None) -> list[str]:
    have = list(remote.build["archives"])
    if not formats:
        return formats_registry.ordered(have)
    missing = [f for f in formats if f not in have]
    if missing:
        raise MirrorError(f"{remote.source.label}: {remote.id} has no {', '.join(missing)} archive "
                          f"(formats: {', '.join(have)})")
    return formats_registry.ordered(formats)


def download(remote: Remote, cache: TemplateCache, fmt: str) -> Path:
    """One archive of the build into its part file, verified (resumes what an earlier run left)."""
    rec = remote.build["archives"][fmt]
    part = part_path(cache, rec["sha256"])
    for _ in remote.source.chunks(rec["path"], part, rec["size"], rec["sha256"]):
        pass
    return part


def install(cache: TemplateCache, name: str, remote: Remote, parts: dict[str, Path]) -> Entry:
    """The downloaded archives (`parts`, verified) and the build's manifest into the
    cache, with promote's `-old` rule. The manifest keeps only the formats pulled,
    and records where it came from under `pulled`."""
    rec = remote.build["manifest"]
    data = remote.source.get_small(rec["path"], MAX_MANIFEST)
    if len(data) != rec["size"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise FetchError(f"{remote.source.where(rec['path'])}: does not match the sha256 and size the index says")
    try:
        manifest = json.loads(data)
        ok = (manifest.get("name") == name and build_id(manifest) == remote.id
              and all(manifest["archives"][f]["sha256"] == remote.build["archives"][f]["sha256"]
                      and manifest["archives"][f]["file"] == formats_registry.get(f).file_name(name) for f in parts))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise MirrorError(f"{remote.source.where(rec['path'])}: the manifest does not describe {name} build {remote.id}")
    formats = formats_registry.ordered(list(parts))
    manifest["archives"] = {f: manifest["archives"][f] for f in formats}
    manifest["formats"] = formats
    manifest["archive"] = manifest["archives"][formats[0]]
    manifest["pulled"] = {"from": remote.source.label, "build": remote.id, "at": _now(),
                          "signer": remote.signer.fingerprint, "index_serial": remote.index.get("serial"),
                          "manifest_sha256": rec["sha256"]}
    pairs: list[tuple[Path, Path]] = []
    temps: list[Path] = []
    try:
        for f in formats:
            final = cache.archive(name, f)
            tmp = cache.temp_path(final)
            temps.append(tmp)
            os.replace(parts[f], tmp)
            os.chmod(tmp, 0o644)
            pairs.append((tmp, final))
        final_manifest = cache.manifest(name)
        tmp_manifest = cache.temp_path(final_manifest)
        temps.append(tmp_manifest)
        with open(tmp_manifest, "wb") as fh:
            fh.write(manifest_bytes(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        cache.promote(name, pairs + [(tmp_manifest, final_manifest)])
        for f in set(formats_registry.names()) - set(formats):          # the manifest no longer names them
            cache.archive(name, f).unlink(missing_ok=True)
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


def pull(cache: TemplateCache, name: str, mirrors: list[str], keyrings: tuple[Path, ...] = (),
         build: str | None = None, formats: tuple[str, ...] | None = None,
         progress: Progress | None = None) -> PullResult:
    """NAME's build from the first mirror that has it and passes every check."""
    progress = progress or Progress(quiet=True)
    check_name(name)
    keyring = keyring_for(keyrings)
    started = time.monotonic()
    cache.clean_stale_work()
    clean_old_parts(cache)
    with cache.building(name, timeout=LOCK_WAIT):
        def attempt(source: Source, failed: list[str]) -> PullResult:
            with progress.step("index") as st:
                remote = find_build(source, name, keyring, build)
                st.note(f"{source.label}: {name} {remote.id} (boot test {remote.build.get('boot_test')}), "
                        f"signed by {remote.signer.fingerprint}")
            want = wanted_formats(remote, formats)
            result = PullResult(name=name, build=remote.id, mirror=source.label,
                                signer=remote.signer.fingerprint, formats=want,
                                boot_test=str(remote.build.get("boot_test")),
                                failed_mirrors=failed)
            entry = cache.entry(name)
            if local_build(entry) == remote.id and all(f in entry.data.get("archives", {}) for f in want):  # type: ignore[union-attr]
                result.up_to_date, result.entry = True, entry
                progress.say(f"  {name} {remote.id} is in the cache already")
            else:
                parts = {}
                for f in want:
                    with progress.step("download") as st:
                        t0 = time.monotonic()
                        parts[f] = download(remote, cache, f)
                        size = remote.build["archives"][f]["size"]
                        st.note(f"{f}: {size / 1e6:.1f} MB, {size / 1e6 / max(time.monotonic() - t0, 1e-3):.0f} "
                                f"MB/s, sha256 ok" + (f", resumed {source.resumed}x" if source.resumed else ""))
                    result.bytes_downloaded += size
                with progress.step("install") as st:
                    result.entry = install(cache, name, remote, parts)
                    st.note(str(result.entry.manifest_path))
            result.resumed = source.resumed
            result.seconds = round(time.monotonic() - started, 3)
            return result

        return from_first_mirror(name, mirrors, progress, attempt)


def offline_entry(cache: TemplateCache, name: str, build: str | None = None) -> Entry:
    check_name(name)
    entry = cache.entry(name)
    if entry is None:
        raise RecipeError(f"{name}: not in the cache {cache.root} (--offline: no mirror is asked)")
    if build and local_build(entry) != build:
        raise RecipeError(f"{name}: the cache holds build {local_build(entry)}, not {build} (--offline)")
    return entry
