"""The dnf worker: one resolve or install job, run by DnfBackend in a process of its own.

    python -m vztt.backend._dnf_worker resolve|install REQUEST.json RESULT.json

It runs with Debian's python3 (the only one with dnf's bindings), PYTHONPATH
pointing at vztt and HOME at a directory whose .rpmmacros sets rpm's database
path and switches off its transaction plugins (see backend/dnf.py, which
writes the request and reads the result). A failure the user should see
comes back as {"error": {"kind": "resolve"|"build", "message": ...}}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vztt.base.proc import run

_REPO_NS = "{http://linux.duke.edu/metadata/repo}"



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


def _checksig(vroot: Path, rpm: str) -> str:
    """rpm's own first verdict against the keys of `vroot`'s database ("Header V4 RSA/SHA256
    Signature, key ID ...: BAD"): dnf says only that it could not open a package whose
    header does not match its signature."""
    out = run(["rpmkeys", "--root", str(vroot), "--checksig", "--verbose", rpm], what=f"rpmkeys --checksig {rpm}",
              env=dict(os.environ), check=False)
    bad = [line.strip() for line in out.stdout.splitlines() if re.search(r": (BAD|NOKEY|NOTTRUSTED)\b", line)]
    return bad[0] if bad else ""


def resolve_job(req: dict[str, Any]) -> dict[str, Any]:
    import dnf
    import dnf.exceptions
    import hawkey

    state = Path(req["state"])
    warnings = _Collect()
    logging.getLogger("dnf").addHandler(warnings)
    # A layer resolves on its base's installed set: a root holding the base's rpm database.
    installed = req.get("installed_root")
    base = dnf.Base(_conf(req, Path(installed) if installed else state / "root", state))
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
        base.fill_sack(load_system_repo=bool(installed), load_available_repos=True)
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
        if not packages and not installed:
            raise _Fail("resolve", f"{req['recipe']}: dnf resolved an empty package set")
        repos = {}
        for r in req["repos"]:
            repomd = Path(base.repos[r["name"]]._repo.getCachedir()) / "repodata" / "repomd.xml"
            repos[r["name"]] = _repomd_facts(repomd)
        return {"packages": packages, "repos": repos}
    finally:
        base.close()
        _stop_gpg_agents(state / "cache")


def _stop_gpg_agents(cachedir: Path) -> None:
    """librepo checks repomd.xml.asc with gpgme in <cachedir>/<repo>-<hash>/pubring, and gpg
    starts a gpg-agent there that would outlive the build (one per repository, per resolve)."""
    for pubring in sorted(cachedir.glob("*/pubring")):
        run(["gpgconf", "--homedir", str(pubring), "--kill", "gpg-agent"], what=f"stopping gpg-agent of {pubring}",
            env=dict(os.environ), check=False)


def install_job(req: dict[str, Any]) -> dict[str, Any]:
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
        # This process's environment as it is: the tool environment with the HOME whose .rpmmacros
        # gives rpm its database path (TOOL_ENV's HOME would not).
        imp = run(["rpmkeys", "--root", str(vroot), "--import", keyring], what=f"rpmkeys --import {keyring}",
                  env=dict(os.environ), check=False)
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
                        verdict = _checksig(vroot, p["path"]) or msg or "the signature does not verify"
                        why = f"{verdict} (keyring {keyring})"
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


def main(argv: list[str]) -> int:
    op, req_path, res_path = argv
    req = json.loads(Path(req_path).read_text())
    try:
        result = {"resolve": resolve_job, "install": install_job}[op](req)
        code = 0
    except _Fail as e:
        result, code = {"error": {"kind": e.kind, "message": e.message}}, 1
    Path(res_path).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
