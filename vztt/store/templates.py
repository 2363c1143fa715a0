"""The template cache directory and its rules.

Layout of a cache root (default ./cache, or --cache-dir / VZTT_CACHE):
  <name>.plain.tar.lz4            the template (rootfs tarball)
  <name>.plain.ploopv2.tar.lz4    the same as a Virtuozzo 7 ploop cache (format ploop/all)
  <name>.manifest.json            what it is: digests, packages, sizes, timings
  <name>.spdx.json, .cdx.json     its SBOM (SPDX 2.3, CycloneDX 1.6), made from the manifest
  locks/<name>.lock.json          the lock it was (or will be) built from
  packages/                       the shared content-addressed package cache
  state/<name>/                   solver state (apt lists), reused between resolves
  state/.shared/                  apt repositories' verified lists, shared by the templates using them
  history/<name>/<build id>.*     every promoted build's manifest and lock (vztt diff, vztt status)
  logs/<name>.<kind>.log          the last build/resolve/... log, console logs of boot tests
  kernel/                         built container kernels (or VZTT_KERNEL_CACHE)
  .work/<label>.<pid>/            scratch of a run in progress (a build, a boot test, create...;
                                  cleaned by the next run if its pid died)
  .containers/                    the container runtime's state (boot tests, vztt run)
  .downloads/<sha256>.part        pulls in progress (kept across runs for resuming)
  .locks/<name>.lock              flock held while a build (or pull) of <name> runs; says who holds it
  .mirrors/<mirror>-<key>.json    the highest index serial accepted from a template mirror with a key
                                  (mirror/freshness.py: an older index is a rollback)

This class is the only owner of that layout: nothing else builds these paths.

Promotion is atomic: the new archive and manifest are written under temporary
names, the current pair is renamed to `-old`, the new pair renamed into place,
then `-old` removed. The manifest is the commit record: an archive without a
manifest beside it is not a template, and a crash between renames is repaired
at the next start (recover()).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from vztt import __version__
from vztt.base.errors import EnvironmentProblem
from vztt.base.files import fsync_dir, temp_name
from vztt.base.mounts import force_cleanup
from vztt.base.paths import default_cache
from vztt.base.proc import MARK_VARIABLE, Log
from vztt.store.locking import wait_for_flock
from vztt.recipe.lock import Lock
from vztt.store.manifest import ArchiveRecord, Manifest, ManifestError

OLD = "-old"
SBOM_FILES = {"spdx": "spdx.json", "cyclonedx": "cdx.json"}     # SBOM kind -> file suffix


@dataclass(frozen=True)
class Entry:
    """A cached template: its manifest (the commit record) and primary archive."""

    name: str
    archive: Path
    manifest_path: Path
    manifest: Manifest


class TemplateCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_cache()
        self.root.mkdir(parents=True, exist_ok=True)

    # paths
    def file(self, file_name: str) -> Path:
        """A template file of the cache by its name (a format's file_name(): the store
        does not know the formats)."""
        return self.root / file_name

    def manifest(self, name: str) -> Path:
        return self.root / f"{name}.manifest.json"

    def sbom(self, name: str, kind: str) -> Path:
        """The build's SBOM beside its manifest: kind spdx or cyclonedx."""
        return self.root / f"{name}.{SBOM_FILES[kind]}"

    def path(self, record: ArchiveRecord) -> Path:
        """Where the file a manifest's archive record names is in this cache."""
        return self.root / record.file

    def lock_file(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock.json"

    def lock_files(self) -> list[Path]:
        """Every lock the cache keeps: locks/ and every promoted build's in history/
        (what `vztt prune` keeps the packages of)."""
        return (sorted(self.lock_file("*").parent.glob("*.lock.json"))
                + sorted(self._history_root.glob("*/*.lock.json")))

    def state_dir(self, name: str) -> Path:
        return self.root / "state" / name

    @property
    def shared_state_dir(self) -> Path:
        """Repository metadata templates share (apt: one directory per repository, backend/aptlists.py)."""
        return self.root / "state" / ".shared"

    @property
    def logs_dir(self) -> Path:
        d = self.root / "logs"
        d.mkdir(exist_ok=True)
        return d

    def log_path(self, name: str, kind: str) -> Path:
        """logs/<name>.<kind>.log (kind: build, resolve, console, vm.console, kernel build...)."""
        return self.logs_dir / f"{name}.{kind}.log"

    def new_log(self, name: str, kind: str) -> Log:
        """A fresh log for one run: the previous one of this kind is replaced."""
        path = self.log_path(name, kind)
        path.write_text(f"# vztt {__version__} {kind} {name} {datetime.now(timezone.utc).isoformat()}\n")
        return Log(path)

    @property
    def containers_dir(self) -> Path:
        """The container runtime's state directory."""
        return self.root / ".containers"

    @property
    def downloads_dir(self) -> Path:
        return self.root / ".downloads"

    def index_record(self, mirror: str, signer: str) -> Path:
        """.mirrors/<digest of the mirror's location>-<signer's fingerprint>.json: what this host
        accepted last from that mirror's index signed by that key (mirror/freshness.py)."""
        key = signer if re.fullmatch(r"[0-9A-Fa-f]{16,64}", signer) else hashlib.sha256(signer.encode()).hexdigest()
        return self._index_records / f"{hashlib.sha256(mirror.encode()).hexdigest()[:16]}-{key}.json"

    @property
    def index_records_lock(self) -> Path:
        """flock'ed while an index record is compared and raised (two pulls, one mirror)."""
        return self._index_records / ".lock"

    @property
    def _index_records(self) -> Path:
        return self.root / ".mirrors"

    def require_writable(self, command: str) -> None:
        """EnvironmentProblem (exit 7, one line) unless this user may write the cache: a
        root-owned cache used by another user is a host problem, said before anything starts."""
        for d in (self.root, self.root / ".locks"):
            if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
                raise EnvironmentProblem(f"{d}: not writable by uid {os.getuid()}: {command} writes the cache; "
                                         "run it as root, or give a --cache-dir this user owns")

    @property
    def kernel_dir(self) -> Path:
        """Built container kernels: VZTT_KERNEL_CACHE, else <cache>/kernel."""
        return Path(os.environ.get("VZTT_KERNEL_CACHE") or self.root / "kernel")

    @property
    def packages_dir(self) -> Path:
        return Path(os.environ.get("VZTT_PACKAGE_CACHE") or self.root / "packages")

    # reading
    def entry(self, name: str) -> Entry | None:
        self.recover(name)
        m = self.manifest(name)
        try:
            manifest = Manifest.read(m)
        except ManifestError:
            return None
        archive = self.root / manifest.archive.file
        if not archive.is_file():
            return None
        return Entry(name=name, archive=archive, manifest_path=m, manifest=manifest)

    # history: every promoted build's manifest and lock, for `vztt diff` and `vztt status`
    @property
    def _history_root(self) -> Path:
        return self.root / "history"

    def history_dir(self, name: str) -> Path:
        return self._history_root / name

    def record_history(self, name: str, manifest: Manifest, lock: Lock) -> None:
        """Keep a promoted build's manifest and lock, both written atomically."""
        d = self.history_dir(name)
        lock.write(d / f"{manifest.build_id}.lock.json")
        manifest.write(d / f"{manifest.build_id}.manifest.json")

    def history(self, name: str) -> list[Manifest]:
        """Manifests of this template's promoted builds, oldest first (unreadable ones skipped)."""
        out = []
        for p in sorted(self.history_dir(name).glob("*.manifest.json")):
            try:
                out.append(Manifest.read(p))
            except ManifestError:
                continue
        return out

    # writing
    def temp_path(self, final: Path) -> Path:
        return temp_name(final)

    def promote(self, name: str, files: list[tuple[Path, Path]]) -> None:
        """Move (temp, final) pairs into place; the manifest must be the last pair."""
        olds = []
        for _, final in files:
            if final.exists():
                old = final.with_name(final.name + OLD)
                os.replace(final, old)
                olds.append(old)
        for tmp, final in files:
            os.replace(tmp, final)
        fsync_dir(self.root)
        for old in olds:        # manifest-old last: recover() reads a commit from it and the manifest
            old.unlink(missing_ok=True)

    def recover(self, name: str) -> None:
        """Repair what a crash during promote() left: restore -old when the new pair is incomplete."""
        manifest = self.manifest(name)
        old_manifest = manifest.with_name(manifest.name + OLD)
        olds = list(self.root.glob(f"{name}.*{OLD}"))
        if not olds:
            return
        # The manifest is the commit record. Both it and its -old there: the new manifest was
        # renamed into place (committed); the -old files are the previous build's, removed
        # (promote removes manifest-old last). Otherwise promote died before that rename:
        # still moving the cached files aside (the manifest in place, not yet its -old) or
        # putting the new ones in place (only manifest-old): the previous pair is restored,
        # over any new file already renamed in.
        # (A cached file with no manifest before it was never a template: its -old is
        # dropped when the new file is in place.)
        placing = old_manifest.exists() and not manifest.exists()      # decided once, before any rename
        aside = manifest.exists() and not old_manifest.exists()
        for old in sorted(olds, key=lambda p: p == old_manifest):       # manifest-old last, as promote
            final = old.with_name(old.name[:-len(OLD)])
            if placing or (aside and not final.exists()):
                os.replace(old, final)
            else:
                old.unlink(missing_ok=True)                     # committed, or nothing to restore

    # build scratch areas
    def clean_stale_work(self) -> list[Path]:
        """Remove work dirs and temp files of builds whose process is gone."""
        removed = []
        work = self._work_root
        for d in work.glob("*.*") if work.is_dir() else []:
            pid = d.name.rsplit(".", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                _kill_leftover_processes(d.name)
                force_cleanup(d)
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        for tmp in self.root.glob(".*.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    @property
    def _work_root(self) -> Path:
        return self.root / ".work"

    def work_dir(self, label: str) -> Path:
        """.work/<label>.<pid>, made empty: scratch of this process (label: a template name,
        `<name>.boot`, `create`, `kernel`...). The pid lets the next run remove it if we die."""
        d = self._work_root / f"{label}.{os.getpid()}"
        if d.exists():
            force_cleanup(d)
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    @contextmanager
    def scratch(self, label: str) -> Iterator[Path]:
        """work_dir(label) for the duration of a with-block: removed on the way out, with
        whatever is still mounted below it."""
        d = self.work_dir(label)
        try:
            yield d
        finally:
            force_cleanup(d)
            shutil.rmtree(d, ignore_errors=True)

    @contextmanager
    def building(self, name: str, timeout: float = 0,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the per-template lock; a second build (or pull) of the same template waits or
        is refused. The lock file names its holder (pid and command): `on_wait(holder)` is
        called as soon as we have to wait for it."""
        locks = self.root / ".locks"
        locks.mkdir(exist_ok=True)
        path = locks / f"{name}.lock"
        with open(path, "a+") as fh:
            def holder() -> str:
                fh.seek(0)
                return fh.read().strip() or "another process"

            def busy() -> EnvironmentProblem:
                return EnvironmentProblem(f"{name}: template is busy: being built by {holder()} (lock {path})")
            wait_for_flock(fh, exclusive=True, timeout=timeout, busy=busy,
                           on_wait=(lambda: on_wait(f"{holder()} (lock {path})")) if on_wait else None)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} ({_command_line()})\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()


def _command_line() -> str:
    """This process's vztt command, for whoever waits for its lock."""
    text = " ".join(["vztt", *sys.argv[1:]])
    return " ".join(text.split())[:200]


def _kill_leftover_processes(work_name: str) -> None:
    """SIGKILL what a killed build left running (apt, dpkg, maintainer scripts): the
    processes that carry its mark (proc.mark_children). Their mounts and loop device
    go with the last of them."""
    mark = f"{MARK_VARIABLE}={work_name}".encode() + b"\0"
    for _ in range(50):
        victims = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if mark in (proc / "environ").read_bytes():
                        victims.append(int(proc.name))
                except OSError:
                    continue
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
