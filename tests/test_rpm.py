"""The dnf backend, through the real command line, against a local EL-like
repository built here with the real tools (tests/rpmrepo.py: rpmbuild,
rpmsign, createrepo_c, gpg). No network, but for the last tests: the same
refusals on the bootable fixture distribution (tests/rpmdist.py, built from
Debian's mirror when its cache is cold).

The test recipe extends the shipped almalinux-9-x86_64-minimal: its
repositories point at the fixture (with the fixture's key) and its
`packages.base` is replaced by what the fixture provides. One full build is
checked by reading the archive; every refusal is one error line, the
documented exit status, and no trace in the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aptrepo import GpgKey, make_gpg_key  # noqa: E402
from conftest import RECIPES, Result, leftovers, one_line_error, run_vztt  # noqa: E402
from minidist import read_archive  # noqa: E402
from sbomcheck import problems  # noqa: E402
from rpmrepo import (  # noqa: E402
    RpmPackage,
    RpmRepo,
    build_rpms,
    busybox_shell,
    export_armored,
    is_static_elf,
    make_rpm_repo,
    sign_rpms,
    tamper_repomd,
)

REQUIRED_TOOLS = ["rpm", "rpmbuild", "rpmsign", "rpmkeys", "createrepo_c", "gpg", "gpgconf", "lz4"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="vztt build needs root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in REQUIRED_TOOLS)
                       or not (Path("/bin/busybox").is_file() and is_static_elf(Path("/bin/busybox"))),
                       reason="needs rpm, createrepo-c, gpg, busybox-static"),
]

EXIT_RECIPE, EXIT_RESOLVE, EXIT_BUILD = 3, 4, 6
NAME = "fixture-el9"
PARENT = "almalinux-9-x86_64-minimal"

GOOD = [
    RpmPackage("filesystem", files={
        **{d: ("dir",) for d in ("/usr", "/usr/bin", "/usr/lib", "/usr/share", "/etc", "/var", "/var/lib",
                                 "/var/log", "/var/cache", "/var/tmp", "/dev", "/run", "/tmp", "/root",
                                 "/proc", "/sys")},
        "/bin": ("symlink", "usr/bin"), "/sbin": ("symlink", "usr/bin"), "/lib": ("symlink", "usr/lib"),
    }, modes={"/proc": 0o555, "/sys": 0o555, "/tmp": 0o1777, "/root": 0o550}),
    RpmPackage("fixture-release", requires=["filesystem"],
               provides=["system-release", "system-release(releasever) = 9"],
               files={"/etc/os-release": 'NAME="vztt fixture"\nID="fixture"\nVERSION_ID="9"\n'}),
    busybox_shell(requires=["filesystem"]),
    # A version constraint: fixapp needs libfix below 2.0, and the repository also has 2.0 (epoch 1).
    RpmPackage("libfix", epoch=1, version="1.0", arch="x86_64", requires=["filesystem"],
               files={"/usr/lib/libfix.so.1": b"\x7fELF fixture 1.0\n"}),
    RpmPackage("libfix", epoch=1, version="2.0", arch="x86_64", requires=["filesystem"],
               files={"/usr/lib/libfix.so.1": b"\x7fELF fixture 2.0\n"}),
    RpmPackage("fixapp", requires=["libfix < 1:2.0"], files={
        "/usr/share/fixapp/data": "app\n", "/usr/share/doc/fixapp/README": "documentation\n"},
        docs=("/usr/share/doc/fixapp/README",)),
    # A virtual provide: fixmailer needs "MTA", which only fixmta provides.
    RpmPackage("fixmta", provides=["MTA"]),
    RpmPackage("fixmailer", requires=["MTA"]),
    # A %post scriptlet (rpmbuild adds its Requires(post): /bin/sh).
    RpmPackage("fixpost", requires=["filesystem"], post='echo "posted $1" > /etc/fixpost.out'),
    # Signed and in the repository, but refused when asked for:
    RpmPackage("fix-failpost", requires=["filesystem"], post="echo failing >&2; exit 3"),
    RpmPackage("fix-failpre", requires=["filesystem"], pre="exit 4", files={"/usr/share/fix-failpre": "x\n"}),
    RpmPackage("fix-broken", requires=["no-such-library >= 2"]),
]
UNSIGNED = [RpmPackage("fix-unsigned")]
OTHER_KEY = [RpmPackage("fix-otherkey")]

BASE = ["system-release", "filesystem", "fixture-shell", "fixapp", "fixmailer", "fixpost"]
EXPECTED = {"filesystem", "fixture-release", "fixture-shell", "libfix", "fixapp", "fixmta", "fixmailer", "fixpost"}


@dataclass
class Fixture:
    repo: RpmRepo
    key: Path          # the good key, armored
    good: GpgKey


@pytest.fixture(scope="module")
def fixture_repo(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    d = tmp_path_factory.mktemp("rpmfix")
    good = make_gpg_key(d / "keys")
    other = make_gpg_key(d / "keys", "untrusted <untrusted@example.invalid>")
    signed = build_rpms(GOOD, d / "rpms")
    sign_rpms(signed, good.home, good.fingerprint)
    unsigned = build_rpms(UNSIGNED, d / "rpms")
    foreign = build_rpms(OTHER_KEY, d / "rpms")
    sign_rpms(foreign, other.home, other.fingerprint)
    repo = make_rpm_repo(d / "repo", signed + unsigned + foreign, good.home, good.fingerprint)
    key = export_armored(good.home, good.fingerprint, d / "fixture.asc")
    return Fixture(repo=repo, key=key, good=good)


@dataclass
class Setup:
    tmp: Path
    recipes: Path
    cache: Path
    packages: Path
    mirror: str

    def vztt(self, *args: str, mirror: str | None = None) -> Result:
        env = {"VZTT_MIRROR_FIXTURE_MIRROR": mirror or self.mirror, "VZTT_PACKAGE_CACHE": str(self.packages)}
        return run_vztt(*args, cache=self.cache, recipes=self.recipes, env=env, timeout=300)

    def recipe(self, include: list[str] = (), base: list[str] = BASE, extra: str = "", name: str = NAME) -> str:
        (self.recipes / f"{name}.toml").write_text(f"""
extends = "{PARENT}"
summary = "vztt dnf fixture"

[packages]
base = {json.dumps(list(base))}
include = {json.dumps(list(include))}

[image]
size = "1G"

[[repositories]]
name = "baseos"
url = "$FIXTURE_MIRROR"
keyring = "fixture.asc"

[[repositories]]
name = "appstream"
enabled = false
{extra}""")
        return name

    @property
    def lock(self) -> Path:
        return self.cache / "locks" / f"{NAME}.lock.json"

    def assert_clean(self, lock: bool = True) -> None:
        found = [str(p) for p in (self.cache / f"{NAME}.plain.tar.lz4", self.cache / f"{NAME}.manifest.json")
                 if p.exists()]
        found += leftovers(self.cache)
        found += [str(p) for p in (self.cache / "state" / NAME).glob("install-*")]
        assert found == []
        if not lock:
            assert not self.lock.exists()
        tmp = self.packages / "tmp"
        assert not tmp.is_dir() or list(tmp.iterdir()) == []


@pytest.fixture
def setup(tmp_path: Path, fixture_repo: Fixture) -> Setup:
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)        # the real EL recipes, which the test recipe extends
    shutil.copyfile(fixture_repo.key, recipes / "keys" / "fixture.asc")
    s = Setup(tmp=tmp_path, recipes=recipes, cache=tmp_path / "cache", packages=tmp_path / "packages",
              mirror=fixture_repo.repo.url)
    s.recipe()
    return s


def fails(result: Result, code: int) -> str:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr}"
    return one_line_error(result)


def rpm_qa(root: Path) -> set[tuple[str, str, str]]:
    out = subprocess.run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-qa", "--qf",
                          r"%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE} %{ARCH}\n"],
                         capture_output=True, text=True, check=True).stdout
    return {tuple(line.split()) for line in out.splitlines()}  # type: ignore[misc]


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    lz4 = subprocess.Popen(["lz4", "-dc", str(archive)], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "--numeric-owner", "-p", "-C", str(dest)], stdin=lz4.stdout, check=True)
    assert lz4.wait() == 0
    return dest


# ==========================================================================
# a full build
# ==========================================================================

def test_build_from_signed_fixture(setup: Setup) -> None:
    r = setup.vztt("build", NAME, "--no-test", "--json")
    assert r.returncode == 0, r.stderr
    lock = json.loads(setup.lock.read_text())
    pkgs = {p["name"]: p for p in lock["packages"]}
    assert set(pkgs) == EXPECTED
    # the version constraint picked libfix 1.0 over the newer 2.0; the epoch is kept apart and in version
    lib = pkgs["libfix"]
    assert (lib["version"], lib["epoch"], lib["ver"], lib["rel"]) == ("1:1.0-1.el9", 1, "1.0", "1.el9")
    assert pkgs["fixapp"]["version"] == "1.0-1.el9" and pkgs["fixapp"]["epoch"] == 0
    assert lib["filename"] == "Packages/l/libfix-1.0-1.el9.x86_64.rpm" and lib["repository"] == "baseos"
    assert all(len(p["sha256"]) == 64 and p["size"] > 0 for p in lock["packages"])
    assert lock["distro"] == "almalinux" and lock["release"] == "9" and lock["arch"] == "x86_64"
    assert lock["repositories"][0]["url"] == "$FIXTURE_MIRROR" and lock["repositories"][0]["release_sha256"]
    assert lock["source_date_epoch"] == 1717200000       # the repomd.xml timestamps

    archive = Path(r.json()["archive"])
    tree = extract(archive, setup.tmp / "tree")
    # rpm's database is in the image where EL expects it, and lists exactly the lock
    assert (tree / "var/lib/rpm/rpmdb.sqlite").is_file()
    assert rpm_qa(tree) == {(p["name"], p["version"], p["arch"]) for p in lock["packages"]}
    manifest = json.loads((setup.cache / f"{NAME}.manifest.json").read_text())
    assert {(p["name"], p["version"], p["arch"]) for p in manifest["packages"]} == \
        {(p["name"], p["version"], p["arch"]) for p in lock["packages"]}

    # Its SBOMs (issue 20): valid for the reference validators; rpm's epoch is a purl qualifier,
    # the License tag and the source rpm come from the image's rpm database.
    assert [problems(setup.cache / f"{NAME}.{s}") for s in ("spdx.json", "cdx.json")] == [[], []]
    bom = {c["name"]: c for c in json.loads((setup.cache / f"{NAME}.cdx.json").read_text())["components"]}
    assert bom["libfix"]["purl"] == "pkg:rpm/almalinux/libfix@1.0-1.el9?arch=x86_64&distro=almalinux-9&epoch=1"
    assert bom["libfix"]["hashes"] == [{"alg": "SHA-256", "content": lib["sha256"]}]
    assert bom["fixapp"]["licenses"] == [{"expression": "MIT"}]
    assert {"name": "vztt:source_package", "value": "fixapp"} in bom["fixapp"]["properties"]

    members = read_archive(archive, ("./etc/fixpost.out", "./etc/os-release")).members
    assert (tree / "etc/fixpost.out").read_text() == "posted 1\n"        # the %post ran, in the image
    assert 'VERSION_ID="9"' in (tree / "etc/os-release").read_text()
    assert os.readlink(tree / "bin") == "usr/bin" and (tree / "usr/bin/busybox").is_file()
    assert (tree / "usr/share/fixapp/data").is_file()
    assert not (tree / "usr/share/doc/fixapp/README").exists()          # tsflags=nodocs
    # no dnf cache, history or logs, no sqlite side files, no key imported into the image
    for rel in ("var/cache/dnf", "var/lib/dnf", "var/log/dnf.log", "var/log/hawkey.log",
                "var/lib/rpm/rpmdb.sqlite-shm", "var/lib/rpm/rpmdb.sqlite-wal"):
        assert f"./{rel}" not in members, rel
    assert not any("gpg-pubkey" in n for n, _, _ in rpm_qa(tree))
    assert leftovers(setup.cache) == []

    # the lock builds again as it is, offline from the package cache, to the same bytes
    again = setup.vztt("build", NAME, "--no-test", "--locked", "--json", mirror="file:///nonexistent")
    assert again.returncode == 0, again.stderr
    assert again.json()["sha256"] == r.json()["sha256"]


PUBLIC_BASEOS = "http://mirror.example.invalid/el/9/BaseOS/x86_64/os"


def test_repo_files_ship_the_public_url(setup: Setup, fixture_repo: Fixture) -> None:
    """The fixture's release package ships no repo file: vztt writes one per repository the
    image keeps, with the shipped URL (image_url), gpgcheck and the key, as dnf reads it.
    Built again from another mirror holding the same repository: the same bytes."""
    path = setup.recipes / f"{NAME}.toml"
    path.write_text(path.read_text().replace('url = "$FIXTURE_MIRROR"\n', 'url = "$FIXTURE_MIRROR"\n'
                                             'image_url = "${FIXTURE_PUBLIC:-$FIXTURE_MIRROR}"\n'))
    copy = setup.tmp / "second-mirror"
    shutil.copytree(fixture_repo.repo.root, copy)
    sha = []
    for mirror in (setup.mirror, f"file://{copy}"):
        r = run_vztt("build", NAME, "--no-test", "--json", cache=setup.cache, recipes=setup.recipes, timeout=300,
                     env={"VZTT_MIRROR_FIXTURE_MIRROR": mirror, "VZTT_MIRROR_FIXTURE_PUBLIC": PUBLIC_BASEOS,
                          "VZTT_PACKAGE_CACHE": str(setup.packages)})
        assert r.returncode == 0, r.stderr
        sha.append(r.json()["sha256"])
    assert sha[0] == sha[1]
    tree = extract(setup.cache / f"{NAME}.plain.tar.lz4", setup.tmp / "tree")
    assert os.listdir(tree / "etc/yum.repos.d") == ["baseos.repo"]          # appstream is disabled
    assert (tree / "etc/pki/rpm-gpg/fixture.asc").read_bytes() == fixture_repo.key.read_bytes()
    # dnf's own configuration parser, on the host, reads what a container's dnf will.
    code = ("import dnf, dnf.conf, sys; c = dnf.conf.Conf(); c.substitutions.update(releasever='9', "
            "basearch='x86_64'); c.reposdir = [sys.argv[1]]; b = dnf.Base(c); b.read_all_repos(); "
            "r = b.repos['baseos']; print(r.baseurl[0], r.enabled, r.gpgcheck, r.repo_gpgcheck, r.gpgkey[0])")
    out = subprocess.run(["/usr/bin/python3", "-c", code, str(tree / "etc/yum.repos.d")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [PUBLIC_BASEOS, "True", "True", "True", "file:///etc/pki/rpm-gpg/fixture.asc"]


# ==========================================================================
# refusals
# ==========================================================================

@pytest.mark.parametrize("package, words", [
    ("fix-unsigned", ["fix-unsigned-1.0-1.el9.noarch", "signature check failed", "not signed"]),
    ("fix-otherkey", ["fix-otherkey-1.0-1.el9.noarch", "signature check failed", "not in keyring", "fixture.asc"]),
    # rpm only warns when %post fails (and skips a package whose %pre fails): the build stops.
    ("fix-failpost", ["fix-failpost-1.0-1.el9.noarch", "%post scriptlet failed", "exit status 3"]),
    ("fix-failpre", ["fix-failpre-1.0-1.el9.noarch", "%prein scriptlet failed", "exit status 4"]),
])
def test_a_bad_package_stops_the_build(setup: Setup, package: str, words: list[str]) -> None:
    """A bad signature or a failing scriptlet: one line naming the package, nothing left behind."""
    setup.recipe(include=[package])
    line = fails(setup.vztt("build", NAME, "--no-test"), EXIT_BUILD)
    assert line.startswith("vztt: build error: ")
    for w in words:
        assert w in line, line
    setup.assert_clean()


def test_tampered_repomd(setup: Setup, fixture_repo: Fixture) -> None:
    copy = setup.tmp / "mirror"
    shutil.copytree(fixture_repo.repo.root, copy)
    tamper_repomd(RpmRepo(copy, None))
    line = fails(setup.vztt("build", NAME, "--no-test", mirror=f"file://{copy}"), EXIT_RESOLVE)
    assert line.startswith("vztt: resolve error: repository baseos ")
    assert str(copy) in line and "signature" in line, line
    setup.assert_clean(lock=False)


def test_tampered_repomd_after_a_good_resolve(setup: Setup, fixture_repo: Fixture) -> None:
    """dnf's metadata cache must not hide a repomd.xml that changed under its signature."""
    copy = setup.tmp / "mirror"
    shutil.copytree(fixture_repo.repo.root, copy)
    assert setup.vztt("resolve", NAME, mirror=f"file://{copy}").returncode == 0
    before = setup.lock.read_bytes()
    tamper_repomd(RpmRepo(copy, None))
    line = fails(setup.vztt("resolve", NAME, mirror=f"file://{copy}"), EXIT_RESOLVE)
    assert "repository baseos" in line and "signature" in line, line
    assert setup.lock.read_bytes() == before
    setup.assert_clean()


def test_repo_gpgcheck_false_relaxes_the_metadata_only(setup: Setup, fixture_repo: Fixture) -> None:
    """repo_gpgcheck = false: a repomd.xml that changed under its signature resolves (the
    setting's whole point: a mirror that does not sign its metadata); packages are still
    signature-checked: an unsigned one stops the build. Against the control, true refuses it."""
    copy = setup.tmp / "mirror"
    shutil.copytree(fixture_repo.repo.root, copy)
    tamper_repomd(RpmRepo(copy, None))
    mirror = f"file://{copy}"
    assert setup.vztt("resolve", NAME, mirror=mirror).returncode == EXIT_RESOLVE           # the control
    recipe = setup.recipes / f"{NAME}.toml"
    recipe.write_text(recipe.read_text().replace('keyring = "fixture.asc"\n',
                                                 'keyring = "fixture.asc"\nrepo_gpgcheck = false\n', 1))
    r = setup.vztt("resolve", NAME, mirror=mirror)
    assert r.returncode == 0, r.stderr
    setup.recipe(include=["fix-unsigned"])
    recipe.write_text(recipe.read_text().replace('keyring = "fixture.asc"\n',
                                                 'keyring = "fixture.asc"\nrepo_gpgcheck = false\n', 1))
    line = fails(setup.vztt("build", NAME, "--no-test", mirror=mirror), EXIT_BUILD)
    assert "fix-unsigned-1.0-1.el9.noarch" in line and "not signed" in line, line
    setup.assert_clean()


def test_missing_dependency(setup: Setup) -> None:
    setup.recipe(include=["fix-broken"])
    line = fails(setup.vztt("build", NAME, "--no-test"), EXIT_RESOLVE)
    assert line.startswith("vztt: resolve error: ")
    assert "no-such-library" in line and "fix-broken" in line, line
    setup.assert_clean(lock=False)


def test_unknown_package(setup: Setup) -> None:
    setup.recipe(include=["no-such-package"])
    line = fails(setup.vztt("build", NAME, "--no-test"), EXIT_RESOLVE)
    assert "no-such-package" in line and NAME in line, line
    setup.assert_clean(lock=False)


def test_el8_is_refused(setup: Setup) -> None:
    path = setup.recipes / f"{NAME}.toml"
    path.write_text(path.read_text().replace(f'extends = "{PARENT}"', f'extends = "{PARENT}"\nrelease = "8"'))
    for command in ("resolve", "build"):
        line = fails(setup.vztt(command, NAME), EXIT_RECIPE)
        assert line.startswith(f"vztt: recipe error: {path}: release: '8'"), line
        assert "BerkeleyDB" in line, line
    setup.assert_clean(lock=False)


def test_shipped_el_recipes_name_their_mirror(setup: Setup) -> None:
    """The real recipes load, and without a mirror variable say which one to set."""
    for name, var in (("centos-stream-9-x86_64-minimal", "CENTOS_MIRROR"),
                      ("almalinux-9-x86_64-minimal", "ALMALINUX_MIRROR"),
                      ("rockylinux-9-x86_64-minimal", "ROCKY_MIRROR")):
        shown = run_vztt("show", name, "--json", cache=setup.cache)
        assert shown.returncode == 0, shown.stderr
        assert shown.json()["settings"]["packages.base"][0] == "system-release"
        line = fails(run_vztt("resolve", name, cache=setup.cache), EXIT_RECIPE)
        assert f"${var} is not set" in line, line


def test_no_el_mirror_host_is_named() -> None:
    """Recipes, code and docs name the EL mirrors through variables only (as test_recipe does for Debian's)."""
    repo = RECIPES.parent
    # Written backwards, so that this test does not name them either.
    hosts = tuple(h[::-1] for h in ("gro.sotnec", "gro.xunilamla", "gro.xunilykcor", "gro.tcejoraprodef"))
    files = [p for d in ("recipes", "vztt", "docs") for p in (repo / d).rglob("*") if p.is_file()]
    files += [repo / "README.md", repo / "Makefile", Path(__file__), Path(__file__).with_name("rpmrepo.py")]
    for p in files:
        if p.suffix in (".gpg", ".pyc") or p.name.startswith("RPM-GPG-KEY-"):
            continue
        text = p.read_text(errors="replace").lower()
        for h in hosts:
            assert h not in text, f"{p} names {h}"


# ==========================================================================
# the bootable fixture (tests/rpmdist.py): each bad input refused at the
# step that can know it, on the shipped EL recipes
# ==========================================================================

# variant -> (exit status, the step that fails, words of the error line)
REFUSALS = {
    "unsigned": (EXIT_BUILD, "install", ["fixture-unsigned-1.0-1.el9.noarch (repository baseos)",
                                         "package signature check failed", "not signed"]),
    "wrong-key": (EXIT_BUILD, "install", ["fixture-wrong-key-1.0-1.el9.noarch (repository baseos)",
                                          "not in keyring", "RPM-GPG-KEY-vztt-fixture"]),
    "bad-signature": (EXIT_BUILD, "install", ["fixture-bad-signature-1.0-1.el9.noarch (repository baseos)",
                                              "package signature check failed", "Signature, key ID", ": BAD"]),
    "failing-pre": (EXIT_BUILD, "install", ["fixture-failing-pre-1.0-1.el9.noarch", "%prein scriptlet failed",
                                            "exit status 4"]),
    "unresolvable": (EXIT_RESOLVE, "resolve", ["fixture-unresolvable", "libvztt-nowhere.so.1()(64bit)"]),
    "bad-repomd-signature": (EXIT_RESOLVE, "resolve", ["repository baseos", "repomd.xml", "signature"]),
}


@pytest.mark.network
@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_the_bootable_fixture_s_bad_inputs_are_refused(kind: str, el_distribution, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each refused with one line naming the package (or repository), the documented
    exit status, at the step that can know it, and no template or half-made file left."""
    from rpmdist import VARIANTS, make_variant
    from test_el_fixture import NAME as EL_FIXTURE, el_recipes
    assert set(REFUSALS) == set(VARIANTS)
    code, step, words = REFUSALS[kind]
    variant = make_variant(el_distribution, kind, tmp_path / "mirror")
    recipes = el_recipes(tmp_path / "recipes", el_distribution.key)
    name = "el9-fixture-bad-x86_64-minimal"
    (recipes / f"{name}.toml").write_text(f'extends = "{EL_FIXTURE}"\n\n[packages]\n'
                                          f'include = {json.dumps([variant.package] if variant.package else [])}\n')
    cache = tmp_path / "cache"
    result = run_vztt("build", name, cache=cache, recipes=recipes, timeout=600,
                      env={"VZTT_MIRROR_FIXTURE_MIRROR": variant.repo.url})
    line = fails(result, code)
    for w in words:
        assert w in line, line
    assert re.search(rf"^  {step} +[\d.]+s +FAILED", result.stderr, re.M), result.stderr
    assert not (cache / f"{name}.plain.tar.lz4").exists() and not (cache / f"{name}.manifest.json").exists()
    assert leftovers(cache) == [] and list((cache / "state" / name).glob("install-*")) == []
    if step == "resolve":
        assert not (cache / "locks" / f"{name}.lock.json").exists()


# ==========================================================================
# a layered template (recipe `base`) through dnf
# ==========================================================================

LAYER = f"{NAME}-post"


def test_dnf_layer_resolves_on_its_base_rpm_database(setup: Setup) -> None:
    setup.recipe(base=[b for b in BASE if b != "fixpost"])
    r = setup.vztt("build", NAME, "--no-test")
    assert r.returncode == 0, r.stderr
    (setup.recipes / f"{LAYER}.toml").write_text(f'base = "{NAME}"\n[packages]\ninclude = ["fixpost"]\n')
    r = setup.vztt("build", LAYER, "--no-test", "--json")
    assert r.returncode == 0, r.stderr
    base = json.loads((setup.cache / f"{NAME}.manifest.json").read_text())
    lock = json.loads((setup.cache / "locks" / f"{LAYER}.lock.json").read_text())
    assert [p["name"] for p in lock["packages"]] == ["fixpost"]          # the base's set is not in it
    assert lock["base"]["build_id"] == base["build_id"]
    tree = extract(Path(r.json()["archive"]), setup.tmp / "layer-tree")
    assert {n for n, _, _ in rpm_qa(tree)} == EXPECTED                   # the base's packages and the layer's
    assert (tree / "etc/fixpost.out").read_text() == "posted 1\n"        # its %post ran, in the image
