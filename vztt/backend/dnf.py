"""The dnf backend: CentOS Stream, AlmaLinux and Rocky Linux, release 9 and later.

dnf runs from the host (Debian's python3-dnf and rpm), always through its
Python API, in a worker process of its own (`python -m vztt.backend.dnf`):

- rpm and the `rpmkeys` process dnf starts to check signatures read their
  database path from `~/.rpmmacros` (Debian's rpm defaults to `~/.rpmdb`), so
  the worker gets a HOME whose .rpmmacros says `%_dbpath /var/lib/rpm` and
  switches off rpm's transaction plugins (syslog, D-Bus, audit, SELinux: they
  would talk to the host);
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
write: such recipes are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vztt.backend import Backend, InstalledPackage
from vztt.base.errors import BuildError, RecipeError, ResolveError, VzttError
from vztt.recipe.lock import Lock, LockedPackage, LockedRepository
from vztt.base.proc import TOOL_ENV, run, summarize

MIN_RELEASE = 9
DBPATH = "/var/lib/rpm"
# rpm's transaction plugins would reach out to the host (syslog, D-Bus, audit, SELinux, IMA).
_PLUGINS = ("audit", "dbus_announce", "fapolicyd", "fsverity", "ima", "prioreset", "selinux", "syslog",
            "systemd_inhibit")
RPMMACROS = f"%_dbpath {DBPATH}\n" + "".join(f"%__transaction_{p} %{{nil}}\n" for p in _PLUGINS)
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # the directory holding the vztt package
_REPO_NS = "{http://linux.duke.edu/metadata/repo}"


def el_major(recipe_release: str) -> int | None:
    m = re.match(r"(\d+)", recipe_release)
    return int(m.group(1)) if m else None


def _evr(epoch: int | str | None, ver: str, rel: str) -> str:
    e = str(epoch or "0")
    return f"{ver}-{rel}" if e == "0" else f"{e}:{ver}-{rel}"


class DnfBackend(Backend):
    family = "dnf"

    def __init__(self, recipe, mirrors, state_dir, log):  # type: ignore[no-untyped-def]
        super().__init__(recipe, mirrors, state_dir, log)
        where = recipe.origins.get("release", recipe.path)
        major = el_major(recipe.release)
        if major is None:
            raise RecipeError(f"{where}: release: {recipe.release!r} is not an EL major release (9, 10)")
        if major < MIN_RELEASE:
            raise RecipeError(f"{where}: release: {recipe.release!r}: EL {major} keeps its rpm database in "
                              "BerkeleyDB, which Debian's rpm cannot write; vztt builds EL 9 and later")
        self.major = major

    # ------------------------------------------------------------------ worker
    def _worker(self, op: str, request: dict[str, Any], scratch: Path, what: str, error: type[VzttError],
                env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one dnf job in a child Python with our HOME; its errors come back as JSON."""
        home = scratch / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / ".rpmmacros").write_text(RPMMACROS)
        req, res = scratch / "request.json", scratch / "result.json"
        req.write_text(json.dumps(request))
        res.unlink(missing_ok=True)
        full_env = {**TOOL_ENV, **(env or {}), "HOME": str(home), "PYTHONPATH": str(_PACKAGE_ROOT),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        proc = run([sys.executable, "-m", "vztt.backend.dnf", op, str(req), str(res)], log=self.log,
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
    def resolve(self) -> Lock:
        recipe = self.recipe
        if not recipe.repositories:
            raise ResolveError(f"{recipe.path}: repositories: none configured")
        request = list(recipe.base) + [x for x in recipe.include if x not in recipe.base]
        if not request:
            raise ResolveError(f"{recipe.path}: packages: nothing to install (set packages.base or packages.include)")
        urls = self.base_urls()
        state = self.state_dir / "resolve"
        state.mkdir(parents=True, exist_ok=True)
        doc = self._worker("resolve", {
            **self._common(), "state": str(state), "recipe": recipe.name, "specs": request,
            "exclude": list(recipe.exclude),
            "repos": [{"name": r.name, "url": urls[r.name], "keyring": str(r.keyring),
                       "repo_gpgcheck": r.repo_gpgcheck} for r in recipe.repositories],
        }, state, "dnf resolve", ResolveError)
        packages = tuple(sorted((LockedPackage(
            name=p["name"], version=_evr(p["epoch"], p["ver"], p["rel"]), arch=p["arch"], size=p["size"],
            sha256=p["sha256"], filename=p["location"], repository=p["repo"],
            epoch=p["epoch"], ver=p["ver"], rel=p["rel"]) for p in doc["packages"]),
            key=lambda p: (p.name, p.arch)))
        repos = doc["repos"]
        return Lock(
            recipe=recipe.name, inputs_digest=recipe.resolve_digest(), distro=recipe.distro, release=recipe.release,
            arch=recipe.arch, source_date_epoch=max(r["timestamp"] for r in repos.values()),
            repositories=tuple(LockedRepository(name=r.name, url=r.url, suite="", components=(),
                                                release_sha256=repos[r.name]["sha256"])
                               for r in recipe.repositories),
            packages=packages, request=tuple(request),
        )

    # ----------------------------------------------------------------- install
    def install(self, lock: Lock, files: dict[str, Path], root: Path, env: dict[str, str]) -> None:
        keyrings = {r.name: r.keyring for r in self.recipe.repositories}
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
        self._check_installed(lock, root)

    def _check_installed(self, lock: Lock, root: Path) -> None:
        have = {(p.name, p.arch): p for p in self.installed(root)}
        want = {(p.name, p.arch): p for p in lock.packages}
        for key, p in want.items():
            got = have.get(key)
            if got is None or got.version != p.version:
                state = f"installed as {got.version}" if got else "not installed"
                raise BuildError(f"{lock.recipe}: {p.name} {p.version} is {state} in the image after install")
        extra = sorted(f"{n}.{a}" for n, a in have.keys() - want.keys())
        if extra:
            raise BuildError(f"{lock.recipe}: the image's rpm database has packages the lock does not: "
                             f"{', '.join(extra[:5])}")

    def installed(self, root: Path) -> list[InstalledPackage]:
        if not (root / DBPATH.lstrip("/") / "rpmdb.sqlite").is_file():
            return []
        proc = run(["rpm", "--root", str(root), "--dbpath", DBPATH, "-qa", "--qf",
                    r"%{NAME}\t%{ARCH}\t%{EPOCHNUM}\t%{VERSION}\t%{RELEASE}\n"],
                   log=self.log, what="rpm -qa in the image", error=BuildError)
        _tidy_rpmdb(root)      # a reader leaves sqlite's -shm/-wal behind; keep the image as finish() left it
        out = []
        for line in proc.stdout.splitlines():
            name, arch, epoch, ver, rel = line.split("\t")
            out.append(InstalledPackage(name=name, arch=arch, version=_evr(epoch, ver, rel), state="installed"))
        return out

    # ------------------------------------------------------------------ finish
    def finish(self, root: Path) -> None:
        for rel in ("var/cache/dnf", "var/lib/dnf/history.sqlite", "var/lib/dnf/history.sqlite-shm",
                    "var/lib/dnf/history.sqlite-wal", "var/lib/dnf/repos", "var/cache/ldconfig/aux-cache",
                    "var/lib/dbus/machine-id", "etc/hostname", "etc/resolv.conf"):
            p = root / rel
            if p.is_dir() and not p.is_symlink():
                for child in p.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif p.is_file() or p.is_symlink():
                p.unlink()
        logs = root / "var/log"
        for pattern in ("dnf*.log*", "hawkey.log*", "yum.log*"):
            for f in logs.glob(pattern):
                f.unlink()
        for f in (root / DBPATH.lstrip("/")).glob("__db.*"):
            f.unlink()
        _tidy_rpmdb(root)


def _tidy_rpmdb(root: Path) -> None:
    """Checkpoint rpm's sqlite WAL into the database, so no -wal/-shm files stay in the image."""
    db = root / DBPATH.lstrip("/") / "rpmdb.sqlite"
    if not db.is_file():
        return
    if db.with_name(db.name + "-wal").exists() or db.with_name(db.name + "-shm").exists():
        con = sqlite3.connect(str(db))
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
    for suffix in ("-wal", "-shm"):
        f = db.with_name(db.name + suffix)
        if f.exists() and (suffix == "-shm" or f.stat().st_size == 0):
            f.unlink()


# ==========================================================================
# The worker: runs in its own process, with HOME set by the parent.
# ==========================================================================

class _Fail(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class _Collect(logging.Handler):
    """dnf's warnings, kept for error messages (they still reach stderr, the build log)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        sys.stderr.write(record.getMessage() + "\n")


def _one_line(text: str, limit: int = 500) -> str:
    return " | ".join(l.strip() for l in str(text).splitlines() if l.strip())[:limit]


def _problems(text: str) -> str:
    """libsolv's problem report as one line: the reasons, without the headings and bullets."""
    lines = [l.strip().lstrip("-").strip() for l in text.splitlines()]
    reasons = [l for l in lines if l and not re.match(r"^Problem( \d+)?: conflicting requests$", l)]
    return _one_line("\n".join(reasons)) or _one_line(text)


def _add_fetched(base: Any, req: dict[str, Any], packages: list[dict[str, Any]]) -> list[Any]:
    """The fetched package files as dnf package objects of `base`."""
    import dnf.exceptions
    try:
        return list(base.add_remote_rpms([p["path"] for p in packages], strict=True, progress=None))
    except (IOError, dnf.exceptions.Error) as e:
        raise _Fail("build", f"{req['recipe']}: cannot read a fetched package: {_one_line(str(e))}") from None


def _conf(req: dict[str, Any], installroot: Path, work: Path):  # type: ignore[no-untyped-def]
    import dnf.conf
    for d in ("cache", "log", "persist"):
        (work / d).mkdir(parents=True, exist_ok=True)     # hawkey wants its log directory to exist
    installroot.mkdir(parents=True, exist_ok=True)
    conf = dnf.conf.Conf()
    conf.installroot = str(installroot)
    conf.cachedir = str(work / "cache")
    conf.logdir = str(work / "log")
    conf.persistdir = str(work / "persist")
    conf.reposdir = []
    conf.varsdir = []
    conf.pluginpath = []
    conf.pluginconfpath = []
    conf.substitutions["releasever"] = req["releasever"]
    conf.substitutions["basearch"] = req["arch"]
    conf.arch = req["arch"]
    conf.basearch = req["arch"]
    conf.module_platform_id = req["platform"]
    conf.gpgcheck = True
    conf.localpkg_gpgcheck = True
    conf.install_weak_deps = bool(req["install_weak_deps"])
    conf.tsflags = ["nodocs"] if req["nodocs"] else []
    conf.metadata_expire = 0          # check repomd.xml (and its signature) again on every resolve
    conf.skip_if_unavailable = False
    conf.best = True
    conf.assumeyes = True
    return conf


def _repomd_facts(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    stamps = [int(float(e.text)) for e in ET.fromstring(data).iter(f"{_REPO_NS}timestamp") if e.text]
    return {"sha256": hashlib.sha256(data).hexdigest(), "timestamp": max(stamps, default=0)}


def _worker_resolve(req: dict[str, Any]) -> dict[str, Any]:
    import dnf
    import dnf.exceptions
    import hawkey

    state = Path(req["state"])
    warnings = _Collect()
    logging.getLogger("dnf").addHandler(warnings)
    base = dnf.Base(_conf(req, state / "root", state))
    try:
        base.conf.excludepkgs = list(req["exclude"])
        for r in req["repos"]:
            base.repos.add_new_repo(r["name"], base.conf, baseurl=[r["url"]], gpgcheck=True,
                                    repo_gpgcheck=bool(r["repo_gpgcheck"]),
                                    gpgkey=[Path(r["keyring"]).as_uri()], skip_if_unavailable=False)
        for r in req["repos"]:          # one at a time, so a failure names its repository
            try:
                # Expired whatever its age (metadata_expire counts whole seconds): repomd.xml is fetched
                # and its signature checked again; the rest of the cache is reused if it is unchanged.
                base.repos[r["name"]]._repo.expire()
                base.repos[r["name"]].load()
            except dnf.exceptions.RepoError as e:
                detail = re.sub(r"^Failed to download metadata for repo '[^']*': ", "", _one_line(str(e)))
                # dnf logs why each mirror failed (curl's error) before raising a vaguer error
                why = [l.strip()[2:] for m in warnings.messages
                       if m.startswith(f"Errors during downloading metadata for repository '{r['name']}'")
                       for l in m.splitlines()[1:] if l.strip().startswith("- ")]
                if why and why[0] not in detail:
                    detail += f": {why[0]}"
                if "GPG" in detail:
                    detail += f" (keyring {r['keyring']})"
                raise _Fail("resolve", f"repository {r['name']} ({r['url']}): {detail}") from None
        base.fill_sack(load_system_repo=False, load_available_repos=True)
        specs = req["specs"]
        try:
            if any(s.startswith("@") for s in specs):
                base.read_comps(arch_filter=True)
            base.install_specs(specs)
        except dnf.exceptions.MarkingErrors as e:
            missing = list(e.no_match_pkg_specs) + [f"@{g}" for g in e.no_match_group_specs]
            if missing:
                raise _Fail("resolve", f"{req['recipe']}: no package or group matches "
                                       f"{', '.join(missing)} in the recipe's repositories") from None
            raise _Fail("resolve", f"{req['recipe']}: {_one_line(str(e))}") from None
        except dnf.exceptions.Error as e:
            raise _Fail("resolve", f"{req['recipe']}: {_one_line(str(e))}") from None
        try:
            base.resolve(allow_erasing=False)
        except dnf.exceptions.DepsolveError as e:
            raise _Fail("resolve", f"{req['recipe']}: cannot resolve the package set: {_problems(str(e))}") from None
        packages = []
        for p in base.transaction.install_set:
            kind, digest = p.chksum if p.chksum else (None, b"")
            if kind != hawkey.CHKSUM_SHA256:
                name = hawkey.chksum_name(kind) if kind is not None else "no"
                raise _Fail("resolve", f"repository {p.reponame}: {p}: {name} checksum in its metadata; "
                                       "vztt locks sha256 only")
            if p.baseurl:
                raise _Fail("resolve", f"repository {p.reponame}: {p}: location below xml:base {p.baseurl} "
                                       "is not supported")
            packages.append({"name": p.name, "epoch": p.epoch, "ver": p.version, "rel": p.release, "arch": p.arch,
                             "size": p.downloadsize, "sha256": digest.hex(), "location": p.location,
                             "repo": p.reponame})
        if not packages:
            raise _Fail("resolve", f"{req['recipe']}: dnf resolved an empty package set")
        repos = {}
        for r in req["repos"]:
            repomd = Path(base.repos[r["name"]]._repo.getCachedir()) / "repodata" / "repomd.xml"
            repos[r["name"]] = _repomd_facts(repomd)
        return {"packages": packages, "repos": repos}
    finally:
        base.close()


def _worker_install(req: dict[str, Any]) -> dict[str, Any]:
    import dnf
    import dnf.exceptions
    import dnf.yum.rpmtrans

    work, root = Path(req["work"]), Path(req["root"])
    packages = req["packages"]

    # 1. Signatures: each package against a scratch rpmdb that holds only its repository's key.
    by_key: dict[str, list[dict[str, Any]]] = {}
    for p in packages:
        by_key.setdefault(p["keyring"], []).append(p)
    for i, (keyring, group) in enumerate(sorted(by_key.items())):
        vroot = work / f"verify-{i}"
        vroot.mkdir(parents=True, exist_ok=True)
        imp = subprocess.run(["rpmkeys", "--root", str(vroot), "--import", keyring], capture_output=True, text=True)
        if imp.returncode != 0:
            raise _Fail("build", f"rpmkeys --import {keyring}: {_one_line(imp.stderr or imp.stdout)}")
        vb = dnf.Base(_conf(req, vroot, work / "dnf"))
        try:
            vb.fill_sack(load_system_repo=False, load_available_repos=False)
            objs = _add_fetched(vb, req, group)
            for po, p in zip(objs, group):
                code, msg = vb.package_signature_check(po)
                if code != 0:
                    msg = _one_line(msg)
                    if "is not signed" in msg:
                        why = "the package is not signed"
                    elif "Public key" in msg and "not installed" in msg:
                        why = f"signed with a key that is not in keyring {keyring}"
                    else:
                        why = f"{msg or 'the signature does not verify'} (keyring {keyring})"
                    raise _Fail("build", f"{p['nevra']} (repository {p['repository']}): package signature "
                                         f"check failed: {why}")
        finally:
            vb.close()

    # 2. Install into the image, from these files only.
    class Display(dnf.yum.rpmtrans.TransactionDisplay):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.errors: list[str] = []
            self.failed: list[str] = []

        def error(self, message: str) -> None:
            self.errors.append(_one_line(message))

        def scriptout(self, msgs: Any) -> None:
            text = msgs.decode(errors="replace") if isinstance(msgs, bytes) else str(msgs or "")
            sys.stderr.write(text)
            for m in re.finditer(r"%(\w+)\(([^)]+)\) scriptlet failed, ([^\n]+)", text):
                self.failed.append(f"{m.group(2)}: %{m.group(1)} scriptlet failed, {m.group(3).strip()}")

    b = dnf.Base(_conf(req, root, work / "dnf"))
    display = Display()
    try:
        b.fill_sack(load_system_repo=True, load_available_repos=False)
        objs = _add_fetched(b, req, packages)
        for po in objs:
            b.package_install(po, strict=True)
        try:
            b.resolve(allow_erasing=False)
        except dnf.exceptions.DepsolveError as e:
            raise _Fail("build", f"{req['recipe']}: the locked packages do not install together: "
                                 f"{_one_line(str(e))}; re-run `vztt resolve`") from None
        got = {str(p) for p in b.transaction.install_set}
        want = {p["nevra"].replace("-0:", "-") for p in packages}
        if got != want:
            diff = sorted(got ^ want)
            raise _Fail("build", f"{req['recipe']}: dnf would install another set than the lock's: "
                                 f"{', '.join(diff[:5])}")
        try:
            b.do_transaction(display=[display])
        except dnf.exceptions.Error as e:
            problem = display.failed or display.errors or [_one_line(str(e))]
            raise _Fail("build", f"{req['recipe']}: rpm transaction failed: {problem[0]}") from None
        if display.failed or display.errors:
            raise _Fail("build", f"{req['recipe']}: {(display.failed or display.errors)[0]}")
    finally:
        b.close()
    return {"installed": len(packages)}


def _worker_main(argv: list[str]) -> int:
    op, req_path, res_path = argv
    req = json.loads(Path(req_path).read_text())
    try:
        result = {"resolve": _worker_resolve, "install": _worker_install}[op](req)
        code = 0
    except _Fail as e:
        result, code = {"error": {"kind": e.kind, "message": e.message}}, 1
    Path(res_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
