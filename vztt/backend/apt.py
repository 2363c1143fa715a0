"""The apt backend: Debian and Ubuntu.

Resolution runs the host's apt with a generated configuration against the
template's own state directory (never the host's apt state), as mmdebstrap
and mkosi do: `apt-get update` verifies every Release file with gpgv against
the recipe's keyring and every index against its sha256, then
`apt-get install --print-uris` asks apt's solver for the full set on an empty
system. The lock takes name, version, size, sha256 and pool path from it.

Installation follows mmdebstrap: the Essential closure is unpacked with
`dpkg-deb --fsys-tarfile | tar`, configured by the image's own dpkg in a
chroot, then apt (the host's, with dpkg chrooted into the image) installs
the rest from the fetched files in dependency order. No daemon starts: a
policy-rc.d that says 101 is in place until the end.
"""

from __future__ import annotations

import calendar
import email.utils
import hashlib
import os
import re
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

from vztt.backend import Backend, BaseSystem, InstalledPackage, PackageInfo
from vztt.backend.aptlists import LISTS, SharedRepo, provide, release, shared_repo, shared_resolve_dir
from vztt.backend.debcopyright import declared_licenses
from vztt.base.errors import BuildError, ResolveError
from vztt.base.files import atomic_write
from vztt.base.inroot import clear_in_root, mkdir_in_root, remove_in_root, write_in_root
from vztt.recipe.lock import Lock, LockedPackage, LockedRepository
from vztt.base.proc import PIPE, TOOL_ENV, kill_tree, run, spawn, summarize, tool_env

# Package scripts must not start anything in the image while we build it.
POLICY_RC_D = "#!/bin/sh\n# vztt build: no daemon starts during the build\nexit 101\n"
DPKG_BUILD_CFG = "etc/dpkg/dpkg.cfg.d/zz-vztt-build"
MERGED_USR_DIRS = {"amd64": ("bin", "sbin", "lib", "lib32", "lib64", "libx32"), "arm64": ("bin", "sbin", "lib")}

# A directory in `tar -x -vv --full-time` output (times in UTC with TZ=UTC).
_LISTED_DIR = re.compile(r"^d\S* \S+ +\d+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (.*)/$")
_URI_LINE = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+) SHA256:(?P<sha>[0-9a-f]{64})$")


def archive_name(p: LockedPackage) -> str:
    """The file name apt gives a downloaded package (epoch's colon quoted)."""
    return f"{p.name}_{p.version.replace(':', '%3a')}_{p.arch}.deb"


def _file_uri_path(url: str) -> str:
    """apt prints file URIs as file:/path; compare them as file:/path too."""
    if url.startswith("file:"):
        return "file:/" + url[len("file:"):].lstrip("/")
    return url


# apt's URItoFileName: these characters (and non-printables) are %-quoted, then / becomes _.
_APT_QUOTED = set('\\|{}[]<>"^~_=!@#$%^&*')


def _apt_list_name(url: str, suite: str) -> str:
    """The tail of the name apt gives a repository's InRelease in its lists directory."""
    rest = re.sub(r"^[a-z0-9+.-]+:/*", "", url).rstrip("/") + f"/dists/{suite}/InRelease"
    quoted = "".join(f"%{ord(c):02x}" if c in _APT_QUOTED or not 0x20 < ord(c) < 0x7F else c for c in rest)
    return quoted.replace("/", "_")


class AptBackend(Backend):
    family = "apt"
    package_db = ("var/lib/dpkg/status",)

    # ------------------------------------------------------------------ config
    def _apt_config(self, name: str, status: Path, extra: dict[str, str] | None = None,
                    base: Path | None = None) -> Path:
        """An apt configuration rooted in our state dir (or `base`); returns the file for APT_CONFIG."""
        base = base or self.state_dir / name
        for d in ("state/lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d",
                  "etc/trusted.gpg.d", "etc/sources.list.d", "log"):
            (base / d).mkdir(parents=True, exist_ok=True)
        settings = {
            "Dir": "/",
            "Dir::State": f"{base}/state/",
            "Dir::State::status": str(status),
            "Dir::Etc": f"{base}/etc/",
            "Dir::Etc::SourceList": f"{base}/etc/sources.list",
            "Dir::Etc::SourceParts": f"{base}/etc/sources.list.d/",
            "Dir::Etc::Parts": f"{base}/etc/apt.conf.d/",
            "Dir::Etc::Preferences": f"{base}/etc/preferences",
            "Dir::Etc::PreferencesParts": f"{base}/etc/preferences.d/",
            "Dir::Etc::TrustedParts": f"{base}/etc/trusted.gpg.d/",
            "Dir::Etc::Trusted": f"{base}/etc/trusted.gpg",
            "Dir::Cache": f"{base}/cache/",
            "Dir::Log": f"{base}/log/",
            "APT::Architecture": self.recipe.deb_arch,
            "APT::Architectures": self.recipe.deb_arch,
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Acquire::Languages": "none",
            "Acquire::ForceHash": "SHA256",      # print-uris gives sha256, not md5
            "Acquire::Retries": "3",
            # The keyrings live in our tree, not readable by apt's _apt sandbox user.
            "APT::Sandbox::User": "root",
            "Dpkg::Use-Pty": "false",
            **(extra or {}),
        }
        conf = base / "apt.conf"
        conf.write_text("".join(f'{k} "{v}";\n' for k, v in settings.items()))
        return conf

    def _env(self, conf: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**TOOL_ENV, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive",
                "DEBCONF_NONINTERACTIVE_SEEN": "true", **(extra or {})}

    # ----------------------------------------------------------------- resolve
    def resolve(self, base: BaseSystem | None = None) -> Lock:
        recipe = self.recipe
        if not recipe.repositories:
            raise ResolveError(f"{recipe.path}: repositories: none configured")
        urls = self.base_urls()
        if self.shared_state is None:
            where = self.state_dir / "resolve"
            env = self._resolve_config(where, urls, base)
            self._update(env, urls)
            return self._resolve_in(where, env, urls, base)
        arch = recipe.deb_arch
        repos = [shared_repo(self.shared_state, r.name, urls[r.name], r.suite, r.components, arch, r.keyring)
                 for r in recipe.repositories]
        # Templates with the same repositories resolve in the same directory: the same verified
        # lists, and apt's binary cache of them built once (backend/aptlists.py).
        with shared_resolve_dir(self.shared_state, repos, arch) as where:
            env = self._resolve_config(where, urls, base)
            provide(repos, lambda repo: self._update_repo(repo, urls), where / LISTS)
            return self._resolve_in(where, env, urls, base)

    def release_digests(self) -> dict[str, str] | None:
        """Each repository's InRelease, refreshed and verified in its shared directory (once
        per process, as a resolve would), hashed as the lock's `release_sha256` is."""
        if self.shared_state is None or not self.recipe.repositories:
            return None
        urls = self.base_urls()
        out = {}
        for r in self.recipe.repositories:
            repo = shared_repo(self.shared_state, r.name, urls[r.name], r.suite, r.components, self.recipe.deb_arch,
                               r.keyring)
            data = release(repo, lambda repo: self._update_repo(repo, urls), _apt_list_name(urls[r.name], r.suite))
            if data is None:
                return None
            out[r.name] = hashlib.sha256(data).hexdigest()
        return out

    def _resolve_config(self, where: Path, urls: dict[str, str], base: BaseSystem | None) -> dict[str, str]:
        """apt's configuration in `where` for resolving the recipe (on an empty system, or on a
        layer's base); its environment."""
        status = where / "status"
        status.parent.mkdir(parents=True, exist_ok=True)
        # An empty system; a layer's base: its installed packages, so apt prints what the layer adds or changes.
        atomic_write(status, (base.root / self.package_db[0]).read_bytes() if base else b"")
        conf = self._apt_config("resolve", status, base=where)
        lines = [f"deb [signed-by={r.keyring} arch={self.recipe.deb_arch}] {urls[r.name]} {r.suite} "
                 f"{' '.join(r.components)}" for r in self.recipe.repositories]
        atomic_write(where / "etc" / "sources.list", "\n".join(lines) + "\n")
        return self._env(conf)

    def _resolve_in(self, where: Path, env: dict[str, str], urls: dict[str, str],
                    base: BaseSystem | None) -> Lock:
        recipe = self.recipe
        releases = self._verified_releases(urls, where / LISTS)
        request = list(recipe.include) if base else self._request(env)
        full = self._print_uris(request, env, allow_empty=base is not None) if request else []
        essential: set[str] = set()               # a layer's packages go in through apt, on the base's dpkg
        if base is None:
            essential_req = ["?essential"] + [x for x in request if x == "usr-is-merged"]
            essential = {name for name, *_ in self._print_uris(essential_req, env)}

        by_url = sorted(((_file_uri_path(u), name) for name, u in urls.items()), key=lambda x: -len(x[0]))
        packages = []
        for name, version, arch, size, sha, uri in full:
            uri = _file_uri_path(unquote(uri))
            repo = next((rn for url, rn in by_url if uri.startswith(url + "/")), None)
            if repo is None:
                raise ResolveError(f"{name} {version}: apt offers it from {uri}, which is none of the recipe's repositories")
            repo_url = next(u for u, rn in by_url if rn == repo)
            packages.append(LockedPackage(name=name, version=version, arch=arch, size=size, sha256=sha,
                                          filename=uri[len(repo_url) + 1:], repository=repo,
                                          essential=name in essential))
        return Lock(
            recipe=recipe.name, inputs_digest=recipe.resolve_digest(), distro=recipe.distro, release=recipe.release,
            arch=recipe.deb_arch, source_date_epoch=max([date for date, _ in releases.values()]
                                                        + ([base.source_date_epoch] if base else [])),
            repositories=tuple(LockedRepository(name=r.name, url=r.url, suite=r.suite, components=r.components,
                                                release_sha256=releases[r.name][1]) for r in recipe.repositories),
            packages=tuple(sorted(packages, key=lambda p: p.name)), request=tuple(request),
            base=base.record if base else None,
        )

    def _update(self, env: dict[str, str], urls: dict[str, str]) -> None:
        # --error-on=any: without it a bad signature after an earlier good update is only
        # a warning, and apt goes on with the old lists.
        proc = run(["apt-get", "update", "--error-on=any"], log=self.log, env=env, check=False,
                   what="apt-get update", error=ResolveError)
        if proc.returncode != 0:
            self._update_failed(proc.stdout + proc.stderr, urls)

    def _update_repo(self, repo: SharedRepo, urls: dict[str, str]) -> None:
        """apt-get update of one repository in its shared directory, verified with its keyring alone."""
        status = repo.directory / "status"
        status.write_text("")
        conf = self._apt_config("repo", status, base=repo.directory)
        (repo.directory / "etc" / "sources.list").write_text(repo.source_line + "\n")
        self._update(self._env(conf), urls)

    def _request(self, env: dict[str, str]) -> list[str]:
        r = self.recipe
        base = {"essential": "?essential", "required": "?or(?essential,?priority(required))",
                "important": "?or(?essential,?priority(required),?priority(important))"}[r.priority]
        if r.exclude:
            names = "|".join(re.escape(x) for x in r.exclude)
            base = f"?and({base},?not(?name(^({names})$)))"
        # usr-is-merged keeps apt from choosing usrmerge (a slow conversion) where both exist;
        # older releases (jammy) have neither and are merged by the symlinks alone.
        merged = ["usr-is-merged"] if r.merged_usr and self._known("usr-is-merged", env) else []
        request = [base, "apt"] + merged + list(r.include)
        request += [f"{x}-" for x in r.exclude]      # "name-": must not be installed
        return request

    def _known(self, package: str, env: dict[str, str]) -> bool:
        proc = run(["apt-cache", "show", "--no-all-versions", "--", package], env=env, check=False,
                   what=f"apt-cache show {package}", error=ResolveError)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def _update_failed(self, output: str, urls: dict[str, str]) -> None:
        # apt names the failing index as "<url> <suite> InRelease": match both, since
        # several suites (main, -updates) usually share one mirror URL.
        for r in self.recipe.repositories:
            names = {f"{_file_uri_path(urls[r.name])} {r.suite} ", f"{urls[r.name]} {r.suite} "}
            # An index apt fetched by its own URL (Packages under dists/SUITE/): a hash mismatch.
            names |= {f"{base.rstrip('/')}/dists/{r.suite}/" for base in (_file_uri_path(urls[r.name]), urls[r.name])}
            lines = [l for l in output.splitlines()
                     if l.startswith(("E:", "W:", "Err:")) and any(n in l for n in names)]
            if not lines:
                continue
            culprit = f"repository {r.name} ({urls[r.name]} {r.suite})"
            text = "\n".join(lines)
            if re.search(r"NO_PUBKEY|BADSIG|signatures were invalid|EXPKEYSIG|REVKEYSIG", text):
                raise ResolveError(f"{culprit}: Release signature does not verify with keyring {r.keyring}")
            if "Hash Sum mismatch" in text:
                raise ResolveError(f"{culprit}: an index does not match the signed Release (Hash Sum mismatch): "
                                   "the mirror is inconsistent or was tampered with")
            if "is not signed" in text:
                raise ResolveError(f"{culprit}: Release file is not signed (vztt accepts signed repositories only)")
            raise ResolveError(f"{culprit}: {summarize(text)}")
        raise ResolveError(f"apt-get update: {summarize(output)}")

    def _verified_releases(self, urls: dict[str, str], lists: Path) -> dict[str, tuple[int, str]]:
        """repo -> (Release Date as epoch, sha256 of the InRelease apt verified)."""
        out = {}
        for r in self.recipe.repositories:
            expected = _apt_list_name(urls[r.name], r.suite)
            found = [f for f in lists.glob("*InRelease") if f.name.endswith(expected)]
            if not found:
                raise ResolveError(f"repository {r.name} ({urls[r.name]} {r.suite}): no signed InRelease file "
                                   "(a Release.gpg-only repository is not supported)")
            data = found[0].read_bytes()
            # apt only warns (and skips the index) when a repository has no Packages for the
            # architecture; the solver would then say "Unable to locate package" about the
            # first package asked for, far from the cause.
            archs = re.search(rb"^Architectures: (.+)$", data, re.M)
            offered = archs.group(1).decode().split() if archs else None
            if offered is not None and self.recipe.deb_arch not in offered:
                raise ResolveError(f"repository {r.name} ({urls[r.name]} {r.suite}): no Packages index for "
                                   f"{self.recipe.deb_arch} (the recipe's arch {self.recipe.arch}); its Release "
                                   f"lists {', '.join(offered)}")
            m = re.search(rb"^Date: (.+)$", data, re.M)
            if not m:
                raise ResolveError(f"repository {r.name}: Release file has no Date field")
            date = int(email.utils.parsedate_to_datetime(m.group(1).decode()).timestamp())
            out[r.name] = (date, hashlib.sha256(data).hexdigest())
        return out

    def _print_uris(self, request: list[str], env: dict[str, str],
                    allow_empty: bool = False) -> list[tuple[str, str, str, int, str, str]]:
        # -q, not -qq: -qq hides the "X : Depends: Y but it is not installable" lines of a failure.
        # "--": the names and patterns that follow are never options, whatever they look like.
        proc = run(["apt-get", "install", "--print-uris", "-q", "-y", "--", *request], log=self.log, env=env,
                   check=False, what="apt-get install --print-uris", error=ResolveError)
        if proc.returncode != 0:
                raise ResolveError(f"{self.recipe.name}: cannot resolve the package set: "
                               f"{summarize(proc.stdout + proc.stderr)}")
        out = []
        for line in proc.stdout.splitlines():
            m = _URI_LINE.match(line.strip())
            if not m:
                continue
            stem = m["file"][:-len(".deb")]
            name, version, arch = stem.split("_")
            out.append((name, unquote(version), arch, int(m["size"]), m["sha"], m["uri"]))
        if not out and not allow_empty:
            raise ResolveError(f"{self.recipe.name}: apt resolved an empty package set")
        return out

    # ----------------------------------------------------------------- install
    def _prepare_root(self, root: Path) -> None:
        if self.recipe.merged_usr:
            for d in MERGED_USR_DIRS.get(self.recipe.deb_arch, ("bin", "sbin", "lib")):
                (root / "usr" / d).mkdir(parents=True, exist_ok=True)
                if (root / d).is_symlink() and os.readlink(root / d) in (f"usr/{d}", f"/usr/{d}"):
                    continue              # made by a before-packages hook (an EZ pre-cache script)
                if (root / d).exists() or (root / d).is_symlink():
                    raise BuildError(f"/{d} is in the image before any package (a before-packages hook?): "
                                     f"merged /usr needs it to be a symlink to usr/{d}")
                (root / d).symlink_to(f"usr/{d}")
        for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/cache/apt/archives/partial",
                  "etc/apt/apt.conf.d", "etc/dpkg/dpkg.cfg.d", "usr/sbin", "proc", "dev", "sys", "run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        for f in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
            (root / f).touch()
        (root / "usr/sbin/policy-rc.d").write_text(POLICY_RC_D)
        os.chmod(root / "usr/sbin/policy-rc.d", 0o755)
        # fsync after every file is what makes dpkg slow; the image is scratch until packed.
        (root / DPKG_BUILD_CFG).write_text("force-unsafe-io\n")

    def install(self, lock: Lock, files: dict[str, Path], root: Path, env: dict[str, str],
                after_base: Callable[[], None] | None = None) -> None:
        if lock.base is not None:
            self._prepare_layer(root)
        else:
            self._prepare_root(root)
        archives = root / "var/cache/apt/archives"
        debs: dict[str, Path] = {}
        for p in lock.packages:
            dest = archives / archive_name(p)
            shutil.copyfile(files[p.sha256], dest)
            debs[p.key] = dest
        essential = [p for p in lock.packages if p.essential]
        rest = [p for p in lock.packages if not p.essential]
        script_env = {**TOOL_ENV, "DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true",
                      **env}
        if lock.base is not None:
            # A layer: the base's tree is the base system; its packages go in through apt.
            if after_base:
                after_base()
            self._apt_install(lock, rest, debs, root, script_env)
            self._check_installed(lock, root)
            self._write_sources(root)
            return
        if not essential:
            raise BuildError(f"lock for {lock.recipe}: no Essential packages; re-run `vztt resolve`")

        # 1. Unpack the Essential closure so the image has a dpkg and a shell to configure with.
        #    (Not dpkg-deb --extract: it would replace the merged-/usr symlinks with directories.)
        t0 = time.monotonic()
        # Essential packages do not share files, so they unpack in parallel (tar copes with a
        # directory another tar has just made).
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            listings = list(pool.map(lambda p: self._unpack(debs[p.key], root), essential))
        _settle_shared_dirs(root, listings)
        self.log.write(f"# unpacked {len(essential)} Essential packages in {time.monotonic() - t0:.1f} s")

        # 2. Configure it with the image's own dpkg.
        inside = ["/" + str(debs[p.key].relative_to(root)) for p in essential]
        run(["chroot", str(root), "dpkg", "--install", "--force-depends", *inside], log=self.log, env=script_env,
            what=f"{lock.recipe}: dpkg --install of the Essential packages")
        self.log.write(f"# configured the Essential packages at {time.monotonic() - t0:.1f} s")
        if after_base:
            after_base()

        # 3. The rest through apt's ordering, dpkg chrooted into the image.
        self._apt_install(lock, rest, debs, root, script_env)
        self.log.write(f"# installed the rest at {time.monotonic() - t0:.1f} s")
        self._check_installed(lock, root)
        self._write_sources(root)

    def _apt_install(self, lock: Lock, packages: list[LockedPackage], debs: dict[str, Path], root: Path,
                     script_env: dict[str, str]) -> None:
        """apt installs `packages` (fetched files) in its dependency order, dpkg chrooted into the image."""
        if not packages:
            return
        conf = self._apt_config("install", root / "var/lib/dpkg/status", {
            "Dir::Cache::archives": str(root / "var/cache/apt/archives") + "/",
            "DPkg::Chroot-Directory": str(root),
            "Dir::Etc::SourceList": "/dev/null",
        })
        run(["apt-get", "install", "-y", "--no-download", "-o", "APT::Get::allow-downgrades=false",
             *[str(debs[p.key]) for p in packages]],
            log=self.log, env=self._env(conf, script_env), what=f"{lock.recipe}: apt-get install")

    def _prepare_layer(self, root: Path) -> None:
        """A base's tree (cleaned as a template is) made ready for apt again: its archives
        directory, and no daemon started, no fsync, until finish()."""
        if not (root / "var/lib/dpkg/status").is_file():
            raise BuildError(f"{root}: the base has no dpkg database (var/lib/dpkg/status)")
        # The base's tree may have come from a mirror: the host's apt reads and writes these
        # paths itself, so none may be a link out of the image; nothing is written through one.
        for rel in ("var", "var/cache", "var/cache/apt", "var/cache/apt/archives", "var/lib", "var/lib/dpkg",
                    "var/lib/dpkg/status", "etc", "etc/apt", "etc/apt/sources.list"):
            if (root / rel).is_symlink():
                raise BuildError(f"the base's tree: /{rel} is a symlink; apt on the host would follow it")
        for rel, text, mode in (("usr/sbin/policy-rc.d", POLICY_RC_D, 0o755), (DPKG_BUILD_CFG, "force-unsafe-io\n", 0o644)):
            write_in_root(root, rel, text.encode(), mode)
        mkdir_in_root(root, "var/cache/apt/archives/partial")

    def _unpack(self, deb: Path, root: Path) -> dict[str, int]:
        """`dpkg-deb --fsys-tarfile DEB | tar -x` into the image; the directories the
        package holds (path relative to the root -> mtime), from tar's listing."""
        what = f"unpack {deb.name}"
        deb_tar = spawn(["dpkg-deb", "--fsys-tarfile", deb], what=what, stdout=PIPE, stderr=PIPE)
        try:
            assert deb_tar.stdout is not None and deb_tar.stderr is not None
            tar = run(["tar", "-x", "-p", "--keep-directory-symlink", "--same-owner", "-vv", "--full-time",
                       "-C", root], what=what, env=tool_env(TZ="UTC"), stdin=deb_tar.stdout, check=False)
            deb_tar.stdout.close()
            err = deb_tar.stderr.read().decode(errors="replace")
            deb_tar.stderr.close()
        except BaseException:
            kill_tree(deb_tar)
            raise
        if deb_tar.wait() != 0 or tar.returncode != 0:
            raise BuildError(f"{what}: {(err + tar.stderr).strip().splitlines()[-1:]}")
        dirs = {}
        for m in map(_LISTED_DIR.match, tar.stdout.splitlines()):
            if m and "\\" not in m[2]:          # a name tar had to escape is left alone
                name = m[2]                      # "./usr/libexec", or "." for the root
                rel = "" if name == "." else name.removeprefix("./")
                dirs[rel] = calendar.timegm(time.strptime(m[1], "%Y-%m-%d %H:%M:%S"))
        return dirs

    def _check_installed(self, lock: Lock, root: Path) -> None:
        have = {(p.name, p.arch): p for p in self.installed(root)}
        for p in lock.packages:
            got = have.get((p.name, p.arch))
            if got is None or got.state != "ii" or got.version != p.version:
                state = f"{got.state} {got.version}" if got else "not installed"
                raise BuildError(f"{lock.recipe}: {p.name} {p.version} is {state} in the image after install")

    def _write_sources(self, root: Path) -> None:
        """apt sources inside the image, so apt works in containers made from it: each
        repository's shipped URL (image_url), not necessarily the one the build used."""
        urls = self.image_urls()
        lines = ["# written by vztt from the recipe's repositories"]
        for r in self.recipe.repositories:
            if r.name in urls and not urls[r.name].startswith("file:"):
                lines.append(f"deb {urls[r.name]} {r.suite} {' '.join(r.components)}")
        write_in_root(root, "etc/apt/sources.list", ("\n".join(lines) + "\n").encode())

    def installed(self, root: Path) -> list[InstalledPackage]:
        proc = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                    "-f=${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Version}\n"],
                   check=False, what="dpkg-query in the image")
        out = []
        for line in proc.stdout.splitlines():
            state, name, arch, version = line.split("\t")
            out.append(InstalledPackage(name=name, arch=arch, version=version, state=state.strip()))
        return out

    def package_info(self, root: Path) -> dict[tuple[str, str], PackageInfo]:
        proc = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                    "-f=${db:Status-Abbrev}\t${Package}\t${Architecture}\t${source:Package}\t${source:Version}\n"],
                   check=False, what="dpkg-query in the image")
        out = {}
        for line in proc.stdout.splitlines():
            state, name, arch, source, source_version = line.split("\t")
            if state.strip() == "ii":
                out[(name, arch)] = PackageInfo(source, source_version, declared_licenses(root, name))
        return out

    # ------------------------------------------------------------------ finish
    def finish(self, root: Path) -> None:
        for rel in ("usr/sbin/policy-rc.d", DPKG_BUILD_CFG, "var/cache/ldconfig/aux-cache",
                    "var/log/dpkg.log", "var/log/alternatives.log", "var/log/bootstrap.log",
                    "var/cache/debconf/config.dat-old", "var/cache/debconf/templates.dat-old",
                    "var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old", "var/lib/dpkg/available-old",
                    "var/lib/dbus/machine-id", "etc/hostname", "etc/resolv.conf"):
            remove_in_root(root, rel)
        for rel in ("var/cache/apt", "var/lib/apt/lists", "var/log/apt"):
            clear_in_root(root, rel, keep=("lock",) if rel == "var/lib/apt/lists" else ())
        mkdir_in_root(root, "var/lib/apt/lists/partial")
        mkdir_in_root(root, "var/cache/apt/archives/partial")


def _settle_shared_dirs(root: Path, listings: list[dict[str, int]]) -> None:
    """The Essential packages are unpacked side by side, so a directory several of them
    ship (usr/libexec: coreutils and dpkg) would keep the time of whichever tar finished
    last. Give it the time of the last of them in lock order, as unpacking them one by
    one would: the same lock, the same bytes. Paths through a symlink are left alone."""
    shipped: Counter[str] = Counter()
    last: dict[str, int] = {}
    for listing in listings:
        shipped.update(listing)
        last.update(listing)
    for rel, mtime in last.items():
        if shipped[rel] < 2:
            continue
        path = root
        for part in rel.split("/") if rel else []:
            path = path / part
            if path.is_symlink():
                break
        else:
            if path.is_dir():
                os.utime(path, (mtime, mtime))
