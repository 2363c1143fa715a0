"""Build signed local rpm repositories for tests, with the real tools.

The rpm counterpart of tests/aptrepo.py: packages made by rpmbuild from a
generated spec, signed by rpmsign with a throwaway gpg key, indexed by
createrepo_c, and repodata/repomd.xml signed with a detached armored
signature (what dnf's repo_gpgcheck verifies). What dnf sees in tests is what
it would see from a real EL mirror. Plain module, no pytest fixtures.

Needs the Debian packages: rpm (rpmbuild, rpmsign), createrepo-c, gpg,
gpg-agent; busybox-static for a fixture /bin/sh (busybox_shell()).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RpmPackage",
    "RpmRepo",
    "build_rpm",
    "build_rpms",
    "rpmbuild_argv",
    "run",
    "busybox_shell",
    "is_static_elf",
    "export_armored",
    "make_rpm_repo",
    "sign_rpms",
    "tamper_repomd",
]

# Fixed build time: the same RpmPackage gives the same payload and header (unsigned).
SOURCE_DATE_EPOCH = 1717200000  # 2024-06-01 00:00:00 UTC
BUSYBOX = Path("/bin/busybox")   # busybox-static: no shared libraries, no dependencies


@dataclass
class RpmPackage:
    """A binary rpm to build with build_rpm()."""

    name: str
    version: str = "1.0"
    release: str = "1.el9"
    epoch: int | None = None
    arch: str = "noarch"               # or "x86_64"
    requires: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    # absolute path -> content (str/bytes), or ("symlink", target), or ("dir",) for an owned directory
    files: dict[str, str | bytes | tuple[str, ...]] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)   # path -> mode (default 0644, 0755 for dirs)
    docs: tuple[str, ...] = ()         # paths (among files) marked %doc: left out with tsflags=nodocs
    pre: str | None = None             # scriptlet bodies (/bin/sh)
    post: str | None = None
    summary: str = "fixture package"

    @property
    def nevra(self) -> str:
        return f"{self.name}-{self.evr}.{self.arch}"

    @property
    def evr(self) -> str:
        e = f"{self.epoch}:" if self.epoch else ""
        return f"{e}{self.version}-{self.release}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.release}.{self.arch}.rpm"


def _spec(pkg: RpmPackage) -> str:
    lines = [
        "%global debug_package %{nil}",
        "%global __os_install_post %{nil}",
        "%global _build_id_links none",
        f"Name: {pkg.name}",
        f"Version: {pkg.version}",
        f"Release: {pkg.release}",
    ]
    if pkg.epoch is not None:
        lines.append(f"Epoch: {pkg.epoch}")
    lines += [
        f"Summary: {pkg.summary}",
        "License: MIT",
        f"BuildArch: {pkg.arch}",
        # Only the dependencies the fixture declares (and rpmbuild's own scriptlet /bin/sh).
        "AutoReqProv: no",
    ]
    lines += [f"Requires: {r}" for r in pkg.requires]
    lines += [f"Provides: {p}" for p in pkg.provides]
    lines += [f"Conflicts: {c}" for c in pkg.conflicts]
    lines += ["", "%description", pkg.summary, "", "%install",
              "cp -a %{_sourcedir}/root/. %{buildroot}/", ""]
    for tag, body in (("pre", pkg.pre), ("post", pkg.post)):
        if body is not None:
            lines += [f"%{tag}", textwrap.dedent(body).strip(), ""]
    lines.append("%files")
    for path, content in sorted(pkg.files.items()):
        mode = pkg.modes.get(path)
        is_dir = isinstance(content, tuple) and content[0] == "dir"
        is_link = isinstance(content, tuple) and content[0] == "symlink"
        attr = "" if is_link else f"%attr({mode if mode is not None else (0o755 if is_dir else 0o644):o},root,root) "
        kind = "%dir " if is_dir else "%doc " if path in pkg.docs else ""
        lines.append(f"{kind}{attr}{path}")
    return "\n".join(lines) + "\n"


def build_rpm(pkg: RpmPackage, outdir: Path) -> Path:
    """rpmbuild pkg into outdir (unsigned); returns the .rpm path."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vztt-rpm-") as tmp:
        top = Path(tmp)
        root = top / "SOURCES" / "root"
        root.mkdir(parents=True)
        for path, content in pkg.files.items():
            if not path.startswith("/"):
                raise ValueError(f"{pkg.name}: file path must be absolute: {path!r}")
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, tuple):
                if content[0] == "symlink":
                    os.symlink(content[1], target)
                else:
                    target.mkdir(exist_ok=True)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)
        spec = top / f"{pkg.name}.spec"
        spec.write_text(_spec(pkg))
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), HOME=str(top), LC_ALL="C")
        run(rpmbuild_argv(spec, top, outdir, payload="w2.xzdio"), env=env)
    out = outdir / pkg.filename
    if not out.is_file():
        raise RuntimeError(f"rpmbuild did not write {out}")
    return out


def rpmbuild_argv(spec: Path, top: Path, outdir: Path, *, payload: str, extra: tuple[str, ...] = ()) -> list[str]:
    """rpmbuild -bb of `spec`, reproducible (build time and mtimes from SOURCE_DATE_EPOCH,
    a fixed build host), the package written as outdir/NAME-VERSION-RELEASE.ARCH.rpm."""
    return ["rpmbuild", "-bb", "--quiet", *extra,
            "--define", f"_topdir {top}",
            "--define", f"_rpmdir {outdir}",
            "--define", "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
            "--define", "_buildhost fixture.invalid",
            "--define", "use_source_date_epoch_as_buildtime 1",
            "--define", "clamp_mtime_to_source_date_epoch 1",
            "--define", f"_binary_payload {payload}",
            str(spec)]


def build_rpms(pkgs: list[RpmPackage], outdir: Path) -> list[Path]:
    return [build_rpm(p, outdir) for p in pkgs]


def is_static_elf(path: Path) -> bool:
    """A 64-bit little-endian ELF without a PT_INTERP header: runs in an image without a libc."""
    import struct
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def busybox_shell(name: str = "fixture-shell", applets: tuple[str, ...] = (
        "sh", "cat", "echo", "ls", "mkdir", "rm", "touch", "chmod", "ln", "grep", "test", "true", "false"),
        **kw) -> RpmPackage:
    """A package providing /bin/sh (and a few applets) from Debian's static busybox.

    Installs below /usr/bin; /bin is the filesystem package's symlink to usr/bin,
    as on EL9. `Provides: /bin/sh` is explicit, as bash's is: rpm does not see a
    file dependency through a directory symlink.
    """
    if not is_static_elf(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is not statically linked (install busybox-static)")
    files: dict[str, str | bytes | tuple[str, ...]] = {"/usr/bin/busybox": BUSYBOX.read_bytes()}
    for a in applets:
        files[f"/usr/bin/{a}"] = ("symlink", "busybox")
    return RpmPackage(name=name, arch="x86_64", files=files, modes={"/usr/bin/busybox": 0o755},
                      provides=["/bin/sh", "/usr/bin/sh"], **kw)


# --------------------------------------------------------------------------
# signing


def export_armored(key_home: Path, fingerprint: str, dest: Path) -> Path:
    """The public key, ASCII-armored: what rpmkeys --import and dnf's gpgkey= take."""
    out = run(["gpg", "--homedir", str(key_home), "--batch", "--armor", "--export", fingerprint],
               env=_gpg_env(key_home)).stdout
    dest.write_text(out)
    return dest


def sign_rpms(rpms: list[Path], key_home: Path, fingerprint: str) -> None:
    """rpmsign --addsign in place (Debian's default %__gpg names a missing gpg2)."""
    try:
        run(["rpmsign", "--define", "__gpg /usr/bin/gpg", "--define", f"_gpg_name {fingerprint}",
              "--define", f"_gpg_path {key_home}", "--addsign", *map(str, rpms)],
             env={**_gpg_env(key_home), "HOME": str(key_home)})
    finally:
        _kill_agent(key_home)


# --------------------------------------------------------------------------
# repositories


@dataclass
class RpmRepo:
    root: Path
    key_home: Path | None

    @property
    def url(self) -> str:
        return "file://" + str(self.root)

    @property
    def repomd(self) -> Path:
        return self.root / "repodata" / "repomd.xml"


def make_rpm_repo(root: Path, rpms: list[Path], key_home: Path | None = None, fingerprint: str = "",
                  revision: int = SOURCE_DATE_EPOCH) -> RpmRepo:
    """Copy rpms into root/Packages/<first letter>/, run createrepo_c, sign repomd.xml."""
    root = Path(root).resolve()
    for rpm in rpms:
        dest = root / "Packages" / rpm.name[0].lower()
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rpm, dest / rpm.name)
    shutil.rmtree(root / "repodata", ignore_errors=True)
    run(["createrepo_c", "--quiet", "--no-database", "--checksum", "sha256", "--general-compress-type", "gz",
          "--revision", str(revision), "--set-timestamp-to-revision", str(root)])
    repo = RpmRepo(root=root, key_home=key_home)
    if key_home is not None:
        sign_repomd(repo, key_home, fingerprint)
    return repo


def sign_repomd(repo: RpmRepo, key_home: Path, fingerprint: str) -> None:
    asc = repo.repomd.with_name("repomd.xml.asc")
    asc.unlink(missing_ok=True)
    try:
        run(["gpg", "--homedir", str(key_home), "--batch", "--yes", "--pinentry-mode", "loopback",
              "--passphrase", "", "--local-user", fingerprint, "--digest-algo", "SHA256",
              "--detach-sign", "--armor", "--output", str(asc), str(repo.repomd)], env=_gpg_env(key_home))
    finally:
        _kill_agent(key_home)
    repo.key_home = key_home


def tamper_repomd(repo: RpmRepo) -> None:
    """Change the signed repomd.xml (its revision), keeping the old signature."""
    text = repo.repomd.read_text()
    start = text.index("<revision>") + len("<revision>")
    end = text.index("</revision>")
    old = text[start:end]
    new = str(int(old) + 1) if old.isdigit() else old + "1"
    repo.repomd.write_text(text[:start] + new + text[end:])


# --------------------------------------------------------------------------


def _gpg_env(home: Path) -> dict[str, str]:
    return dict(os.environ, GNUPGHOME=str(home), LC_ALL="C")


def _kill_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--kill", "all"], env=_gpg_env(home),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run a fixture-making tool; RuntimeError with its command line and the end of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc
