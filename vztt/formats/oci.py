"""The oci format: an OCI image layout in a tar, `<name>.oci.tar`, for
`podman load -i` and `skopeo copy oci-archive:...` (podman names it
localhost/<name>:latest).

  oci-layout, index.json        the layout; the index's manifest carries the platform and
                                org.opencontainers.image.ref.name = the template name
  blobs/sha256/<manifest>       one layer, the config; annotations (below)
  blobs/sha256/<config>         architecture, os, created (the lock's source date), Env,
                                Cmd /sbin/init, StopSignal SIGRTMIN+3 (systemd's halt),
                                Labels = the annotations, rootfs.diff_ids, history
  blobs/sha256/<layer>          the plain archive's tar itself, gzip'd: diff_id = its sha256

Annotations: org.opencontainers.image.{created,title,description,version,vendor},
org.vztt.{lock.sha256,plain.sha256,os,release,variant}.

Every JSON document is canonical (sorted keys, no spaces); the outer tar is
written by Python's tarfile in name order, root-owned, mtime = source date;
the layer is gzip'd by Python's zlib with no name and mtime 0: the same lock
gives the same bytes. gzip has no threads here: pigz or zlib-ng would give
other bytes (the layer is the one step that runs on one core).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from vztt.base.errors import BuildError
from vztt.formats import FormatContext, ImageFormatError, Inspection
from vztt.formats.compress import CHUNK
from vztt.formats.hostmeta import VENDOR, HostFormat, ImageMeta
from vztt.formats.plain import count_tree, reading
from vztt.formats.tarstream import plain_stream
from vztt.store.manifest import ArchiveRecord
from vztt.store.packages import sha256_file

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_JSON = 1 << 20
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def annotations(meta: ImageMeta, plain_sha256: str) -> dict[str, str]:
    return {
        "org.opencontainers.image.created": meta.created_iso,
        "org.opencontainers.image.title": meta.name,
        "org.opencontainers.image.description": meta.description,
        "org.opencontainers.image.version": f"{meta.release}-{meta.serial}",
        "org.opencontainers.image.vendor": VENDOR,
        "org.vztt.lock.sha256": meta.lock_sha256,
        "org.vztt.plain.sha256": plain_sha256,
        "org.vztt.os": meta.os,
        "org.vztt.release": meta.release,
        "org.vztt.variant": meta.variant,
    }


class _Hashing(io.RawIOBase):
    def __init__(self, fh: BinaryIO):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def _layer(plain: Path, out: Path, level: int) -> tuple[str, int, str]:
    """The plain archive's tar, gzip'd to `out`: (sha256 of the gzip, its size, sha256 of the tar)."""
    diff = hashlib.sha256()
    with open(out, "wb") as raw:
        sink = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=sink, mtime=0) as gz, \
                plain_stream(plain) as src:
            while chunk := src.read(CHUNK):
                diff.update(chunk)
                gz.write(chunk)
    return sink.sha.hexdigest(), sink.size, diff.hexdigest()


class OciFormat(HostFormat):
    """An OCI image layout (one layer) in a tar: podman load, skopeo copy oci-archive:."""

    name = "oci"
    suffix = "oci.tar"
    summary = "OCI image layout in a tar (podman load, skopeo copy oci-archive:)"
    step = "oci"

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        meta, compression = self.image(ctx)
        layer_tmp = ctx.work / "oci-layer.gz"
        try:
            try:
                layer_sha, layer_size, plain_sha = _layer(ctx.plain, layer_tmp, compression.gzip_level)
            except RuntimeError as e:          # lz4: a damaged plain archive
                raise BuildError(f"format {self.name}: {ctx.plain}: {e}") from None
            notes = annotations(meta, plain_sha)
            platform = {"architecture": meta.arch.oci, "os": "linux",
                        **({"variant": meta.arch.oci_variant} if meta.arch.oci_variant else {})}
            config = canonical_json({
                **platform, "created": meta.created_iso, "author": VENDOR,
                "config": {"Env": [PATH_ENV, "container=oci"], "Cmd": ["/sbin/init"], "StopSignal": "SIGRTMIN+3",
                           "Labels": notes},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{plain_sha}"]},
                "history": [{"created": meta.created_iso, "created_by": f"vztt build {meta.name}",
                             "comment": f"lock {meta.lock_digest}"}],
            })
            config_sha = hashlib.sha256(config).hexdigest()
            manifest = canonical_json({
                "schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": f"sha256:{config_sha}", "size": len(config)},
                "layers": [{"mediaType": MT_LAYER_GZIP, "digest": f"sha256:{layer_sha}", "size": layer_size}],
                "annotations": notes,
            })
            manifest_sha = hashlib.sha256(manifest).hexdigest()
            index = canonical_json({
                "schemaVersion": 2, "mediaType": MT_INDEX,
                "manifests": [{"mediaType": MT_MANIFEST, "digest": f"sha256:{manifest_sha}", "size": len(manifest),
                               "platform": platform, "annotations": {**notes, REF_NAME: meta.name}}],
            })
            small = {"oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}), "index.json": index,
                     f"blobs/sha256/{config_sha}": config, f"blobs/sha256/{manifest_sha}": manifest}
            _write_layout(ctx.out, small, f"blobs/sha256/{layer_sha}", layer_tmp, ctx.source_date_epoch)
        finally:
            layer_tmp.unlink(missing_ok=True)
        return ArchiveRecord(file=self.file_name(ctx.name), format=self.name, sha256=sha256_file(ctx.out),
                             size=ctx.out.stat().st_size,
                             details={"compression": f"gzip -{compression.gzip_level}",
                                      "manifest_digest": f"sha256:{manifest_sha}", "diff_id": f"sha256:{plain_sha}",
                                      "ref": meta.name, "host": meta.index_fields()})

    def describe(self, record: ArchiveRecord) -> str:
        return f"{record.size / 1e6:.0f} MB, layer {record.details.get('compression', 'gzip')}"

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith(f".{self.suffix}")

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        return inspect_layout(Path(path), workdir)


def _write_layout(out: Path, small: dict[str, bytes], layer_name: str, layer: Path, epoch: int) -> None:
    with open(out, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(["blobs", "blobs/sha256", layer_name, *small]):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
            if name in ("blobs", "blobs/sha256"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif name == layer_name:
                info.mode, info.size = 0o644, layer.stat().st_size
                with open(layer, "rb") as lf:
                    tar.addfile(info, lf)
            else:
                info.mode, info.size = 0o644, len(small[name])
                tar.addfile(info, io.BytesIO(small[name]))


# --- inspect: every digest the layout names is checked against the bytes ------------------

def _json_member(tf: tarfile.TarFile, name: str, path: Path) -> tuple[dict[str, Any], bytes]:
    try:
        member = tf.getmember(name)
    except KeyError:
        raise ImageFormatError(f"{path}: no {name} in this OCI layout") from None
    f = tf.extractfile(member)
    data = f.read(MAX_JSON + 1) if f else b""
    try:
        doc = json.loads(data)
    except ValueError:
        raise ImageFormatError(f"{path}: {name} is not JSON") from None
    if not isinstance(doc, dict):
        raise ImageFormatError(f"{path}: {name} is not a JSON object")
    return doc, data


def _blob(tf: tarfile.TarFile, descriptor: Any, path: Path, what: str) -> tuple[dict[str, Any], bytes]:
    digest = descriptor.get("digest", "") if isinstance(descriptor, dict) else ""
    m = DIGEST_RE.fullmatch(str(digest))
    if not m:
        raise ImageFormatError(f"{path}: {what}: bad digest {str(digest)[:80]!r}")
    doc, data = _json_member(tf, f"blobs/sha256/{m.group(1)}", path)
    if hashlib.sha256(data).hexdigest() != m.group(1) or len(data) != descriptor.get("size"):
        raise ImageFormatError(f"{path}: {what} does not match its digest or size")
    return doc, data


def inspect_layout(path: Path, workdir: Path) -> Inspection:
    result = Inspection(path=path, format="oci")
    with reading(path, ".oci.tar"), tarfile.open(path, mode="r:") as tf:
        layout, _ = _json_member(tf, "oci-layout", path)
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise ImageFormatError(f"{path}: oci-layout is not an OCI image layout 1.0.0")
        index, _ = _json_member(tf, "index.json", path)
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or len(manifests) != 1:
            raise ImageFormatError(f"{path}: index.json must name one manifest")
        entry = manifests[0]
        manifest, _ = _blob(tf, entry, path, "the manifest")
        config, _ = _blob(tf, manifest.get("config"), path, "the config")
        layers = manifest.get("layers")
        if not isinstance(layers, list) or len(layers) != 1:
            raise ImageFormatError(f"{path}: the manifest must name one layer")
        layer_digest = DIGEST_RE.fullmatch(str(layers[0].get("digest", "")))
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if not layer_digest or len(diff_ids) != 1:
            raise ImageFormatError(f"{path}: bad layer descriptor or diff_ids")
        try:
            layer = tf.getmember(f"blobs/sha256/{layer_digest.group(1)}")
        except KeyError:
            raise ImageFormatError(f"{path}: the layer blob is missing") from None
        gz_sha, tar_sha = hashlib.sha256(), hashlib.sha256()
        raw = tf.extractfile(layer)
        assert raw is not None

        class Tee(io.RawIOBase):           # hashes the gzip and the tar inside as they are read
            def readable(self) -> bool:
                return True

            def readinto(self, buf: Any) -> int:
                data = raw.read(len(buf))      # type: ignore[union-attr]
                gz_sha.update(data)
                buf[:len(data)] = data
                return len(data)

        with gzip.GzipFile(fileobj=io.BufferedReader(Tee(), CHUNK), mode="rb") as gz:
            class TarTee(io.RawIOBase):
                def readable(self) -> bool:
                    return True

                def readinto(self, buf: Any) -> int:
                    data = gz.read(len(buf))
                    tar_sha.update(data)
                    buf[:len(data)] = data
                    return len(data)
            stream = io.BufferedReader(TarTee(), CHUNK)
            with tarfile.open(fileobj=stream, mode="r|") as layer_tar:
                count_tree(((m, layer_tar) for m in layer_tar), result)
            while stream.read(CHUNK):
                pass
    if f"sha256:{gz_sha.hexdigest()}" != layer_digest.group(0):
        raise ImageFormatError(f"{path}: the layer does not match its digest")
    if f"sha256:{tar_sha.hexdigest()}" != diff_ids[0]:
        raise ImageFormatError(f"{path}: the layer's tar does not match the config's diff_id")
    platform = entry.get("platform") or {}
    # podman picks a manifest by the index's platform and runs it by the config's: the two
    # must say the same (a foreign image is run under emulation only when it says so).
    said = {k: config.get(k) for k in ("architecture", "os", "variant") if config.get(k)}
    if platform and {k: v for k, v in platform.items() if k in said or k == "variant"} != said:
        raise ImageFormatError(f"{path}: the index's platform {_platform(platform)} is not the config's "
                               f"{_platform(said)}")
    result.details.update({"architecture": config.get("architecture"), "os": config.get("os"),
                           "variant": config.get("variant"), "platform": _platform(said),
                           "created": config.get("created"), "annotations": manifest.get("annotations") or {},
                           "ref": (entry.get("annotations") or {}).get(REF_NAME),
                           "manifest_digest": entry.get("digest")})
    result.notes.append(f"  image     {result.details['ref']}, {result.details['platform']}, "
                        f"created {config.get('created')}, every digest checked")
    return result


def _platform(p: dict[str, Any]) -> str:
    """os/architecture[/variant], as podman's --platform takes it."""
    return "/".join(str(p.get(k)) for k in ("os", "architecture", "variant") if p.get(k))


FORMAT = OciFormat()
