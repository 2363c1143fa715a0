"""What the other hosts' formats say about an image: architecture names, os, release,
variant, serial, description. One table, one place.

Each host names an architecture its own way; `HOST_ARCH` maps the recipe's
`arch` (vztt's naming, recipe/settings.py's ARCHES) to all of them. A new
architecture is one row here.

The image's identity on the other hosts:

  os        the recipe's distro (debian, ubuntu, almalinux...)
  release   the recipe's version (12, 22.04, 9); the release name (bookworm)
            is an alias where the distro has one (LXC index line, Incus alias)
  variant   what the template name says after <distro>-<version>-<arch>-
            (debian-12-x86_64-minimal: minimal), else `default`
  serial    the lock's source date, YYYYMMDD_HHMM (UTC): inside the artifacts,
            so the same lock gives the same bytes (a mirror's indexes name
            builds by their build id instead)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from vztt.base.errors import BuildError
from vztt.formats import Format, FormatContext
from vztt.formats.compress import Compression


@dataclass(frozen=True)
class HostArch:
    kernel: str          # uname -m: LXC's lxc.arch, Incus metadata.yaml's architecture
    debian: str          # Debian's name: LXC's image index, simplestreams products, Incus properties
    oci: str             # OCI's (Go's GOARCH): image config, index platform
    oci_variant: str = ""   # OCI platform variant (arm64: v8)


# The recipe's arch -> each host's name for it.
HOST_ARCH: dict[str, HostArch] = {
    "x86_64": HostArch(kernel="x86_64", debian="amd64", oci="amd64"),
    # OCI's platform for arm64 carries variant v8 (the image spec's table; podman and
    # containerd normalize arm64 to arm64/v8 and match it when pulling `--arch arm64`).
    "aarch64": HostArch(kernel="aarch64", debian="arm64", oci="arm64", oci_variant="v8"),
}

# Names that go into index lines and file names: nothing a host's parser splits on.
TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")
EXPIRY_DAYS = 30          # LXC `expiry`, Incus `expiry_date`: distrobuilder's default
VENDOR = "vztt"


def host_arch(arch: str, fmt: str) -> HostArch:
    try:
        return HOST_ARCH[arch]
    except KeyError:
        raise BuildError(f"format {fmt}: no host names for architecture {arch!r} "
                         f"(vztt/formats/hostmeta.py HOST_ARCH has {', '.join(HOST_ARCH)})") from None


def variant_of(name: str, distro: str, version: str, arch: str) -> str:
    prefix = f"{distro}-{version}-{arch}-"
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return rest if TOKEN_RE.fullmatch(rest) else "default"


@dataclass(frozen=True)
class ImageMeta:
    name: str                  # the template name: file names, OCI ref.name
    os: str
    release: str               # the version (12)
    codename: str              # the release name (bookworm), "" if it is the version
    variant: str
    arch: HostArch
    summary: str               # the recipe's summary
    source_date_epoch: int
    lock_digest: str           # sha256:...

    @classmethod
    def from_settings(cls, name: str, settings: dict[str, Any], source_date_epoch: int, lock_digest: str,
                      fmt: str) -> "ImageMeta":
        distro, version = str(settings.get("distro") or ""), str(settings.get("version") or "")
        codename = str(settings.get("release") or "")
        arch = str(settings.get("arch") or "")
        meta = cls(name=name, os=distro, release=version, codename="" if codename == version else codename,
                   variant=variant_of(name, distro, version, arch), arch=host_arch(arch, fmt),
                   summary=str(settings.get("summary") or name), source_date_epoch=source_date_epoch,
                   lock_digest=lock_digest)
        for what, value in (("distro", meta.os), ("version", meta.release), ("release", meta.codename or "x")):
            if not TOKEN_RE.fullmatch(value):
                raise BuildError(f"format {fmt}: recipe {what} {value!r} cannot name an image for other hosts "
                                 "(letters, digits and . _ + ~ - only)")
        return meta

    @property
    def serial(self) -> str:
        return time.strftime("%Y%m%d_%H%M", time.gmtime(self.source_date_epoch))

    @property
    def created_iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.source_date_epoch))

    @property
    def expiry_epoch(self) -> int:
        return self.source_date_epoch + EXPIRY_DAYS * 86400

    @property
    def lock_sha256(self) -> str:
        return self.lock_digest.removeprefix("sha256:")

    @property
    def description(self) -> str:
        return f"{self.summary} ({self.serial})"

    @property
    def releases(self) -> list[str]:
        """The release and its name, each of which a host may ask for."""
        return [self.release, *([self.codename] if self.codename else [])]

    def index_fields(self) -> dict[str, Any]:
        """What a mirror's host indexes need of the image (kept in the archive record as
        `host`, copied into the mirror's index.json)."""
        return {"os": self.os, "release": self.release, "releases": self.releases, "variant": self.variant,
                "arch": self.arch.debian, "description": self.summary}


class HostFormat(Format):
    """A format for another host: before a build, the recipe must name an image those
    hosts can take (an architecture in HOST_ARCH, plain names) as well as the tools be here."""

    def preflight(self, template: str, settings: dict[str, Any]) -> None:
        super().preflight(template, settings)
        ImageMeta.from_settings(template, settings, 0, "", self.name)

    def image(self, ctx: FormatContext) -> tuple[ImageMeta, Compression]:
        """What every host format is written from: the image's names, the compression level
        (and the plain archive, ctx.plain, written before it)."""
        assert ctx.plain is not None, "made from the plain archive"
        return (ImageMeta.from_settings(ctx.name, ctx.settings, ctx.source_date_epoch, ctx.lock_digest, self.name),
                Compression.from_settings(ctx.settings))
