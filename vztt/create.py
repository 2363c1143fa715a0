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
through vztt.safetar's guard, and the archive's sha256 is checked against
the manifest (or the signed index) on the way.

A template missing from the cache is pulled first. For dir and ext4 the
download streams straight into the unpacking (as `curl | lz4 -d | tar -x`
would), while it is written to the cache and hashed: the container is put in
place, and the archive promoted into the cache, only after size and sha256
matched the signed index.

Resizing a ploop disk without the ploop kernel module: the image is expanded
to a sparse raw disk (only its allocated clusters are written), the GPT is
rewritten for the new size (new disk and partition GUIDs, partition 1 from
1 MiB to one cluster before the end, as ploop lays it out), the filesystem is
checked (e2fsck -f) and resized with resize2fs to fill the partition, given
a new UUID with tune2fs, personalized through a loop mount at the partition's
offset, and converted back into a ploop v2 image with a new
DiskDescriptor.xml. Debian's `ploop check` and `qemu-img` accept the result.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vztt.mirror import config as mirror_config
from vztt.mirror import pull

from vztt.formats.ploop import image as ploop
from vztt.store.templates import Entry, TemplateCache, pid_alive
from vztt.base.errors import BuildError, EnvironmentProblem, FetchError, RecipeError
from vztt.base.mounts import Mounts, enter_private_namespace, require_root
from vztt.base.progress import Progress
from vztt.formats.safetar import Limits, UnsafeArchive, extract_lz4, file_chunks, read_in_root, remove_in_root, write_in_root
from vztt import formats as formats_registry

LAYOUTS = ("dir", "ext4", "ploop")
DEFAULT_SIZE = 10 << 30
HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
MiB = 1 << 20
SLACK = 64 * MiB              # beyond the estimate, in every free-space check
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


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

def _run(argv: list[str], what: str, ok: tuple[int, ...] = (0,), input: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=TOOL_ENV, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise EnvironmentProblem(f"{what}: {argv[0]} is not installed") from None
    if proc.returncode not in ok:
        lines = [l.strip() for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
        raise CreateError(f"{what}: {' | '.join(lines[-2:])[:400] or f'exit status {proc.returncode}'}")
    return proc.stdout


def _free(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def check_space(where: Path, need: int, what: str) -> None:
    free = _free(where)
    if free < need + SLACK:
        raise EnvironmentProblem(f"{where}: {free / 1e6:.0f} MB free, {what} needs about "
                                 f"{(need + SLACK) / 1e6:.0f} MB")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def check_hostname(hostname: str | None) -> None:
    if hostname is not None and not HOSTNAME_RE.fullmatch(hostname):
        raise RecipeError(f"--hostname {hostname!r}: not a valid host name (letters, digits, '-', dots between labels)")


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
        os.rename(tmp, dest)        # replaces an empty directory, never a populated one
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    from vztt.base.mounts import force_cleanup
    force_cleanup(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True)


def _clean_stale(parent: Path, name: str) -> None:
    """What a killed `vztt create` of this destination left."""
    for p in parent.glob(f".{name}.vztt-create-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(p)


@contextlib.contextmanager
def work_dir(cache: TemplateCache) -> Iterator[Path]:
    """Scratch space under <cache>/.work (cleaned by the next vztt run if we are killed)."""
    d = cache.root / ".work" / f"create.{os.getpid()}"
    _remove(d)
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        _remove(d)


# --------------------------------------------------------------------------
# Unpacking a plain archive into a root (dir, ext4 image, scratch tree for ploop)
# --------------------------------------------------------------------------

def plain_limits(archive_rec: dict[str, Any], where: Path) -> Limits:
    tar_size = archive_rec.get("tar_size")
    bound = int(tar_size) if tar_size else max(_free(where) - SLACK, 0)
    return Limits(max_bytes=bound)


def unpack_plain(chunks: Any, root: Path, rec: dict[str, Any], what: str, verified_source: bool = False) -> int:
    """Unpack, check the sha256 of what was read against `rec` (the manifest's or index's
    record); a `verified_source` (a mirror download) checks size and sha256 itself."""
    os.chmod(root, 0o755)
    res = extract_lz4(chunks, root, plain_limits(rec, root), what=what, hash_input=not verified_source)
    if res.size != rec["size"] or (not verified_source and res.sha256 != rec["sha256"]):
        raise FetchError(f"{what}: sha256 {res.sha256[:16]}... ({res.size} bytes) does not match the "
                         f"{rec['sha256'][:16]}... ({rec['size']} bytes) it should be; pull it again")
    return res.stats.members


@contextlib.contextmanager
def ext4_image(tmp: Path, work: Path, size: int) -> Iterator[tuple[Path, str]]:
    """DEST/root.img: a new ext4 of `size` (sparse), mounted for the duration; yields (mount point, fs UUID)."""
    img = tmp / "root.img"
    fs_uuid = str(uuid.uuid4())
    with open(img, "wb") as fh:
        fh.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", "-U", fs_uuid, "-E", "lazy_itable_init=1,nodiscard", str(img)], "mkfs.ext4")
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
    _run(["e2fsck", "-fn", str(img)], f"{img}: e2fsck")


# --------------------------------------------------------------------------
# ploop
# --------------------------------------------------------------------------

def ploop_partition(disk_size: int) -> tuple[int, int]:
    """(last sector, bytes) of partition 1 on a ploop disk of `disk_size`, as ploop lays it out."""
    block = ploop.DEFAULT_CLUSTER // ploop.SECTOR
    end_excl = (disk_size // ploop.SECTOR - block) // block * block
    if end_excl <= ploop.PARTITION_START + block:
        raise CreateError(f"a ploop disk of {disk_size} bytes is too small")
    return end_excl - 1, (end_excl - ploop.PARTITION_START) * ploop.SECTOR


@contextlib.contextmanager
def partition_device(raw: Path, disk_size: int) -> Iterator[str]:
    """Partition 1 of a raw ploop disk as a loop device, for e2fsprogs and mount.
    (resize2fs on `file?offset=` sizes the file as if the filesystem started at 0.)
    A killed run leaves it to the next run's stale-work cleanup, which detaches
    loop devices backed by files under <cache>/.work."""
    _, part_bytes = ploop_partition(disk_size)
    dev = _run(["losetup", "--find", "--show", "--offset", str(ploop.PARTITION_START * ploop.SECTOR),
                "--sizelimit", str(part_bytes), str(raw)], f"{raw}: losetup").strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


def resize_raw(raw: Path, disk_size: int) -> None:
    """Grow (or shrink) a raw ploop disk to `disk_size`: GPT rewritten (new GUIDs),
    ext4 checked and resized to fill partition 1."""
    part_end, part_bytes = ploop_partition(disk_size)
    blocks = str(part_bytes // ploop.FS_BLOCK)
    current = os.stat(raw).st_size
    if disk_size < current:                   # shrink the filesystem while the old partition still holds it
        with partition_device(raw, current) as dev:
            _run(["e2fsck", "-f", "-y", dev], f"{raw}: e2fsck", ok=(0, 1))
            _run(["resize2fs", dev, blocks], f"{raw}: resize2fs (shrink to {disk_size >> 20} MiB)")
    with open(raw, "r+b") as fh:
        fh.truncate(disk_size)
    script = ploop._gpt_script(str(uuid.uuid4()), str(uuid.uuid4()), part_end)
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", "--wipe", "never", "--wipe-partitions", "never",
          str(raw)], f"{raw}: sfdisk", input=script)
    if disk_size >= current:
        with partition_device(raw, disk_size) as dev:
            _run(["e2fsck", "-f", "-y", dev], f"{raw}: e2fsck", ok=(0, 1))
            _run(["resize2fs", dev, blocks], f"{raw}: resize2fs")


def personalize_partition(raw: Path, work: Path, disk_size: int, fs_uuid: str, hostname: str | None) -> None:
    """A new filesystem UUID, then machine-id and host name, through a mount of partition 1."""
    with partition_device(raw, disk_size) as dev:
        _run(["tune2fs", "-U", fs_uuid, dev], f"{raw}: tune2fs -U")
        mounts = Mounts()
        try:
            try:
                mounts.mount(dev, work / "mnt", fstype="ext4", options="noatime")
            except BuildError as e:
                raise CreateError(str(e)) from None
            personalize(work / "mnt", hostname)
        finally:
            mounts.unmount_all()


def finish_ploop(raw: Path, tmp: Path, work: Path, disk_size: int, hostname: str | None,
                 vzpackages: bytes | None) -> None:
    """raw disk (resized, personalized) -> DEST/root.hdd/{root.hds, DiskDescriptor.xml}."""
    hdd = tmp / "root.hdd"
    hdd.mkdir(exist_ok=True)
    hds = hdd / ploop.IMAGE_NAME
    ploop.write_image(raw, hds)
    raw.unlink()
    info = ploop.read_image(hds)
    (hdd / ploop.DESCRIPTOR_NAME).write_text(ploop.descriptor_for(info))
    os.chmod(hds, 0o600)
    if vzpackages is not None:
        (tmp / "templates").mkdir(exist_ok=True)
        (tmp / "templates" / "vzpackages").write_bytes(vzpackages)


def _ploop_member(path: str, kind: str) -> bool:
    return (path in (ploop.IMAGE_NAME, ploop.DESCRIPTOR_NAME, "templates") and kind == ("dir" if path == "templates" else "file")) \
        or (path.startswith("templates/") and path.count("/") <= 2 and kind in ("file", "dir"))


def ploop_from_ploop_cache(archive: Path, rec: dict[str, Any], tmp: Path, work: Path, size: int,
                           hostname: str | None, progress: Progress) -> tuple[str, int]:
    cache_dir = work / "cache"
    cache_dir.mkdir()
    with progress.step("unpack") as st:
        limits = Limits(max_bytes=max(_free(work) - SLACK, 0), max_members=64,
                        types=frozenset({"file", "dir"}), allow=_ploop_member)
        res = extract_lz4(file_chunks(archive), cache_dir, limits, what=str(archive))
        if res.size != rec["size"] or res.sha256 != rec["sha256"]:
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
        resize_raw(raw, size)
        st.note(f"{info.disk_size >> 20} MiB -> {size >> 20} MiB disk, filesystem resized to fill it")
    with progress.step("personalize"):
        personalize_partition(raw, work, size, fs_uuid, hostname)
    with progress.step("image") as st:
        vzpackages = cache_dir / "templates" / "vzpackages"
        finish_ploop(raw, tmp, work, size, hostname, vzpackages.read_bytes() if vzpackages.is_file() else None)
        st.note("root.hdd/root.hds, DiskDescriptor.xml")
    return fs_uuid, res.stats.members


def ploop_from_plain(archive: Path, rec: dict[str, Any], manifest: dict[str, Any], tmp: Path, work: Path,
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
        layout = ploop.make_disk(tree, raw, size, ext4_features="safe", uuid=fs_uuid)
        shutil.rmtree(tree)
        with partition_device(raw, size) as dev:
            _run(["e2fsck", "-f", "-y", dev], f"{raw}: e2fsck", ok=(0, 1))
            _run(["resize2fs", dev, str(layout.partition_size // ploop.FS_BLOCK)], f"{raw}: resize2fs")
        st.note(f"ext4 filling a {size >> 20} MiB disk")
    with progress.step("image"):
        pkgs = [(p["name"], p["arch"], p["version"]) for p in manifest.get("packages", [])]
        finish_ploop(raw, tmp, work, size, hostname, ploop.vzpackages_text(pkgs).encode() if pkgs else None)
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
    if layout == "ploop":
        return layout, "ploop" if "ploop" in formats else "plain"
    if "plain" not in formats:
        raise RecipeError(f"--layout {layout} needs the template's plain archive; this one has only "
                          f"{', '.join(formats)} (use --layout ploop)")
    return layout, "plain"


def _size_for(options: CreateOptions, manifest: dict[str, Any], layout: str) -> int | None:
    if layout == "dir":
        return None
    size = options.size or (manifest.get("archives", {}).get("ploop", {}).get("disk_size")) or DEFAULT_SIZE
    return _round_up(int(size), MiB)


def _content_estimate(rec: dict[str, Any]) -> int:
    return int(rec.get("tar_size") or rec["size"] * 3) * 11 // 10


def create(cache: TemplateCache, name: str, dest: Path, options: CreateOptions,
           progress: Progress | None = None) -> CreateResult:
    progress = progress or Progress(quiet=True)
    started = time.monotonic()
    mirror_config.check_name(name)
    check_hostname(options.hostname)
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
    manifest = entry.data
    archives = manifest.get("archives") or {manifest["archive"].get("format", "plain"): manifest["archive"]}
    layout, fmt = _layout_for(formats_registry.ordered(list(archives)), options.layout)
    rec = archives[fmt]
    archive = cache.root / rec["file"]
    size = _size_for(options, manifest, layout)
    result = CreateResult(name=entry.name, dest=dest, layout=layout, build=pull.local_build(entry) or "",
                          format=fmt, size=size, hostname=options.hostname, pulled=pulled)
    need = _content_estimate(rec)
    if size is not None and layout == "ext4" and size < need:
        raise RecipeError(f"--size {size >> 20} MiB is too small for {entry.name} (about {need >> 20} MiB of files)")
    check_space(dest.parent, need if fmt == "plain" else rec["size"] * 4, f"a {layout} container of {entry.name}")
    with making(dest) as tmp, work_dir(cache) as work:
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
    with cache.building(name, timeout=pull.LOCK_WAIT):
        entry = cache.entry(name)           # another process may have pulled it while we waited
        if entry is not None and (not options.build or pull.local_build(entry) == options.build):
            return _create_from_cache(cache, entry, dest, options, progress)

        def attempt(source: pull.Source, _failed: list[str]) -> CreateResult:
            with progress.step("index") as st:
                remote = pull.find_build(source, name, keyring, options.build)
                st.note(f"{source.label}: {name} {remote.id}, signed by {remote.signer.fingerprint}")
            formats = formats_registry.ordered(list(remote.build["archives"]))
            layout, fmt = _layout_for(formats, options.layout)
            pulled = {"mirror": source.label, "build": remote.id, "signer": remote.signer.fingerprint}
            if layout == "ploop":
                # The disk conversion needs the whole archive first: pull, then create from the cache.
                with progress.step("download") as st:
                    part = pull.download(remote, cache, fmt)
                    st.note(f"{fmt}: {remote.build['archives'][fmt]['size'] / 1e6:.1f} MB, sha256 ok")
                with progress.step("install"):
                    entry = pull.install(cache, name, remote, {fmt: part})
                return _create_from_cache(cache, entry, dest, options, progress, pulled)
            return _stream_create(cache, name, dest, options, progress, remote, layout, pulled)

        return pull.from_first_mirror(name, mirrors, progress, attempt)


def _stream_create(cache: TemplateCache, name: str, dest: Path, options: CreateOptions, progress: Progress,
                   remote: pull.Remote, layout: str, pulled: dict[str, Any]) -> CreateResult:
    rec = remote.build["archives"]["plain"]
    size = _size_for(options, {"archives": remote.build["archives"]}, layout)
    result = CreateResult(name=name, dest=dest, layout=layout, build=remote.id, format="plain", size=size,
                          hostname=options.hostname, pulled=pulled)
    need = _content_estimate(rec)
    if size is not None and size < need:
        raise RecipeError(f"--size {size >> 20} MiB is too small for {name} (about {need >> 20} MiB of files)")
    check_space(dest.parent, need, f"a {layout} container of {name}")
    check_space(cache.root, rec["size"], f"the {name} archive in the cache")
    part = pull.part_path(cache, rec["sha256"])
    chunks = remote.source.chunks(rec["path"], part, rec["size"], rec["sha256"])
    try:
        with making(dest) as tmp, work_dir(cache) as work:
            with progress.step("pull+unpack") as st:
                if layout == "dir":
                    result.members = unpack_plain(chunks, tmp, rec, remote.source.where(rec["path"]), True)
                    personalize(tmp, options.hostname)
                else:
                    assert size is not None
                    with ext4_image(tmp, work, size) as (mnt, fs_uuid):
                        result.members = unpack_plain(chunks, mnt, rec, remote.source.where(rec["path"]), True)
                        personalize(mnt, options.hostname)
                    result.fs_uuid = fs_uuid
                if chunks.gi_frame is not None:          # the download's own size and sha256 check never ran
                    raise FetchError(f"{remote.source.where(rec['path'])}: the download did not complete")
                st.note(f"{rec['size'] / 1e6:.1f} MB, {result.members} members, sha256 ok"
                        + (f", resumed {remote.source.resumed}x" if remote.source.resumed else ""))
            with progress.step("install"):        # the verified archive into the cache; then DEST goes in place
                pull.install(cache, name, remote, {"plain": part})
    finally:
        chunks.close()
    return result
