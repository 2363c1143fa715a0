"""The pipeline, in the order the data flows:
recipe -> lock -> packages -> image -> formats -> cache (boot-tested before promote).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vztt import __version__
from vztt import formats as formats_registry
from vztt.backend import Backend, InstalledPackage, PackageInfo, backend_for
from vztt.builder.gate import gate
from vztt.base import emulation
from vztt.base.errors import BuildError, ResolveError
from vztt.base.files import atomic_write
from vztt.base.mounts import enter_private_namespace, require_root
from vztt.base.proc import Log, mark_children
from vztt.base.progress import Progress
from vztt.boot import test as boottest
from vztt.builder import layer as layers
from vztt.builder.customize import clean_root, run_hooks, write_files
from vztt.builder.fetch import Fetcher
from vztt.builder.image import BuildImage
from vztt.formats import AppCache, FormatContext
from vztt.recipe.lock import Lock, LockDiff, diff
from vztt.recipe.recipe import Recipe
from vztt.recipe.variables import Mirrors
from vztt.store.manifest import ArchiveRecord, Manifest, PackageRecord
from vztt.store import sbom
from vztt.store.packages import PackageCache
from vztt.store.templates import Entry, TemplateCache


@dataclass
class BuildOptions:
    locked: bool = False            # install the lock as it is; never re-resolve
    lock_path: Path | None = None   # default: <cache>/locks/<name>.lock.json
    jobs: int = 8                   # parallel downloads
    test: bool = True               # boot-test the packed archive before promote (--no-test)
    format: str | None = None       # a format, all, or a list (plain,lxc); None: the recipe's setting
    wait: float = 0                 # seconds to wait for another build of the same template


@dataclass
class ResolveResult:
    lock: Lock
    lock_path: Path
    diff: LockDiff
    previous: Lock | None


@dataclass
class BuildResult:
    name: str
    archive: Path
    manifest_path: Path
    manifest: Manifest
    log: Path
    fetch: dict[str, int] = field(default_factory=dict)    # this build's downloads: cached/downloaded/bytes
    removed: list[str] = field(default_factory=list)       # cached files of formats this build dropped


def _backend(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, log: Log) -> Backend:
    return backend_for(recipe, mirrors, cache.state_dir(recipe.name), log, cache.shared_state_dir)


def resolve(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, lock_path: Path | None = None,
            progress: Progress | None = None, log: Log | None = None) -> ResolveResult:
    """Resolve with the distro's solver and write the lock; report what changed."""
    progress = progress or Progress(quiet=True)
    lock_path = lock_path or cache.lock_file(recipe.name)
    own_log = log is None
    log = log or cache.new_log(recipe.name, "resolve")
    try:
        with progress.step("resolve") as st:
            previous = None
            if lock_path.exists():
                try:
                    previous = Lock.read(lock_path)
                except ResolveError:
                    previous = None      # unreadable old lock: replaced, reported as all new
            backend = _backend(recipe, cache, mirrors, log)
            if recipe.base_template:
                # A layer: the solver starts from the base build's installed packages.
                with cache.scratch(f"{recipe.name}.base") as scratch:
                    entry = layers.base_entry(recipe, cache)
                    lock = backend.resolve(layers.base_system(cache, entry, backend.package_db, scratch))
            else:
                lock = backend.resolve()
            lock.write(lock_path)
            d = diff(previous, lock)
            st.note(f"{len(lock.packages)} packages, {len(d.added)} added, {len(d.removed)} removed, "
                    f"{len(d.changed)} changed")
        return ResolveResult(lock=lock, lock_path=lock_path, diff=d, previous=previous)
    finally:
        if own_log:
            log.close()


def unchanged_lock(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors,
                   candidates: list[tuple[Path, str | None]], progress: Progress | None = None) -> Lock | None:
    """The first lock of `candidates` (paths, each with the digest it must have, if one) that the solver would make again now, without
    running it: made from the same resolve inputs (`Recipe.resolve_digest`: repositories by
    URL, suite, components and keyring, the package request, the architecture), on the base
    build the cache holds (a layer), and from the signed Release files the repositories serve
    now (refreshed and verified as a resolve would: once per process, shared between
    templates, backend/aptlists.py). A Release file lists the sha256 of every index it
    covers, so a changed Packages index is a changed Release: then no lock is reused and
    the caller resolves. None also when the backend cannot tell (dnf resolves as before)."""
    progress = progress or Progress(quiet=True)
    locks = []
    for path, digest in candidates:
        try:
            lock = Lock.read(path) if path.is_file() else None
        except ResolveError:
            lock = None
        if lock is not None and digest is not None and lock.digest != digest:
            continue
        if lock is not None and lock.recipe == recipe.name and lock.inputs_digest == recipe.resolve_digest():
            locks.append(lock)
    if not locks:
        return None
    base = None
    if recipe.base_template:
        entry = cache.entry(recipe.base_template)
        if entry is None or "plain" not in entry.manifest.archives:
            return None
        base = layers.base_record(entry)
    log = cache.new_log(recipe.name, "resolve")
    try:
        with progress.step("resolve") as st:
            current = _backend(recipe, cache, mirrors, log).release_digests()
            if current is None:
                st.note("the solver runs (the backend cannot compare Release files)")
                return None
            for lock in locks:
                if lock.base == base and {r.name: r.release_sha256 for r in lock.repositories} == current:
                    st.note(f"{len(lock.packages)} packages: inputs and {len(current)} Release file(s) unchanged, "
                            "the lock stands (solver not run)")
                    return lock
            st.note("a Release file changed")
            return None
    finally:
        log.close()


def build(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, options: BuildOptions | None = None,
          progress: Progress | None = None) -> BuildResult:
    options = options or BuildOptions()
    progress = progress or Progress(quiet=True)
    require_root("vztt build")
    # The template's modes are the packages' and the recipe's, not the caller's umask: under
    # umask 077 the directories apt, dpkg and vztt make (/proc, /usr/lib64, /var/lib/dpkg/...)
    # came out 0700 (found by tests/test_hosts.py's build in another environment).
    os.umask(0o022)
    # Every mount of this build dies with this process, whatever happens to it.
    enter_private_namespace()
    boottest.clean_stale(cache)     # containers of killed runs: processes, cgroups, scratch
    cache.clean_stale_work()
    started = time.monotonic()
    name = recipe.name
    formats = formats_registry.parse(options.format or recipe.format)
    preflight_formats(recipe, formats)      # a missing tool fails now, not after the install
    # Another architecture's maintainer scripts and hooks run under qemu-user: a host that
    # cannot run them is told now, in one line, before anything is resolved or written.
    emulation.require(recipe.arch, f"{name} is {recipe.arch}")
    with cache.building(name, timeout=options.wait):
        log = cache.new_log(name, "build")
        work = cache.work_dir(name)
        # If this process is killed, the next run finds and kills what it left running.
        mark_children(work.name)
        temps: list[Path] = []
        pkg_lock = contextlib.ExitStack()
        try:
            backend = _backend(recipe, cache, mirrors, log)
            backend.image_urls()        # an unset variable in a shipped URL: one line now, not after the install
            # A layer stands on its base's promoted build (boot-tested, when this build is).
            base = layers.base_entry(recipe, cache, tested=options.test) if recipe.base_template else None
            lock_path = options.lock_path or cache.lock_file(name)
            if options.locked:
                with progress.step("lock") as st:
                    lock = Lock.read(lock_path)
                    if lock.inputs_digest != recipe.resolve_digest():
                        raise ResolveError(f"{lock_path}: made from other package settings of recipe {name} "
                                           "(repositories, packages or release changed since); run `vztt resolve` or build without --locked")
                    if base is not None:
                        layers.check_locked_base(lock, lock_path, base)
                    st.note(f"{len(lock.packages)} packages from {lock_path}")
            else:
                lock = resolve(recipe, cache, mirrors, lock_path, progress, log).lock

            packages = PackageCache(cache.packages_dir)
            # Shared: other builds may fetch alongside; `vztt prune` must wait until we have installed.
            pkg_lock.enter_context(packages.locked(timeout=options.wait))
            with progress.step("fetch") as st:
                fetcher = Fetcher(packages, jobs=options.jobs)
                files = fetcher.fetch_all(backend.downloads(lock))
                s = fetcher.stats
                st.note(f"{len(files)} packages: {s.cached} cached, {s.downloaded} fetched "
                        f"({s.bytes_downloaded / 1e6:.1f} MB)")

            env = {**recipe.environment, "SOURCE_DATE_EPOCH": str(lock.source_date_epoch)}
            with BuildImage(work, recipe.image_size, log) as image:
                if base is not None:
                    with progress.step("base") as st:
                        tar_bytes = layers.unpack_base(cache, base, image.root)
                        st.note(f"{base.name} build {base.manifest.build_id}, {tar_bytes / 1e6:.0f} MB, sha256 checked")
                with progress.step("install") as st:
                    # vztt's order: pre-cache (host) -> mid-pre/-post-install (after the base system) -> packages.
                    before = run_hooks(image.root, recipe.hooks, env, log, name, "before-packages", work)
                    image.mount_api()
                    backend.install(lock, files, image.root, env, after_base=lambda: run_hooks(
                        image.root, recipe.hooks, env, log, name, "after-base", work))
                    st.note(f"{len(lock.packages)} packages" + (f" on {base.name}" if base else "")
                            + (f", {before} hooks before" if before else ""))
                pkg_lock.close()
                with progress.step("customize") as st:
                    write_files(image.root, recipe.files)
                    after = run_hooks(image.root, recipe.hooks, env, log, name, "after-packages", work)
                    st.note(f"{len(recipe.files)} files, {after} hooks")
                with progress.step("clean"):
                    image.unmount_api()
                    backend.finish(image.root)
                    clean_root(image.root)
                    used = image.used_bytes()
                with progress.step("sbom") as st:
                    # What the image's package database says (with sources and licenses), and the
                    # sha256 of each package file from the lock: the manifest's package list.
                    # A layer: the base's packages are in the image's database too, their files'
                    # sha256 from the base's build (builder/layer.py).
                    known = layers.base_package_files(cache, base) if base is not None else {}
                    installed = _package_records(backend.installed(image.root), backend.package_info(image.root),
                                                 lock, known)
                    st.note(f"{len(installed)} packages, {sum(bool(p.licenses) for p in installed)} "
                            "stating their licenses")
                # `out` is set for each format by write_formats.
                context = FormatContext(name=name, tree=image.root, out=work, work=work,
                                        source_date_epoch=lock.source_date_epoch, lock_digest=lock.digest,
                                        packages=installed, settings=recipe.merged, log=log,
                                        app_cache=AppCache(recipe.os_template, recipe.app_templates)
                                        if recipe.base_template else None)
                archives, outputs = write_formats(formats, context, cache, progress, temps)
            created = datetime.now(timezone.utc).replace(microsecond=0)
            manifest = Manifest(
                name=name,
                # Sorts by time; names the lock it was built from.
                build_id=created.strftime("%Y%m%dT%H%M%SZ") + "-" + lock.digest[7:15],
                created=created.isoformat(),
                distro=recipe.distro, release=recipe.release, version=recipe.version, arch=recipe.arch,
                formats=list(formats), archives=archives,    # formats[0]: the primary archive (plain when built)
                recipe_digest=recipe.digest(), lock_digest=lock.digest, packages_digest=lock.packages_digest,
                source_date_epoch=lock.source_date_epoch, vztt_version=__version__,
                packages=installed, package_count=len(installed), image_used_bytes=used,
                build_seconds=round(time.monotonic() - started, 1), steps=dict(progress.timings),
                base=lock.base,
            )
            manifest_path = cache.manifest(name)
            tmp_manifest = cache.temp_path(manifest_path)
            temps.append(tmp_manifest)
            # Boot the packed archive; only a template that passes goes on (a failed one stays as -failed).
            manifest.boot_test = gate(recipe, cache, outputs, manifest_path, manifest, options.test, progress)
            manifest.steps, manifest.build_seconds = dict(progress.timings), round(time.monotonic() - started, 1)
            with progress.step("promote") as st:
                removed = _other_formats(cache, manifest, progress)
                manifest.write(tmp_manifest)
                sboms = _write_sboms(cache, manifest, temps)
                previous = cache.entry(name)
                cache.promote(name, outputs + sboms + [(tmp_manifest, manifest_path)])
                # A format the new manifest does not name must not linger beside it.
                for fmt in set(formats_registry.names()) - set(manifest.archives):
                    for file_name in formats_registry.get(fmt).file_names(name):
                        cache.file(file_name).unlink(missing_ok=True)
                # Nor a file the last build had under another name (an app cache whose applications changed).
                for gone in _files_of(previous) - _files_of_manifest(manifest):
                    cache.file(gone).unlink(missing_ok=True)
                cache.record_history(name, manifest, lock)
                st.note(", ".join(str(final) for _, final in outputs))
            manifest.steps = dict(progress.timings)
            return BuildResult(name=name, archive=outputs[0][1], manifest_path=manifest_path, manifest=manifest,
                               log=log.path or Path(), fetch=dataclasses.asdict(fetcher.stats), removed=removed)
        finally:
            pkg_lock.close()
            for t in temps:
                t.unlink(missing_ok=True)
            log.close()
            shutil.rmtree(work, ignore_errors=True)


def _files_of(entry: Entry | None) -> set[str]:
    return _files_of_manifest(entry.manifest) if entry else set()


def _files_of_manifest(manifest: Manifest) -> set[str]:
    return {f.file for a in manifest.archives.values() for f in a.files if "/" not in f.file}


def _other_formats(cache: TemplateCache, manifest: Manifest, progress: Progress) -> list[str]:
    """A build that writes fewer formats than the cached template has (`--format ploop` over
    plain and ploop): the cached files of the other formats stay, named in the new manifest,
    if they were built from the same lock (the bytes this build would have written); else
    they are removed at promote, which one line says. Returns the file names removed."""
    old = cache.entry(manifest.name)
    if old is None:
        return []
    others = [f for f in formats_registry.ordered(list(old.manifest.archives)) if f not in manifest.archives
              and cache.path(old.manifest.archives[f]).is_file()]
    if not others:
        return []
    if old.manifest.lock_digest == manifest.lock_digest:
        manifest.archives.update({f: old.manifest.archives[f] for f in others})
        manifest.formats = formats_registry.ordered([*manifest.formats, *others])   # as a build of all would
        return []
    removed = [part.file for f in others for part in old.manifest.archives[f].files]
    progress.say(f"  {manifest.name}: removed the cached {', '.join(removed)}: built from another lock "
                 f"({old.manifest.lock_digest[:19]}...) than this {'/'.join(manifest.formats)} build "
                 f"({manifest.lock_digest[:19]}...); build with --format all to have both")
    return removed


def _package_records(installed: list[InstalledPackage], info: dict[tuple[str, str], PackageInfo],
                     lock: Lock, known: dict[tuple[str, str, str], str] | None = None) -> list[PackageRecord]:
    """The manifest's package list: the image's packages, with the sha256 of each one's file
    from the lock, or from `known` (a layer's base build: the packages it did not install)."""
    files = {**(known or {}), **{(p.name, p.arch, p.version): p.sha256 for p in lock.packages}}
    out = []
    for p in sorted(installed, key=lambda p: (p.name, p.arch)):
        i = info.get((p.name, p.arch), PackageInfo())
        out.append(PackageRecord(p.name, p.arch, p.version, sha256=files.get((p.name, p.arch, p.version), ""),
                                 source=i.source, source_version=i.source_version, licenses=i.licenses))
    return out


def _write_sboms(cache: TemplateCache, manifest: Manifest, temps: list[Path]) -> list[tuple[Path, Path]]:
    """The build's SBOMs under temporary names (listed in `temps`), as (temporary, final) pairs."""
    pairs = []
    for kind in sbom.KINDS:
        final = cache.sbom(manifest.name, kind)
        tmp = cache.temp_path(final)
        temps.append(tmp)
        atomic_write(tmp, sbom.render(manifest, kind))
        pairs.append((tmp, final))
    return pairs


def write_formats(wanted: tuple[str, ...], context: FormatContext, cache: TemplateCache, progress: Progress,
                   temps: list[Path]) -> tuple[dict[str, ArchiveRecord], list[tuple[Path, Path]]]:
    """Write every wanted format, each as a step of its own, under temporary names (listed
    in `temps`). The source format (plain) is written first whether wanted or not: the
    others are made from it; not wanted, it is dropped with the temporary files.
    Returns the records of the wanted formats and the (temporary, final) pairs of all
    their files. A format that cannot be written is one line naming it (and its tool)."""
    archives: dict[str, ArchiveRecord] = {}
    outputs: list[tuple[Path, Path]] = []
    source = formats_registry.SOURCE
    for fmt_name in [source, *(f for f in wanted if f != source)]:
        fmt = formats_registry.get(fmt_name)
        pairs = []
        for i, part in enumerate(fmt.part_list()):
            # The primary file may be named otherwise (a layered template's app cache).
            final = cache.file(fmt.output_name(context) if i == 0 else part.cache_name(context.name))
            tmp = cache.temp_path(final)
            temps.append(tmp)
            pairs.append((part.suffix, tmp, final))
        outs = {suffix: tmp for suffix, tmp, _ in pairs}
        with progress.step(fmt.step) as st:
            try:
                record = fmt.write(dataclasses.replace(context, out=pairs[0][1], outs=outs))
            except OSError as e:          # what Python itself wrote: no space, I/O error
                raise BuildError(f"format {fmt_name}: writing {e.filename or pairs[0][1]}: {e.strerror}") from None
            st.note(fmt.describe(record))
        if fmt_name == source:
            context.plain, context.plain_record = pairs[0][1], record
        if fmt_name in wanted:
            archives[fmt_name] = record
            outputs += [(tmp, final) for _, tmp, final in pairs]
    return archives, outputs


def preflight_formats(recipe: Recipe, wanted: tuple[str, ...]) -> None:
    """Before anything is built: every program the wanted formats (and the source format)
    run is here, and each can write this recipe; else one line naming the format."""
    for fmt_name in dict.fromkeys([formats_registry.SOURCE, *wanted]):
        formats_registry.get(fmt_name).preflight(recipe.name, recipe.merged)
