"""Assembling the fixture's EL packages from the unpacked .debs (rpmdist_table.py
says which files go where) and building each with rpmbuild; the EL 10
flavour's few packages are derived from the EL 9 ones.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rpmdist_debs import Entry, deb_version, matches
from rpmdist_files import (DIST_TAG, FILESYSTEM_DIRS, FILESYSTEM_LINKS, FILESYSTEM_OWNERS, GROUPS, RPM_DBPATH, SUITE,
                           USERS, rpm_macros)
from rpmdist_table import GLOBAL_DROP, PACKAGES, PARTLY_USED, RPM_MACROS_FILE, ElPackage, release_package
from rpmrepo import SOURCE_DATE_EPOCH, rpmbuild_argv, run

# Debian 12's python3, the fixture's own: its .pyc files are the ones the image's python reads.
PYTHON = "/usr/bin/python3"


@dataclass
class Staged:
    pkg: ElPackage
    root: Path
    epoch: str | None
    version: str
    release: str
    entries: dict[str, Entry] = field(default_factory=dict)    # path in the package -> entry

    @property
    def nevra_file(self) -> str:
        return f"{self.pkg.name}-{self.version}-{self.release}.{self.pkg.arch}.rpm"


def _el_evr(deb_version: str) -> tuple[str | None, str, str]:
    """Debian's [epoch:]upstream[-revision] as rpm's epoch, version, release (with the dist tag)."""
    epoch, _, rest = deb_version.rpartition(":") if ":" in deb_version else (None, "", deb_version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    clean = lambda s: re.sub(r"[^A-Za-z0-9._+~^]", ".", s)   # noqa: E731
    return (epoch or None, clean(upstream), f"{clean(revision) if revision else '0'}.{DIST_TAG}")


def _parse_evr(evr: str) -> tuple[str | None, str, str]:
    epoch, _, rest = evr.rpartition(":") if ":" in evr else (None, "", evr)
    version, release = rest.rsplit("-", 1)
    return epoch or None, version, release


def assign(unpacked: dict[str, dict[str, Entry]], xdir: Path, work: Path,
           debs: dict[str, Path]) -> list[Staged]:
    """Move each Debian file into the staging root of the EL package that takes it,
    add the directories above them and the generated files."""
    staged: list[Staged] = []
    for pkg in PACKAGES:
        if pkg.take:
            epoch, version, release = _el_evr(deb_version(debs[pkg.take[0].deb]))
        else:
            assert pkg.evr, pkg.name
            epoch, version, release = _parse_evr(pkg.evr)
        s = Staged(pkg, work / "roots" / pkg.name, epoch, version, release)
        s.root.mkdir(parents=True)
        staged.append(s)
    by_name = {s.pkg.name: s for s in staged}
    _move_deb_files(unpacked, xdir, by_name)
    for s in staged:
        _own_parents(s, unpacked)
        _write_generated(s)
    _special_files(by_name)
    for s in staged:
        _compile_python(s)
    _check_unique(staged)
    return staged


def _owners(unpacked: dict[str, dict[str, Entry]]) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Who takes what: (deb, path) -> EL package for the Takes with patterns (the first
    in table order wins), and deb -> EL package for each .deb's catch-all Take."""
    claimed: dict[tuple[str, str], str] = {}
    catch_all: dict[str, str] = {}
    for pkg in PACKAGES:
        for t in pkg.take:
            if not t.paths:
                if t.deb in catch_all:
                    raise RuntimeError(f"{t.deb}: taken whole by both {catch_all[t.deb]} and {pkg.name}")
                catch_all[t.deb] = pkg.name
                continue
            for path in unpacked[t.deb]:
                if (t.deb, path) not in claimed and matches(path, t.paths):
                    claimed[(t.deb, path)] = pkg.name
    return claimed, catch_all


def _move_deb_files(unpacked: dict[str, dict[str, Entry]], xdir: Path, by_name: dict[str, Staged]) -> None:
    claimed, catch_all = _owners(unpacked)
    unused: list[str] = []
    for deb, entries in unpacked.items():
        files = [p for p, e in entries.items() if e.kind != "dir"]
        # a directory is placed like a file when nothing is below it (an empty directory Debian ships)
        above = {f.rsplit("/", i)[0] for f in files for i in range(1, f.count("/"))}
        empty_dirs = [p for p, e in entries.items() if e.kind == "dir" and p not in above]
        for path in sorted(files + empty_dirs):
            if matches(path, GLOBAL_DROP) or path in FILESYSTEM_DIRS or path in FILESYSTEM_LINKS:
                continue
            owner = claimed.get((deb, path)) or catch_all.get(deb)
            if owner is None:
                if deb not in PARTLY_USED:
                    unused.append(f"{deb}:{path}")
                continue
            s = by_name[owner]
            dest = s.pkg.rename.get(path, path)
            if matches(path, s.pkg.drop) or dest in s.pkg.files:      # left out, or replaced by ours
                continue
            e = entries[path]
            if dest in s.entries:
                if e.kind == "dir" == s.entries[dest].kind:
                    continue
                raise RuntimeError(f"{owner}: {dest} comes from two .debs")
            target = s.root / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if e.kind == "dir":
                target.mkdir(exist_ok=True)
            else:
                os.rename(xdir / deb / path.lstrip("/"), target)
            s.entries[dest] = Entry(e.kind, s.pkg.modes.get(dest, e.mode), e.user, e.group, e.target)
    if unused:
        raise RuntimeError(f"files that no EL package takes: {', '.join(unused[:20])}")


def _own_parents(s: Staged, unpacked: dict[str, dict[str, Entry]]) -> None:
    """The directories above a package's files are its own (with the mode its .debs gave
    them; rpm allows several owners), up to the filesystem package's standard ones."""
    for path in list(s.entries):
        parent = path.rsplit("/", 1)[0]
        while parent and parent not in FILESYSTEM_DIRS and parent not in FILESYSTEM_LINKS:
            if parent not in s.entries:
                src = _unrenamed(s.pkg, parent)
                modes = [unpacked[d][src].mode for d in s.pkg.debs
                         if src in unpacked[d] and unpacked[d][src].kind == "dir"]
                s.entries[parent] = Entry("dir", modes[0] if modes else 0o755, "root", "root")
            parent = parent.rsplit("/", 1)[0]


def _write_generated(s: Staged) -> None:
    for path, content in s.pkg.files.items():
        target = s.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            os.symlink(content[1], target)
            s.entries[path] = Entry("link", 0o777, "root", "root", content[1])
        else:
            target.write_text(content)
            mode = s.pkg.modes.get(path, 0o644)
            os.chmod(target, mode)
            s.entries[path] = Entry("file", mode, "root", "root")
        parent = path.rsplit("/", 1)[0]
        while parent and parent not in FILESYSTEM_DIRS and parent not in FILESYSTEM_LINKS \
                and parent not in s.entries:
            s.entries[parent] = Entry("dir", 0o755, "root", "root")
            parent = parent.rsplit("/", 1)[0]
    for path in s.pkg.dirs:
        (s.root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        user, group = FILESYSTEM_OWNERS.get(path, ("root", "root"))
        s.entries[path] = Entry("dir", s.pkg.modes.get(path, 0o755), user, group)


def _unrenamed(pkg: ElPackage, path: str) -> str:
    back = {v: k for k, v in pkg.rename.items()}
    return back.get(path, path)


def _special_files(by_name: dict[str, Staged]) -> None:
    """Files made from a Debian file at another path."""
    ssh = by_name["openssh-server"]
    debian_config = ssh.root / "usr/share/openssh/sshd_config"
    (ssh.root / "etc/ssh/sshd_config").write_bytes(debian_config.read_bytes())


def _compile_python(s: Staged) -> None:
    """Byte-compile a package's Python modules into __pycache__, as EL's packages ship them
    (Debian makes them at installation, with py3compile): without, every python run in the
    image compiles what it imports. With Debian's python3 (the fixture's), hash-checked:
    the .pyc files do not depend on mtimes."""
    tops = [p for p in s.entries if re.fullmatch(r"/usr/lib/python3(\.\d+)?", p) and s.entries[p].kind == "dir"]
    if not tops:
        return
    before = {p for p in (s.root / "usr/lib").rglob("*")}
    run([PYTHON, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash",
         "-s", str(s.root), "-p", "/", *(str(s.root / t.lstrip("/")) for t in tops)],
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
    for path in sorted({p for p in (s.root / "usr/lib").rglob("*")} - before):
        rel = "/" + str(path.relative_to(s.root))
        s.entries[rel] = Entry("dir" if path.is_dir() else "file", 0o755 if path.is_dir() else 0o644, "root", "root")


def _check_unique(staged: list[Staged]) -> None:
    """No path in two packages, except directories (rpm allows shared ones if they agree)."""
    owner: dict[str, tuple[str, Entry]] = {}
    for s in staged:
        for path, e in s.entries.items():
            if e.kind == "dir" and path in FILESYSTEM_DIRS and s.pkg.name != "filesystem":
                raise RuntimeError(f"{s.pkg.name}: owns {path}, the filesystem package's")
            if path in owner:
                other, oe = owner[path]
                if e.kind == "dir" and oe.kind == "dir":
                    if (oe.mode, oe.user, oe.group) != (e.mode, e.user, e.group):
                        raise RuntimeError(f"{path}: directory in {other} and {s.pkg.name} with other attributes")
                    continue
                raise RuntimeError(f"{path}: in both {other} and {s.pkg.name}")
            owner[path] = (s.pkg.name, e)
            for name in (e.user, e.group):
                if name not in USERS | GROUPS:
                    raise RuntimeError(f"{s.pkg.name}: {path} belongs to {name}, whom setup does not create")


# ==========================================================================
# rpmbuild
# ==========================================================================

def _q(path: str) -> str:
    if '"' in path or "\n" in path:
        raise RuntimeError(f"cannot name {path!r} in a spec file")
    return f'"{path}"'


def _spec(s: Staged) -> str:
    pkg = s.pkg
    src = f"Debian {SUITE}'s {', '.join(pkg.debs)}" if pkg.debs else "files written by tests/rpmdist.py"
    lines = [
        "%global debug_package %{nil}",
        "%global __os_install_post %{nil}",
        "%global __arch_install_post %{nil}",
        "%global __spec_install_post %{nil}",
        "%global _build_id_links none",
        *([f"%global __requires_exclude {pkg.requires_exclude}"] if pkg.requires_exclude else []),
        f"Name: {pkg.name}",
        *([f"Epoch: {s.epoch}"] if s.epoch else []),
        f"Version: {s.version}",
        f"Release: {s.release}",
        f"Summary: {pkg.summary}",
        "License: Distributable (see the Debian package's copyright)",
        f"BuildArch: {pkg.arch}",
    ]
    lines += [f"Requires: {r}" for r in pkg.requires]
    lines += [f"Requires(pre): {r}" for r in pkg.requires_pre]
    lines += [f"Requires(post): {r}" for r in pkg.requires_post]
    lines += [f"Provides: {p}" for p in pkg.provides]
    lines += ["", "%description", f"{pkg.summary}. Built from {src} for vztt's tests.", ""]
    for tag in ("pre", "post", "preun", "postun", "posttrans"):
        body = pkg.scripts.get(tag)
        if body is None:
            continue
        if body.startswith("-p "):
            first, _, rest = body.partition("\n")
            lines += [f"%{tag} {first}", *([rest.rstrip()] if rest else []), ""]
        else:
            lines += [f"%{tag}", body.rstrip(), ""]
    if pkg.spec_extra:
        lines += [pkg.spec_extra.rstrip(), ""]
    lines.append("%files")
    for path in sorted(s.entries):
        e = s.entries[path]
        if e.kind == "link":
            lines.append(f"%attr(-,{e.user},{e.group}) {_q(path)}")
        elif e.kind == "dir":
            lines.append(f"%dir %attr({e.mode:04o},{e.user},{e.group}) {_q(path)}")
        else:
            config = "%config(noreplace) " if path.startswith("/etc/") else ""
            lines.append(f"{config}%attr({e.mode:04o},{e.user},{e.group}) {_q(path)}")
    for path, mode in sorted(pkg.ghost.items()):
        lines.append(f"%ghost %config(noreplace) %attr({mode:04o},root,root) "
                     f"%verify(not md5 size mtime) {_q(path)}")
    return "\n".join(lines) + "\n"


def rpmbuild(s: Staged, work: Path, outdir: Path) -> Path:
    top = work / "rpmbuild" / outdir.name / s.pkg.name
    top.mkdir(parents=True)
    spec = top / f"{s.pkg.name}.spec"
    spec.write_text(_spec(s))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
           "HOME": str(top), "LC_ALL": "C", "TZ": "UTC"}
    run(rpmbuild_argv(spec, top, outdir, payload="w3T1.zstdio", extra=("--noclean", "--define", f"buildroot {s.root}")),
        env=env)
    out = outdir / s.nevra_file
    if not out.is_file():
        raise RuntimeError(f"rpmbuild did not write {out}")
    return out




# ==========================================================================
# The EL 10 flavour: what differs from EL 9 for the one building the image
# ==========================================================================

# The packages an EL 10 system has in another shape: its release package says 10, and
# its rpm keeps the database in /usr/lib/sysimage/rpm (with /var/lib/rpm a symlink to it).
# Everything else is shared; rpm keeps its version (rpm-libs & co. require it exactly).
EL10_PACKAGES = ("rpm", release_package(10).name)


def el10_staged(by_name: dict[str, Staged], work: Path) -> list[Staged]:
    """The EL 10 flavour's packages, derived from the staged EL 9 ones (before rpmbuild,
    which may clean its build roots)."""
    release = release_package(10)
    rel = Staged(release, work / "roots-el10" / release.name, *_parse_evr(release.evr or ""))
    rel.root.mkdir(parents=True)
    _write_generated(rel)

    el9 = by_name["rpm"]
    rpm = Staged(el9.pkg, work / "roots-el10" / "rpm", el9.epoch, el9.version, el9.release,
                 copy.deepcopy(el9.entries))
    shutil.copytree(el9.root, rpm.root, symlinks=True)
    (rpm.root / RPM_MACROS_FILE.lstrip("/")).write_text(rpm_macros(10))
    old, new = RPM_DBPATH[9], RPM_DBPATH[10]
    shutil.rmtree(rpm.root / old.lstrip("/"))
    (rpm.root / new.lstrip("/")).mkdir(parents=True)
    link = os.path.relpath(new, os.path.dirname(old))
    os.symlink(link, rpm.root / old.lstrip("/"))
    rpm.entries[old] = Entry("link", 0o777, "root", "root", link)
    for d in ("/usr/lib/sysimage", new):
        rpm.entries[d] = Entry("dir", 0o755, "root", "root")
    return [rpm, rel]
