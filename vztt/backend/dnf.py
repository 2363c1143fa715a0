"""The dnf backend: CentOS Stream, AlmaLinux and Rocky Linux, release 9 and later.

dnf runs from the host (Debian's python3-dnf and rpm), always through its
Python API, in a worker process of its own (`python -m vztt.backend._dnf_worker`):

- rpm and the `rpmkeys` process dnf starts to check signatures read their
  database path from `~/.rpmmacros` (Debian's rpm defaults to `~/.rpmdb`), so
  the worker gets a HOME whose .rpmmacros names the release's own database
  path (EL 9: /var/lib/rpm; EL 10: /usr/lib/sysimage/rpm, where its rpm
  looks, /var/lib/rpm being its rpm package's symlink to it) and switches off
  rpm's transaction plugins (syslog, D-Bus, audit, SELinux: they would talk to
  the host; so the image's files carry no SELinux labels);
- rpm chroots the process that runs a transaction into the image.

Resolve: a `dnf.Base` configured from nothing but the recipe (no
/etc/yum.repos.d, no /etc/dnf, no vars or plugins from the host), repositories
added by URL with `gpgcheck`, `repo_gpgcheck` and the recipe's key, metadata
kept in the template's state directory and re-validated on every resolve
(`metadata_expire=0`: repomd.xml and its signature are checked each time).
Packages are marked on an empty system (`load_system_repo=False`) and the
transaction's install set becomes the lock, with name, epoch, version,
release, arch, size, sha256 and location from primary.xml.

Install: from the fetched files only (the content-addressed package cache;
no repository, no network). Every package's signature is first checked with
`Base.package_signature_check` against a scratch rpm database holding only
its repository's key (dnf's API would install an unsigned package even with
gpgcheck on); anything but a good signature stops the build. The same files
are then installed into the image with `--installroot` semantics: a Base on
the image root, the lock's packages as local packages, `tsflags=nodocs` and
`install_weak_deps` as the recipe says. rpm only warns when a scriptlet
fails; the transaction display catches it and the build fails. dnf's cache,
history and logs live in the scratch directory, never in the image.

EL 7 and 8 keep their rpm database in BerkeleyDB, which Debian's rpm cannot
write: such recipes are refused. EL 9 and 10 read the sqlite database
Debian's rpm 4.18 writes (rpmdb.sqlite; EL 9 has rpm 4.16, EL 10 4.19).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from vztt.backend import Backend, BaseSystem, InstalledPackage, PackageInfo
from vztt.base.errors import BuildError, RecipeError, ResolveError, VzttError
from vztt.base.inroot import clear_in_root, dir_in_root, list_in_root, read_in_root, remove_in_root, write_in_root
from vztt.recipe.lock import Lock, LockedPackage, LockedRepository
from vztt.base.proc import TOOL_ENV, run, summarize

MIN_RELEASE = 9
REPOS_DIR = "/etc/yum.repos.d"
KEYS_DIR = "/etc/pki/rpm-gpg"
# Where the image's rpm keeps its database, by EL major release: EL 10 moved it below /usr,
# as Fedora did in release 36 (its rpm package makes /var/lib/rpm a symlink there).
DBPATH_EL9 = "/var/lib/rpm"
DBPATH_EL10 = "/usr/lib/sysimage/rpm"
# rpm's transaction plugins would reach out to the host (syslog, D-Bus, audit, SELinux, IMA).
_PLUGINS = ("audit", "dbus_announce", "fapolicyd", "fsverity", "ima", "prioreset", "selinux", "syslog",
            "systemd_inhibit")
# Made mount points by BuildImage.mount_api before the filesystem package came: their
# modes are mkdir's, not the package's (EL's /proc is 0555).
MOUNT_POINTS = ("proc", "dev")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # the directory holding the vztt package
WORKER = "vztt.backend._dnf_worker"


def el_major(recipe_release: str) -> int | None:
    m = re.match(r"(\d+)", recipe_release)
    return int(m.group(1)) if m else None


def dbpath_for(major: int) -> str:
    """The rpm database directory EL `major`'s own rpm reads."""
    return DBPATH_EL9 if major < 10 else DBPATH_EL10


def rpmmacros(dbpath: str) -> str:
    """The worker's ~/.rpmmacros: the image's database path, rpm's plugins off."""
    return f"%_dbpath {dbpath}\n" + "".join(f"%__transaction_{p} %{{nil}}\n" for p in _PLUGINS)


def _evr(epoch: int | str | None, ver: str, rel: str) -> str:
    e = str(epoch or "0")
    return f"{ver}-{rel}" if e == "0" else f"{e}:{ver}-{rel}"


class DnfBackend(Backend):
    family = "dnf"
    package_db = ("var/lib/rpm/",)

    def __init__(self, recipe, mirrors, state_dir, log, shared_state=None):  # type: ignore[no-untyped-def]
        super().__init__(recipe, mirrors, state_dir, log, shared_state)
        where = recipe.origins.get("release", recipe.path)
        major = el_major(recipe.release)
        if major is None:
            raise RecipeError(f"{where}: release: {recipe.release!r} is not an EL major release (9, 10)")
        if major < MIN_RELEASE:
            raise RecipeError(f"{where}: release: {recipe.release!r}: EL {major} keeps its rpm database in "
                              "BerkeleyDB, which Debian's rpm cannot write; vztt builds EL 9 and later")
        self.major = major
        self.dbpath = dbpath_for(major)

    # ------------------------------------------------------------------ worker
    def _worker(self, op: str, request: dict[str, Any], scratch: Path, what: str, error: type[VzttError],
                env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one dnf job in a child Python with our HOME; its errors come back as JSON."""
        home = scratch / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / ".rpmmacros").write_text(rpmmacros(self.dbpath))
        req, res = scratch / "request.json", scratch / "result.json"
        req.write_text(json.dumps(request))
        res.unlink(missing_ok=True)
        full_env = {**TOOL_ENV, **(env or {}), "HOME": str(home), "PYTHONPATH": str(_PACKAGE_ROOT),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        proc = run([sys.executable, "-m", WORKER, op, str(req), str(res)], log=self.log,
                   env=full_env, cwd=scratch, check=False, what=what, error=error)
        doc = json.loads(res.read_text()) if res.is_file() else None
        if doc and "error" in doc:
            cls = {"resolve": ResolveError, "build": BuildError}[doc["error"]["kind"]]
            raise cls(doc["error"]["message"])
        if proc.returncode != 0 or doc is None:
            hint = f" (log: {self.log.path})" if self.log.path else ""
            raise error(f"{what}: the dnf worker failed: {summarize(proc.stdout + proc.stderr)}{hint}")
        return doc

    def _common(self) -> dict[str, Any]:
        r = self.recipe
        return {"releasever": r.release, "arch": r.arch, "platform": f"platform:el{self.major}",
                "install_weak_deps": r.install_weak_deps, "nodocs": r.nodocs}

    # ----------------------------------------------------------------- resolve
    def resolve(self, base: BaseSystem | None = None) -> Lock:
        recipe = self.recipe
        if not recipe.repositories:
            raise ResolveError(f"{recipe.path}: repositories: none configured")
        # A layer asks for its own packages, on its base's installed set (its rpm database).
        request = list(recipe.include) if base else list(recipe.base) + [x for x in recipe.include if x not in recipe.base]
        if not request and base is None:
            raise ResolveError(f"{recipe.path}: packages: nothing to install (set packages.base or packages.include)")
        urls = self.base_urls()
        state = self.state_dir / "resolve"
        state.mkdir(parents=True, exist_ok=True)
        doc = self._worker("resolve", {
            **self._common(), "state": str(state), "recipe": recipe.name, "specs": request,
            "exclude": list(recipe.exclude),
            "repos": [{"name": r.name, "url": urls[r.name], "keyring": str(r.keyring),
                       "repo_gpgcheck": r.repo_gpgcheck} for r in recipe.repositories],
            **({"installed_root": str(base.root)} if base else {}),
        }, state, "dnf resolve", ResolveError)
        packages = tuple(sorted((LockedPackage(
            name=p["name"], version=_evr(p["epoch"], p["ver"], p["rel"]), arch=p["arch"], size=p["size"],
            sha256=p["sha256"], filename=p["location"], repository=p["repo"],
            epoch=p["epoch"], ver=p["ver"], rel=p["rel"]) for p in doc["packages"]),
            key=lambda p: (p.name, p.arch)))
        repos = doc["repos"]
        return Lock(
            recipe=recipe.name, inputs_digest=recipe.resolve_digest(), distro=recipe.distro, release=recipe.release,
            arch=recipe.arch, source_date_epoch=max([r["timestamp"] for r in repos.values()]
                                                    + ([base.source_date_epoch] if base else [])),
            repositories=tuple(LockedRepository(name=r.name, url=r.url, suite="", components=(),
                                                release_sha256=repos[r.name]["sha256"])
                               for r in recipe.repositories),
            packages=packages, request=tuple(request), base=base.record if base else None,
        )

    # ----------------------------------------------------------------- install
    def install(self, lock: Lock, files: dict[str, Path], root: Path, env: dict[str, str],
                after_base: Callable[[], None] | None = None) -> None:
        # dnf has no bootstrap stage of its own: the base system is a layer's base, or the whole transaction.
        if after_base and lock.base is not None:
            after_base()
        # A layer: the base's packages are in the image already, and stay.
        had = {(p.name, p.arch) for p in self.installed(root)} if lock.base is not None else set()
        keyrings = {r.name: r.keyring for r in self.recipe.repositories}
        if not lock.packages:                                # a layer of files and hooks only
            return
        for stale in self.state_dir.glob("install-*"):      # a killed build's scratch (we hold the template lock)
            shutil.rmtree(stale, ignore_errors=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="install-", dir=self.state_dir))
        try:
            rpms = scratch / "rpms"
            rpms.mkdir()
            packages = []
            for p in lock.packages:
                if p.repository not in keyrings:
                    raise BuildError(f"lock for {lock.recipe}: {p.name} comes from repository {p.repository!r}, "
                                     "which the recipe does not have; re-run `vztt resolve`")
                link = rpms / Path(p.filename).name          # dnf's messages name the file
                if link.exists() or link.is_symlink():
                    link = rpms / f"{p.sha256[:12]}-{link.name}"
                link.symlink_to(files[p.sha256])
                packages.append({"path": str(link), "nevra": f"{p.name}-{p.version}.{p.arch}",
                                 "repository": p.repository, "keyring": str(keyrings[p.repository])})
            self._worker("install", {**self._common(), "work": str(scratch), "root": str(root),
                                     "recipe": lock.recipe, "packages": packages},
                         scratch, f"{lock.recipe}: dnf install", BuildError, env=env)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._check_installed(lock, root, had)
        if after_base and lock.base is None:
            after_base()
        self._write_repo_files(root)

    def _write_repo_files(self, root: Path) -> None:
        """/etc/yum.repos.d/<name>.repo for each repository, with its shipped URL (image_url),
        gpgcheck and its key in /etc/pki/rpm-gpg/, so dnf works in containers made from the
        template. Only when the image has no repo file: a distribution's release package
        (almalinux-release, rocky-release, ...) ships its own, with the public mirrors."""
        if any(n.endswith(".repo") for n in list_in_root(root, REPOS_DIR)):
            return
        urls = self.image_urls()
        for r in self.recipe.repositories:
            if r.name not in urls or urls[r.name].startswith("file:"):
                continue
            key = f"{KEYS_DIR}/{r.keyring.name}"
            if read_in_root(root, key) is None:
                write_in_root(root, key, r.keyring.read_bytes())
            write_in_root(root, f"{REPOS_DIR}/{r.name}.repo", repo_file(r.name, urls[r.name], key,
                                                                         r.repo_gpgcheck).encode())

    def _check_installed(self, lock: Lock, root: Path, had: set[tuple[str, str]] | None = None) -> None:
        have = {(p.name, p.arch): p for p in self.installed(root)}
        want = {(p.name, p.arch): p for p in lock.packages}
        for key, p in want.items():
            got = have.get(key)
            if got is None or got.version != p.version:
                state = f"installed as {got.version}" if got else "not installed"
                raise BuildError(f"{lock.recipe}: {p.name} {p.version} is {state} in the image after install")
        extra = sorted(f"{n}.{a}" for n, a in have.keys() - want.keys() - (had or set()))
        if extra:
            raise BuildError(f"{lock.recipe}: the image's rpm database has packages the lock does not: "
                             f"{', '.join(extra[:5])}")

    def installed(self, root: Path) -> list[InstalledPackage]:
        if not (root / self.dbpath.lstrip("/") / "rpmdb.sqlite").is_file():
            return []
        proc = run(["rpm", "--root", str(root), "--dbpath", self.dbpath, "-qa", "--qf",
                    r"%{NAME}\t%{ARCH}\t%{EPOCHNUM}\t%{VERSION}\t%{RELEASE}\n"],
                   log=self.log, what="rpm -qa in the image", error=BuildError)
        _tidy_rpmdb(root, self.dbpath)   # a reader leaves sqlite's -shm/-wal behind
        out = []
        for line in proc.stdout.splitlines():
            name, arch, epoch, ver, rel = line.split("\t")
            out.append(InstalledPackage(name=name, arch=arch, version=_evr(epoch, ver, rel), state="installed"))
        return out

    def package_info(self, root: Path) -> dict[tuple[str, str], PackageInfo]:
        if not (root / self.dbpath.lstrip("/") / "rpmdb.sqlite").is_file():
            return {}
        proc = run(["rpm", "--root", str(root), "--dbpath", self.dbpath, "-qa", "--qf",
                    r"%{NAME}\t%{ARCH}\t%{SOURCERPM}\t%{LICENSE}\n"],
                   log=self.log, what="rpm -qa in the image", error=BuildError)
        _tidy_rpmdb(root, self.dbpath)
        out = {}
        for line in proc.stdout.splitlines():
            name, arch, srpm, license_tag = line.split("\t")
            # bash-5.1.8-9.el9.src.rpm: the source package's name, and its version-release
            source, _, rest = srpm.removesuffix(".src.rpm").rpartition("-")
            source, _, version = source.rpartition("-")
            out[(name, arch)] = PackageInfo(source, f"{version}-{rest}" if version else "",
                                            (license_tag,) if license_tag and license_tag != "(none)" else ())
        return out

    # ------------------------------------------------------------------ finish
    def finish(self, root: Path) -> None:
        for rel in ("var/cache/dnf", "var/lib/dnf/history.sqlite", "var/lib/dnf/history.sqlite-shm",
                    "var/lib/dnf/history.sqlite-wal", "var/lib/dnf/repos", "var/cache/ldconfig/aux-cache",
                    "var/lib/dbus/machine-id", "etc/hostname", "etc/resolv.conf"):
            clear_in_root(root, rel)        # a directory: emptied (and kept)
            remove_in_root(root, rel)       # anything else: removed
        for rel, patterns in (("var/log", ("dnf*.log*", "hawkey.log*", "yum.log*")), (self.dbpath, ("__db.*",))):
            for name in list_in_root(root, rel):
                if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    remove_in_root(root, f"{rel}/{name}")
        self._restore_mount_points(root)
        _tidy_rpmdb(root, self.dbpath)

    def _restore_mount_points(self, root: Path) -> None:
        """/proc and /dev as the package database says (mode, owner), now that they are
        unmounted: only these, so a recipe hook's own changes elsewhere stay."""
        paths = [f"/{p}" for p in MOUNT_POINTS]
        proc = run(["rpm", "--root", str(root), "--dbpath", self.dbpath, "-qf", "--qf",
                    r"[%{FILENAMES}\t%{FILEMODES}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\n]", *paths],
                   log=self.log, what="rpm -qf /proc /dev in the image", error=BuildError, check=False)
        for line in proc.stdout.splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and fields[0] in paths:
                _set_dir_attributes(root, fields[0].lstrip("/"), int(fields[1]), fields[2], fields[3])


def repo_file(name: str, url: str, key: str, repo_gpgcheck: bool) -> str:
    return (f"# written by vztt from the recipe's repositories\n[{name}]\nname={name}\nbaseurl={url}\n"
            f"enabled=1\ngpgcheck=1\nrepo_gpgcheck={int(repo_gpgcheck)}\ngpgkey=file://{key}\n")


def _set_dir_attributes(root: Path, name: str, mode: int, user: str, group: str) -> None:
    """chmod and chown root/name, a directory directly under root, never through a symlink."""
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return                  # not a directory (or a link): not what the package made
    try:
        ids = _ids_in_root(root)
        os.fchown(fd, ids[0].get(user, 0), ids[1].get(group, 0))
        os.fchmod(fd, stat.S_IMODE(mode))
    finally:
        os.close(fd)


def _ids_in_root(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """User and group names -> ids, from the image's /etc/passwd and /etc/group."""
    tables: list[dict[str, int]] = []
    for name in ("passwd", "group"):
        data = read_in_root(root, f"etc/{name}") or b""
        table = {}
        for line in data.decode(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit():
                table[fields[0]] = int(fields[2])
        tables.append(table)
    return tables[0], tables[1]


def _tidy_rpmdb(root: Path, dbpath: str) -> None:
    """Checkpoint rpm's sqlite WAL into the database, so no -wal/-shm files stay in the image.
    Everything through the fd of the database's directory, resolved inside the root."""
    db = "rpmdb.sqlite"
    with dir_in_root(root, dbpath) as fd:
        if fd is None or not _regular(db, fd):
            return
        if _regular(db + "-wal", fd) or _regular(db + "-shm", fd):
            con = sqlite3.connect(f"/proc/self/fd/{fd}/{db}")
            try:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                con.close()
        for suffix in ("-wal", "-shm"):
            st = _regular(db + suffix, fd)
            if st is not None and (suffix == "-shm" or st.st_size == 0):
                os.unlink(db + suffix, dir_fd=fd)


def _regular(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None
