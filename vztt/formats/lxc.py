"""The lxc format: `rootfs.tar.xz` + `meta.tar.xz`, as LXC's download and local
templates take them (`lxc-create -t download` from a mirror's meta/1.0/index-system,
`lxc-create -t local -- --metadata meta.tar.xz --fstree rootfs.tar.xz`).

rootfs.tar.xz is the plain archive, member for member (formats/tarstream.py),
with /etc/hostname = `LXC_NAME` and a `127.0.1.1 LXC_NAME` line in /etc/hosts:
the template puts the container's name there (meta's `templates` lists both).

meta.tar.xz holds what distrobuilder's image/lxc.go writes:

  config, config-user     `lxc.include = LXC_TEMPLATE_CONFIG/common.conf` (+ userns.conf), `lxc.arch`
  config.1 .. config.4    the same with the distro's own <distro>.common.conf, for LXC 2.x (the
                          templates pick `config.<compat level>` first: 7 for lxc-download, 5 for lxc-local)
  create-message          printed after lxc-create
  expiry                  when an image cache of it goes stale (source date + 30 days)
  excludes-user           the device nodes, which an unprivileged container cannot make
  templates               the files the template personalizes
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from vztt.base.errors import BuildError
from vztt.formats import FormatContext, ImageFormatError, Inspection, Part
from vztt.formats.compress import XzWriter, xz_bytes
from vztt.formats.hostmeta import HostFormat, ImageMeta
from vztt.formats.plain import count_tree, reading, xz_tar_members
from vztt.formats.tarstream import TarStreamError, hosts_with, normalized, plain_stream, rewrite_tar, small_tar
from vztt.store.manifest import ArchivePart, ArchiveRecord
from vztt.store.packages import sha256_file

ROOTFS = Part("lxc.rootfs.tar.xz", "rootfs.tar.xz")
META = Part("lxc.meta.tar.xz", "meta.tar.xz")
PLACEHOLDER = "LXC_NAME"
# The distros that LXC 2.x (lxc-templates) has a <name>.common.conf for.
LEGACY_CONFIG = {"debian": "debian", "ubuntu": "ubuntu", "centos-stream": "centos"}
LEGACY_LEVELS = range(1, 5)          # `config` serves compat level 5 and up (LXC 3+)
TEMPLATED = ("/etc/hostname", "/etc/hosts")
META_REQUIRED = ("config", "config-user", "create-message", "expiry", "templates")


def meta_files(meta: ImageMeta, excludes_user: list[str]) -> dict[str, bytes]:
    """meta.tar.xz's members (names without `./`, as the templates extract them)."""
    arch = f"lxc.arch = {meta.arch.kernel}\n"
    files: dict[str, bytes] = {
        "config": f"lxc.include = LXC_TEMPLATE_CONFIG/common.conf\n{arch}".encode(),
        "config-user": (f"lxc.include = LXC_TEMPLATE_CONFIG/common.conf\n"
                        f"lxc.include = LXC_TEMPLATE_CONFIG/userns.conf\n{arch}").encode(),
    }
    legacy = LEGACY_CONFIG.get(meta.os)
    for level in LEGACY_LEVELS if legacy else ():
        files[f"config.{level}"] = f"lxc.include = LXC_TEMPLATE_CONFIG/{legacy}.common.conf\n{arch}".encode()
        files[f"config-user.{level}"] = (f"lxc.include = LXC_TEMPLATE_CONFIG/{legacy}.common.conf\n"
                                         f"lxc.include = LXC_TEMPLATE_CONFIG/{legacy}.userns.conf\n{arch}").encode()
    files.update({
        "create-message": (f"You just created a {meta.description} container, built by vztt from lock "
                           f"{meta.lock_digest}.\n").encode(),
        "expiry": f"{meta.expiry_epoch}\n".encode(),
        "excludes-user": "".join(f"{p}\n" for p in excludes_user).encode(),
        "templates": "".join(f"{t}\n" for t in TEMPLATED).encode(),
    })
    return files


class LxcFormat(HostFormat):
    """LXC's image: the rootfs and its metadata, both xz'd (multi-threaded, reproducible)."""

    name = "lxc"
    suffix = ROOTFS.suffix
    parts = (ROOTFS, META)
    summary = "LXC image: rootfs.tar.xz + meta.tar.xz (lxc-create -t download / -t local)"
    step = "lxc"
    tools = (("xz", "xz-utils"),)
    shares_files = False        # the LXC index names the build's directory: both files must be in it

    def write(self, ctx: FormatContext) -> ArchiveRecord:
        meta, compression = self.image(ctx)
        rootfs, meta_out = ctx.out_for(ROOTFS), ctx.out_for(META)
        devices: list[str] = []

        def seen(name: str, kind: bytes) -> None:
            if kind in (b"3", b"4"):
                devices.append("./" + name)

        try:
            with XzWriter(rootfs, compression, self.name) as xz, plain_stream(ctx.plain) as src:
                rewrite_tar(src, xz.write, {"etc/hostname": lambda old: f"{PLACEHOLDER}\n".encode(),
                                            "etc/hosts": lambda old: hosts_with(PLACEHOLDER, old)},
                            ctx.source_date_epoch, seen)
        except (TarStreamError, RuntimeError) as e:
            raise BuildError(f"format {self.name}: {ctx.plain}: {e}") from None
        xz_bytes(small_tar(meta_files(meta, sorted(devices)), ctx.source_date_epoch), meta_out, compression,
                 self.name)
        return ArchiveRecord(file=ROOTFS.cache_name(ctx.name), format=self.name, sha256=sha256_file(rootfs),
                             size=rootfs.stat().st_size, tar_size=xz.bytes_in,
                             details={"compression": compression.xz, "host": meta.index_fields()},
                             parts=[ArchivePart(META.cache_name(ctx.name), sha256_file(meta_out),
                                                meta_out.stat().st_size)])

    def describe(self, record: ArchiveRecord) -> str:
        meta = record.parts[0].size if record.parts else 0
        return f"rootfs {record.size / 1e6:.0f} MB + meta {meta} bytes, {record.details.get('compression', 'xz')}"

    def recognizes(self, path: Path) -> bool:
        return path.name.endswith((f".{ROOTFS.suffix}", f".{META.suffix}")) or \
            path.name in (ROOTFS.published, META.published)

    def inspect(self, path: Path, workdir: Path) -> Inspection:
        path = Path(path)
        is_meta = path.name.endswith(f".{META.suffix}") or path.name == META.published
        rootfs, meta = (_sibling(path, META, ROOTFS), path) if is_meta else (path, _sibling(path, ROOTFS, META))
        result = Inspection(path=path, format=self.name)
        if rootfs.is_file():
            hostname: list[bytes] = []

            def visit(member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
                if normalized(member.name) == "etc/hostname" and member.isfile():
                    f = tf.extractfile(member)
                    hostname.append(f.read() if f else b"")
            with reading(rootfs, ".tar.xz"):
                count_tree(xz_tar_members(rootfs), result, visit)
            if hostname != [f"{PLACEHOLDER}\n".encode()]:
                raise ImageFormatError(f"{rootfs}: /etc/hostname is not the {PLACEHOLDER} placeholder "
                                       "LXC's templates fill in")
            result.notes.append(f"  rootfs    {rootfs}")
        if meta.is_file():
            result.details.update(_inspect_meta(meta))
            result.notes.append(f"  meta      {meta}: lxc.arch {result.details['lxc_arch']}, templates "
                                f"{', '.join(result.details['templates'])}, expiry {result.details['expiry']}")
        elif is_meta:
            raise ImageFormatError(f"{path}: no such file")
        return result


def _sibling(path: Path, mine: Part, other: Part) -> Path:
    """The other file of the pair, by the same naming (cache or mirror)."""
    if path.name == mine.published:
        return path.with_name(other.published)
    return path.with_name(path.name[:-len(mine.suffix)] + other.suffix)


def _inspect_meta(path: Path) -> dict[str, object]:
    files: dict[str, bytes] = {}
    with reading(path, ".tar.xz"):
        for member, tf in xz_tar_members(path):
            if member.isfile() and member.size < 1 << 20:
                f = tf.extractfile(member)
                files[member.name] = f.read() if f else b""
    missing = [m for m in META_REQUIRED if m not in files]
    if missing:
        raise ImageFormatError(f"{path}: not LXC image metadata: no {', '.join(missing)}")
    config = files["config"].decode(errors="replace")
    arch = [line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("lxc.arch")]
    if not arch or "lxc.include" not in config:
        raise ImageFormatError(f"{path}: config has no lxc.arch or lxc.include")
    try:
        expiry = int(files["expiry"].decode().strip())
    except ValueError:
        raise ImageFormatError(f"{path}: expiry is not a time") from None
    return {"lxc_arch": arch[0], "templates": files["templates"].decode(errors="replace").split(),
            "expiry": expiry, "meta_members": sorted(files)}


FORMAT = LxcFormat()
