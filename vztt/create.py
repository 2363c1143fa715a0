"""Containers from cached templates: `vztt create NAME DEST`.

Layouts of DEST (made under a temporary name beside it, renamed into place
only when complete; removed on any failure):

  dir     DEST is the container's root tree.
  ext4    DEST/root.img: an ext4 filesystem image of --size (sparse), loop-mountable.
  ploop   DEST/root.hdd/root.hds + DEST/root.hdd/DiskDescriptor.xml (a ploop v2 disk of
          --size with a GPT and ext4, as Virtuozzo 7 keeps a container's private area),
          and DEST/templates/ (the package list). The default for a ploop cache.

Every layout gets a fresh filesystem UUID (ext4, ploop), an empty
/etc/machine-id (systemd makes one at first boot) and, with --hostname,
/etc/hostname and a 127.0.1.1 line in /etc/hosts. Archives are unpacked
through formats.safetar's guard, and the archive's sha256 is checked against
the manifest (or the signed index) on the way.

A template missing from the cache is pulled first. For dir and ext4 the
download streams straight into the unpacking (as `curl | lz4 -d | tar -x`
would), while it is written to the cache and hashed: the container is put in
place, and the archive promoted into the cache, only after size and sha256
matched the signed index.

A ploop layout from a ploop cache is resized and personalized without the ploop
kernel module (formats/ploop/resize.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vztt import formats as formats_registry
from vztt.base import proc
from vztt.base.errors import BadUsage, BuildError, FetchError, RecipeError
from vztt.base.mounts import Mounts, enter_private_namespace, force_cleanup, require_root
from vztt.base.progress import Progress
from vztt.base.space import SLACK, MiB, check_space, free_bytes
from vztt.base.inroot import read_in_root, remove_in_root, write_in_root
from vztt.formats import ploop
from vztt.formats.ploop import resize
from vztt.formats.safetar import UnsafeArchive, extract_lz4, file_chunks
from vztt.mirror import config as mirror_config
from vztt.mirror import pull
from vztt.store.manifest import ArchiveRecord, Manifest
from vztt.store.templates import Entry, TemplateCache, pid_alive

LAYOUTS = ("dir", "ext4", "ploop")
DEFAULT_SIZE = 10 << 30
HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# The tools each layout runs (and the Debian package of each): checked before anything is made.
LAYOUT_TOOLS = {"dir": (), "ext4": (("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs")), "ploop": resize.TOOLS}


class CreateError(BuildError):
    """A container could not be made (exit 6, as an image step): destination taken, a tool failed."""

    kind = "create"


@dataclass
class CreateOptions:
    layout: str | None = None          # None: ploop for a ploop cache, else ext4
    size: int | None = None            # None: the template's disk size, else 10 GiB
    hostname: str | None = None
    mirrors: tuple[str, ...] = ()      # for a template not in the cache (else VZTT_TEMPLATE_MIRRORS, the list file)
    keyrings: tuple[Path, ...] = ()
    offline: bool = False
    build: str | None = None


@dataclass
class CreateResult:
    name: str
    dest: Path
    layout: str
    build: str
    format: str
    size: int | None = None
    fs_uuid: str | None = None
    hostname: str | None = None
    members: int = 0
    pulled: dict[str, Any] | None = None
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["dest"] = str(self.dest)
        return d


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def validate_hostname(hostname: str | None) -> None:
    if hostname is not None and not HOSTNAME_RE.fullmatch(hostname):
        raise BadUsage(f"--hostname {hostname!r}: not a valid host name (letters, digits, '-', dots between labels)")


def personalize(root: Path, hostname: str | None) -> None:
    """Empty machine-id (first boot makes one), the host name; never through a symlink of the tree."""
    write_in_root(root, "etc/machine-id", b"", 0o444)
    data = read_in_root(root, "var/lib/dbus/machine-id")
    if data is not None:                       # a real file (a symlink to /etc/machine-id is fine)
        remove_in_root(root, "var/lib/dbus/machine-id")
    if hostname:
        write_in_root(root, "etc/hostname", f"{hostname}\n".encode())
        hosts = read_in_root(root, "etc/hosts")
        if hosts is not None:
            short = hostname.split(".")[0]
            line = f"127.0.1.1\t{hostname}" + (f" {short}" if short != hostname else "")
            lines = [l for l in hosts.decode(errors="replace").splitlines() if not l.startswith("127.0.1.1")]
            write_in_root(root, "etc/hosts", ("\n".join(lines + [line]) + "\n").encode())


# --------------------------------------------------------------------------
# The destination: made beside DEST, renamed into place when complete
# --------------------------------------------------------------------------

@contextlib.contextmanager
def making(dest: Path) -> Iterator[Path]:
    """A fresh directory to build the container in; renamed to DEST on success,
    removed (with everything mounted below it) on failure or Ctrl-C."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
            raise CreateError(f"{dest}: exists and is not an empty directory")
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(parent, dest.name)
    tmp = parent / f".{dest.name}.vztt-create-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)        # replaces an empty directory, never a populated one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise CreateError(f"{dest}: was created meanwhile (by another process, e.g. a second vztt create); "
                              "it is left as it is, and this container was removed") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    force_cleanup(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        proc.run(["rm", "-rf", "--one-file-system", "--", path], what=f"{path}: rm", inherit_env=False, check=False)


def _clean_stale(parent: Path, name: str) -> None:
    """What a killed `vztt create` of this destination left."""
    for p in parent.glob(f".{name}.vztt-create-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(p)


# --------------------------------------------------------------------------
# Unpacking a plain archive into a root (dir, ext4 image, scratch tree for ploop)
# --------------------------------------------------------------------------

def unpack_plain(chunks: Any, root: Path, rec: ArchiveRecord, what: str, verified_source: bool = False) -> int:
    """Unpack, check the sha256 of what was read against `rec` (the manifest's or index's
    record); a `verified_source` (a mirror download) checks size and sha256 itself."""
    os.chmod(root, 0o755)
    limits = formats_registry.get(rec.format).guard_limits(rec, free_bytes(root) - SLACK)
    res = extract_lz4(chunks, root, limits, what=what, hash_input=not verified_source)
    if res.size != rec.size or (not verified_source and res.sha256 != rec.sha256):
        raise FetchError(f"{what}: sha256 {res.sha256[:16]}... ({res.size} bytes) does not match the "
                         f"{rec.sha256[:16]}... ({rec.size} bytes) it should be; pull it again")
    return res.stats.members


@contextlib.contextmanager
def ext4_image(tmp: Path, work: Path, size: int) -> Iterator[tuple[Path, str]]:
    """DEST/root.img: a new ext4 of `size` (sparse), mounted for the duration; yields (mount point, fs UUID)."""
    img = tmp / "root.img"
    fs_uuid = str(uuid.uuid4())
    with open(img, "wb") as fh:
        fh.truncate(size)
    proc.run(["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-E", "lazy_itable_init=1,nodiscard", img], what="mkfs.ext4",
             error=CreateError, inherit_env=False)
    mounts = Mounts()
    mnt = work / "mnt"
    try:
        try:
            mounts.mount(str(img), mnt, fstype="ext4", options="loop,noatime")
        except BuildError as e:
            raise CreateError(str(e)) from None
        yield mnt, fs_uuid
    finally:
        mounts.unmount_all()
    proc.run(["e2fsck", "-fn", img], what=f"{img}: e2fsck", error=CreateError, inherit_env=False)


# --------------------------------------------------------------------------
# ploop (the disk work itself: formats/ploop/resize.py)
# --------------------------------------------------------------------------

def ploop_from_ploop_cache(archive: Path, rec: ArchiveRecord, tmp: Path, work: Path, size: int,
                           hostname: str | None, progress: Progress) -> tuple[str, int]:
    cache_dir = work / "cache"
    cache_dir.mkdir()
    with progress.step("unpack") as st:
        limits = ploop.FORMAT.guard_limits(rec, free_bytes(work) - SLACK)
        res = extract_lz4(file_chunks(archive), cache_dir, limits, what=str(archive))
        if res.size != rec.size or res.sha256 != rec.sha256:
            raise FetchError(f"{archive}: sha256 does not match the manifest; pull it again")
        hds = cache_dir / ploop.IMAGE_NAME
        if not hds.is_file():
            raise UnsafeArchive(f"{archive}: no {ploop.IMAGE_NAME} in this ploop cache")
        info = ploop.read_image(hds)
        st.note(f"{info.clusters_allocated} clusters of a {info.disk_size >> 30} GiB disk")
    fs_uuid = str(uuid.uuid4())
    raw = work / "disk.raw"
    with progress.step("resize") as st:
        check_space(work, info.clusters_allocated * info.cluster_size * 2, "resizing the ploop disk")
        ploop.read_raw(hds, raw)
        hds.unlink()
        resize.resize_raw(raw, size, CreateError)
        st.note(f"{info.disk_size >> 20} MiB -> {size >> 20} MiB disk, filesystem resized to fill it")
    with progress.step("personalize"):
        with resize.mounted_partition(raw, work / "mnt", size, fs_uuid, CreateError) as root:
            personalize(root, hostname)
    with progress.step("image") as st:
        vzpackages = cache_dir / "templates" / "vzpackages"
        resize.write_private_area(raw, tmp, vzpackages.read_bytes() if vzpackages.is_file() else None)
        st.note("root.hdd/root.hds, DiskDescriptor.xml")
    return fs_uuid, res.stats.members


def ploop_from_plain(archive: Path, rec: ArchiveRecord, manifest: Manifest, tmp: Path, work: Path,
                     size: int, hostname: str | None, progress: Progress) -> tuple[str, int]:
    tree = work / "tree"
    tree.mkdir()
    with progress.step("unpack") as st:
        members = unpack_plain(file_chunks(archive), tree, rec, str(archive))
        personalize(tree, hostname)
        st.note(f"{members} members")
    fs_uuid = str(uuid.uuid4())
    raw = work / "disk.raw"
    with progress.step("disk") as st:
        ploop.make_disk(tree, raw, size, ext4_features="safe", uuid=fs_uuid)
        shutil.rmtree(tree)
        resize.fill_partition(raw, size, CreateError)
        st.note(f"ext4 filling a {size >> 20} MiB disk")
    with progress.step("image"):
        pkgs = manifest.package_rows()
        resize.write_private_area(raw, tmp, ploop.vzpackages_text(pkgs).encode() if pkgs else None)
    return fs_uuid, members


# --------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------

def _layout_for(formats: list[str], layout: str | None) -> tuple[str, str]:
    """(layout, archive format to make it from)."""
    if layout is None:
        layout = "ploop" if "ploop" in formats else "ext4"
    if layout not in LAYOUTS:
        raise RecipeError(f"--layout {layout}: one of {', '.join(LAYOUTS)}")
    for tool, package in LAYOUT_TOOLS[layout]:
        proc.require_tool(tool, package, why=f"vztt create --layout {layout}")
    if layout == "ploop":
        return layout, "ploop" if "ploop" in formats else "plain"
    if "plain" not in formats:
        raise RecipeError(f"--layout {layout} needs the template's plain archive; this one has only "
                          f"{', '.join(formats)} (use --layout ploop)")
    return layout, "plain"


def _size_for(options: CreateOptions, archives: dict[str, ArchiveRecord], layout: str) -> int | None:
    if layout == "dir":
        return None
    ploop_rec = archives.get("ploop")
    size = options.size or (ploop_rec.details.get("disk_size") if ploop_rec else None) or DEFAULT_SIZE
    return _round_up(int(size), MiB)


def _content_estimate(rec: ArchiveRecord) -> int:
    return int(rec.tar_size or rec.size * 3) * 11 // 10


def _index_records(name: str, remote: pull.Remote) -> dict[str, ArchiveRecord]:
    """The archives of a build on a mirror, as the manifest will record them."""
    return {fmt: pull.archive_record(remote, name, fmt) for fmt in remote.build["archives"]}


def create(cache: TemplateCache, name: str, dest: Path, options: CreateOptions,
           progress: Progress | None = None) -> CreateResult:
    progress = progress or Progress(quiet=True)
    started = time.monotonic()
    mirror_config.check_name(name)
    validate_hostname(options.hostname)
    if options.layout is not None and options.layout not in LAYOUTS:
        raise RecipeError(f"--layout {options.layout}: one of {', '.join(LAYOUTS)}")
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CreateError(f"{dest}: exists and is not an empty directory")
    require_root("vztt create")
    enter_private_namespace()           # loop mounts die with us
    cache.clean_stale_work()
    entry = cache.entry(name)
    if entry is not None and options.build and pull.local_build(entry) != options.build:
        entry = None
    if entry is None:
        if options.offline:
            pull.offline_entry(cache, name, options.build)      # raises: not cached
        result = _create_pulling(cache, name, dest, options, progress)
    else:
        result = _create_from_cache(cache, entry, dest, options, progress)
    result.seconds = round(time.monotonic() - started, 3)
    result.steps = dict(progress.timings)
    return result


def _create_from_cache(cache: TemplateCache, entry: Entry, dest: Path, options: CreateOptions,
                       progress: Progress, pulled: dict[str, Any] | None = None) -> CreateResult:
    manifest = entry.manifest
    layout, fmt = _layout_for(formats_registry.ordered(list(manifest.archives)), options.layout)
    rec = manifest.archives[fmt]
    archive = cache.root / rec.file
    size = _size_for(options, manifest.archives, layout)
    result = CreateResult(name=entry.name, dest=dest, layout=layout, build=pull.local_build(entry) or "",
                          format=fmt, size=size, hostname=options.hostname, pulled=pulled)
    need = _content_estimate(rec)
    if size is not None and layout == "ext4" and size < need:
        raise RecipeError(f"--size {size >> 20} MiB is too small for {entry.name} (about {need >> 20} MiB of files)")
    check_space(dest.parent, need if fmt == "plain" else rec.size * 4, f"a {layout} container of {entry.name}")
    with making(dest) as tmp, cache.scratch("create") as work:
        if layout == "dir":
            with progress.step("unpack") as st:
                result.members = unpack_plain(file_chunks(archive), tmp, rec, str(archive))
                personalize(tmp, options.hostname)
                st.note(f"{result.members} members, sha256 ok")
        elif layout == "ext4":
            assert size is not None
            with progress.step("unpack") as st:
                with ext4_image(tmp, work, size) as (mnt, fs_uuid):
                    result.members = unpack_plain(file_chunks(archive), mnt, rec, str(archive))
                    personalize(mnt, options.hostname)
                result.fs_uuid = fs_uuid
                st.note(f"{result.members} members into a {size >> 20} MiB ext4 image")
        else:
            assert size is not None
            if fmt == "ploop":
                result.fs_uuid, result.members = ploop_from_ploop_cache(archive, rec, tmp, work, size,
                                                                        options.hostname, progress)
            else:
                result.fs_uuid, result.members = ploop_from_plain(archive, rec, manifest, tmp, work, size,
                                                                  options.hostname, progress)
    return result


def _create_pulling(cache: TemplateCache, name: str, dest: Path, options: CreateOptions,
                    progress: Progress) -> CreateResult:
    """Not cached: pull it, streaming into the container for dir and ext4 layouts."""
    mirrors = mirror_config.mirror_list(options.mirrors)
    keyring = mirror_config.keyring_for(options.keyrings)
    with cache.building(name, timeout=pull.LOCK_WAIT, on_wait=pull.waiting_for(progress, name)):
        entry = cache.entry(name)           # another process may have pulled it while we waited
        if entry is not None and (not options.build or pull.local_build(entry) == options.build):
            return _create_from_cache(cache, entry, dest, options, progress)

        def attempt(source: pull.Source, _failed: list[str]) -> CreateResult:
            with progress.step("index") as st:
                remote = pull.find_build(source, name, keyring, cache, options.build)
                st.note(f"{source.label}: {name} {remote.id}, signed by {remote.signer.fingerprint}")
            formats = formats_registry.ordered(list(remote.build["archives"]))
            layout, fmt = _layout_for(formats, options.layout)
            pulled = {"mirror": source.label, "build": remote.id, "signer": remote.signer.fingerprint}
            if layout == "ploop":
                # The disk conversion needs the whole archive first: pull, then create from the cache.
                pull.check_space_for(remote, cache, [fmt])
                with progress.step("download") as st:
                    part = pull.download(remote, cache, fmt)
                    size = remote.build["archives"][fmt]["size"]
                    st.note(f"{fmt}: {size / 1e6:.1f} MB, sha256 ok, archive checked")
                with progress.step("install"):
                    entry = pull.install(cache, name, remote, {fmt: part})
                return _create_from_cache(cache, entry, dest, options, progress, pulled)
            return _stream_create(cache, name, dest, options, progress, remote, layout, pulled)

        return pull.from_first_mirror(name, mirrors, progress, attempt)


def _stream_create(cache: TemplateCache, name: str, dest: Path, options: CreateOptions, progress: Progress,
                   remote: pull.Remote, layout: str, pulled: dict[str, Any]) -> CreateResult:
    records = _index_records(name, remote)
    rec = records["plain"]
    path = remote.build["archives"]["plain"]["path"]
    where = remote.source.where(path)
    size = _size_for(options, records, layout)
    result = CreateResult(name=name, dest=dest, layout=layout, build=remote.id, format="plain", size=size,
                          hostname=options.hostname, pulled=pulled)
    need = _content_estimate(rec)
    if size is not None and size < need:
        raise RecipeError(f"--size {size >> 20} MiB is too small for {name} (about {need >> 20} MiB of files)")
    check_space(dest.parent, need, f"a {layout} container of {name}")
    check_space(cache.root, rec.size, f"the {name} archive in the cache")
    part = pull.part_path(cache, rec.sha256)
    chunks = remote.source.chunks(path, part, rec.size, rec.sha256)
    try:
        with making(dest) as tmp, cache.scratch("create") as work:
            with progress.step("pull+unpack") as st:
                if layout == "dir":
                    result.members = unpack_plain(chunks, tmp, rec, where, True)
                    personalize(tmp, options.hostname)
                else:
                    assert size is not None
                    with ext4_image(tmp, work, size) as (mnt, fs_uuid):
                        result.members = unpack_plain(chunks, mnt, rec, where, True)
                        personalize(mnt, options.hostname)
                    result.fs_uuid = fs_uuid
                if chunks.gi_frame is not None:          # the download's own size and sha256 check never ran
                    raise FetchError(f"{where}: the download did not complete")
                st.note(f"{rec.size / 1e6:.1f} MB, {result.members} members, sha256 ok"
                        + (f", resumed {remote.source.resumed}x" if remote.source.resumed else ""))
            with progress.step("install"):        # the verified archive into the cache; then DEST goes in place
                pull.install(cache, name, remote, {"plain": part})
    except UnsafeArchive:
        chunks.close()
        part.unlink(missing_ok=True)              # a refused archive is never resumed
        raise
    finally:
        chunks.close()
    return result
