"""The simplestreams index Incus and LXD read from a mirror (`incus remote add NAME
https://MIRROR --protocol simplestreams`): streams/v1/index.json and images.json,
made from the mirror's index.json.

How Incus reads it (shared/simplestreams in Incus's source): index entries of
datatype `image-downloads` whose `products` list is not empty; per product
version, an item of ftype `incus.tar.xz` (LXD: `lxd.tar.xz`) carrying
`combined_squashfs_sha256`, and a root item of ftype `squashfs` beside it; the
image's fingerprint is that combined sha256; the version's name starts with its
date (YYYYMMDD). One metadata file serves both: its templates use
`container.name`, which both give.

    products: "<os>:<release>:<variant>:<arch>" (as incus-simplestreams names them)
      aliases   "<os>/<release>/<variant>" for the release and its name (debian/12/minimal,
                debian/bookworm/minimal), plus "<os>/<release>" for variant `default`
      versions  one per build on the mirror, by build id (YYYYmmddTHHMMSSZ-<lock>)
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from vztt.mirror.index import Index

STREAMS_INDEX = "streams/v1/index.json"
STREAMS_IMAGES = "streams/v1/images.json"
FORMAT = "incus"
META_FTYPES = ("incus.tar.xz", "lxd.tar.xz")       # Incus's, LXD's name for the metadata item
ROOT_FTYPE = "squashfs"


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _aliases(host: dict[str, Any]) -> str:
    names = []
    for release in host["releases"]:
        names.append(f"{host['os']}/{release}/{host['variant']}")
        if host["variant"] == "default":
            names.append(f"{host['os']}/{release}")
    return ",".join(names)


def products(index: Index) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for template in index["templates"].values():
        for build in template["builds"]:
            rec = build["archives"].get(FORMAT)
            if rec is None or not rec.get("parts") or not isinstance(rec.get("host"), dict):
                continue
            host, meta = rec["host"], rec["parts"][0]
            key = f"{host['os']}:{host['release']}:{host['variant']}:{host['arch']}"
            product = out.setdefault(key, {
                "aliases": _aliases(host), "arch": host["arch"], "os": host["os"], "release": host["release"],
                "release_title": host["releases"][-1], "variant": host["variant"], "versions": {}})
            meta_item = {"path": meta["path"], "sha256": meta["sha256"], "size": meta["size"],
                         "combined_squashfs_sha256": rec.get("combined_sha256", "")}
            product["versions"][build["id"]] = {
                "items": {**{ftype: {**meta_item, "ftype": ftype} for ftype in META_FTYPES},
                          ROOT_FTYPE: {"ftype": ROOT_FTYPE, "path": rec["path"], "sha256": rec["sha256"],
                                       "size": rec["size"]}},
                "label": "vztt", "pubname": f"{host['description']} ({build['id']})"}
    return out


def streams(index: Index) -> dict[str, bytes]:
    """path -> bytes of both streams files. `updated` is the newest build's time, not the
    clock: the same index gives the same files."""
    found = products(index)
    created = [b.get("created") or "" for t in index["templates"].values() for b in t["builds"]
               if b["archives"].get(FORMAT)]
    newest = max((datetime.fromisoformat(c) for c in created if c), default=datetime(1970, 1, 1, tzinfo=timezone.utc))
    updated = format_datetime(newest.astimezone(timezone.utc), usegmt=True)
    images = {"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
              "updated": updated, "products": found}
    streams_index = {"format": "index:1.0", "updated": updated, "index": {"images": {
        "datatype": "image-downloads", "path": STREAMS_IMAGES, "format": "products:1.0", "updated": updated,
        "products": sorted(found)}}}
    return {STREAMS_IMAGES: _json(images), STREAMS_INDEX: _json(streams_index)}
