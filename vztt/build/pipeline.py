"""The pipeline, in the order the data flows:
recipe -> lock -> packages -> image -> archive -> cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vztt import __version__
from vztt.boot import test as boottest
from vztt.build.gate import gate
from vztt.formats.plain import pack_tree
from vztt.store.templates import TemplateCache
from vztt.build.customize import clean_root, run_hooks, write_files
from vztt.backend import backend_for, Backend
from vztt.base.errors import ResolveError
from vztt.build.fetch import Fetcher
from vztt.build.image import BuildImage
from vztt.recipe.lock import Lock, LockDiff, diff
from vztt.recipe.variables import Mirrors
from vztt.base.mounts import enter_private_namespace, require_root
from vztt.store.packages import PackageCache
from vztt.base.proc import Log, mark_children
from vztt.base.progress import Progress
from vztt.recipe.recipe import Recipe
from vztt import formats as formats_registry
from vztt.formats.vzcache import pack_ploop

MANIFEST_FORMAT = 1


@dataclass
class BuildOptions:
    locked: bool = False            # install the lock as it is; never re-resolve
    lock_path: Path | None = None   # default: <cache>/locks/<name>.lock.json
    jobs: int = 8                   # parallel downloads
    test: bool = True               # boot-test the packed archive before promote (--no-test)
    format: str | None = None       # plain | ploop | all; None: the recipe's setting
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
    manifest: dict[str, Any]
    log: Path
    fetch: dict[str, int] = field(default_factory=dict)    # this build's downloads: cached/downloaded/bytes


def _backend(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, log: Log) -> Backend:
    return backend_for(recipe, mirrors, cache.state_dir(recipe.name), log)


def _log(cache: TemplateCache, name: str, kind: str) -> Log:
    logs = cache.root / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"{name}.{kind}.log"
    path.write_text(f"# vztt {__version__} {kind} {name} {datetime.now(timezone.utc).isoformat()}\n")
    return Log(path)


def resolve(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, lock_path: Path | None = None,
            progress: Progress | None = None, log: Log | None = None) -> ResolveResult:
    """Resolve with the distro's solver and write the lock; report what changed."""
    progress = progress or Progress(quiet=True)
    lock_path = lock_path or cache.lock_file(recipe.name)
    own_log = log is None
    log = log or _log(cache, recipe.name, "resolve")
    try:
        with progress.step("resolve") as st:
            previous = None
            if lock_path.exists():
                try:
                    previous = Lock.read(lock_path)
                except ResolveError:
                    previous = None      # unreadable old lock: replaced, reported as all new
            lock = _backend(recipe, cache, mirrors, log).resolve()
            lock.write(lock_path)
            d = diff(previous, lock)
            st.note(f"{len(lock.packages)} packages, {len(d.added)} added, {len(d.removed)} removed, "
                    f"{len(d.changed)} changed")
        return ResolveResult(lock=lock, lock_path=lock_path, diff=d, previous=previous)
    finally:
        if own_log:
            log.close()


def build(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, options: BuildOptions | None = None,
          progress: Progress | None = None) -> BuildResult:
    options = options or BuildOptions()
    progress = progress or Progress(quiet=True)
    require_root("vztt build")
    # Every mount of this build dies with this process, whatever happens to it.
    enter_private_namespace()
    boottest.clean_stale(cache)     # containers of killed runs: processes, cgroups, scratch
    cache.clean_stale_work()
    started = time.monotonic()
    name = recipe.name
    with cache.building(name, timeout=options.wait):
        log = _log(cache, name, "build")
        work = cache.work_dir(name)
        # If this process is killed, the next run finds and kills what it left running.
        mark_children(work.name)
        temps: list[Path] = []
        pkg_lock = contextlib.ExitStack()
        try:
            backend = _backend(recipe, cache, mirrors, log)
            lock_path = options.lock_path or cache.lock_file(name)
            if options.locked:
                with progress.step("lock") as st:
                    lock = Lock.read(lock_path)
                    if lock.inputs_digest != recipe.resolve_digest():
                        raise ResolveError(f"{lock_path}: made from other package settings of recipe {name} "
                                           "(repositories, packages or release changed since); run `vztt resolve` or build without --locked")
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
            formats = formats_registry.parse(options.format or recipe.format)
            archives: dict[str, dict[str, Any]] = {}
            outputs: list[tuple[Path, Path]] = []          # (temporary, final), promoted together
            with BuildImage(work, recipe.image_size, log) as image:
                with progress.step("install") as st:
                    image.mount_api()
                    backend.install(lock, files, image.root, env)
                    st.note(f"{len(lock.packages)} packages")
                pkg_lock.close()
                with progress.step("customize") as st:
                    write_files(image.root, recipe.files)
                    run_hooks(image.root, recipe.hooks, env, log, name)
                    st.note(f"{len(recipe.files)} files, {len(recipe.hooks)} hooks")
                with progress.step("clean"):
                    image.unmount_api()
                    backend.finish(image.root)
                    clean_root(image.root)
                    installed = backend.installed(image.root)
                    used = image.used_bytes()
                # The plain archive is made whenever a ploop cache is wanted too: the ploop disk
                # is filled from it (see vzcache.pack_ploop); it is dropped if not asked for.
                final = cache.archive(name, "plain")
                plain_tmp = cache.temp_path(final)
                temps.append(plain_tmp)
                with progress.step("pack") as st:
                    packed = pack_tree(image.root, plain_tmp, lock.source_date_epoch)
                    st.note(f"{packed.tar_size / 1e6:.0f} MB tar -> {packed.size / 1e6:.0f} MB lz4")
                if "plain" in formats:
                    archives["plain"] = {"file": final.name, "format": "plain", "sha256": packed.sha256,
                                         "size": packed.size, "tar_size": packed.tar_size}
                    outputs.append((plain_tmp, final))
                if "ploop" in formats:
                    final = cache.archive(name, "ploop")
                    tmp = cache.temp_path(final)
                    temps.append(tmp)
                    with progress.step("ploop") as st:
                        pl = pack_ploop(plain_tmp, tmp, work, name=name,
                                        packages=[(p.name, p.arch, p.version) for p in installed],
                                        disk_size=recipe.disk_size, ext4_features=recipe.ext4_features,
                                        source_date_epoch=lock.source_date_epoch, identity=lock.digest, log=log)
                        st.note(f"{pl.clusters} MiB of {pl.disk_size >> 30} GiB disk -> {pl.size / 1e6:.0f} MB lz4")
                    archives["ploop"] = {"file": final.name, "format": "ploop", "sha256": pl.sha256, "size": pl.size,
                                         "disk_size": pl.disk_size, "clusters": pl.clusters,
                                         "ext4_features": recipe.ext4_features, "fs_uuid": pl.fs_uuid}
                    outputs.append((tmp, final))
            created = datetime.now(timezone.utc).replace(microsecond=0)
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": name,
                # Sorts by time; names the lock it was built from.
                "build_id": created.strftime("%Y%m%dT%H%M%SZ") + "-" + lock.digest[7:15],
                "packages_digest": lock.packages_digest,
                "vztt_version": __version__,
                "created": created.isoformat(),
                "distro": recipe.distro, "release": recipe.release, "version": recipe.version, "arch": recipe.arch,
                "recipe_digest": recipe.digest(),
                "lock_digest": lock.digest,
                "source_date_epoch": lock.source_date_epoch,
                "formats": list(formats),
                "archive": archives[formats[0]],       # the primary archive (plain when built)
                "archives": archives,
                "image_used_bytes": used,
                "package_count": len(installed),
                "packages": [{"name": p.name, "arch": p.arch, "version": p.version} for p in
                             sorted(installed, key=lambda p: (p.name, p.arch))],
                "build_seconds": round(time.monotonic() - started, 1),
                "steps": dict(progress.timings),
            }
            manifest_path = cache.manifest(name)
            tmp_manifest = cache.temp_path(manifest_path)
            temps.append(tmp_manifest)
            # Boot the packed archive; only a template that passes goes on (a failed one stays as -failed).
            manifest["boot_test"] = gate(recipe, cache, outputs, manifest_path, manifest, options.test, progress)
            manifest["steps"], manifest["build_seconds"] = dict(progress.timings), round(time.monotonic() - started, 1)
            with progress.step("promote") as st:
                tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                cache.promote(name, outputs + [(tmp_manifest, manifest_path)])
                # A format not built this time must not linger beside the new manifest.
                for fmt in set(formats_registry.names()) - set(formats):
                    cache.archive(name, fmt).unlink(missing_ok=True)
                cache.record_history(name, manifest, lock)
                st.note(", ".join(str(final) for _, final in outputs))
            manifest["steps"] = dict(progress.timings)
            return BuildResult(name=name, archive=outputs[0][1], manifest_path=manifest_path, manifest=manifest,
                               log=log.path or Path(), fetch=dataclasses.asdict(fetcher.stats))
        finally:
            pkg_lock.close()
            for t in temps:
                t.unlink(missing_ok=True)
            log.close()
            shutil.rmtree(work, ignore_errors=True)
