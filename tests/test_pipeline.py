"""The nightly, run for real (issue 20): .gitlab-ci.yml executed end to end by
gitlab-ci-local (tests/gitlabci.py) on this machine's shell, as GitLab's
shell runners run it, against a signed apt repository served by a loopback
nginx (the real Debian 12 packages of the session's build), publishing over
WebDAV to the same nginx with credentials from a netrc CI/CD variable.

Three fixture templates: fx-a and fx-b, and fx-bad, whose smoke check fails
its boot test. The first run: the plan makes one job per template, fx-bad's
job fails, publish puts fx-a and fx-b on the mirror (not fx-bad) under an
index that verifies with the test key. Then the publish job alone, twice:
handed fx-bad's failed build as if it had passed, it refuses (exit 11) and
the mirror is unchanged; cancelled halfway through an upload, it leaves no
file half written and the next publish completes. The second run (fx-bad
dropped from the recipes) rebuilds nothing: `vztt update` says current and
the mirror is not written to.

Time: the builds (about 20 s each here, `--format all`) and one VM boot test
(fx-a only: VM_TEST_TEMPLATES; about 40 s under TCG) are most of it. The
kernel job uses the session's kernel cache (VZTT_KERNEL_CACHE as a CI/CD
variable: `vztt kernel build` finds its build) and skips `vztt kernel check`
(KERNEL_CHECK=false: test_kernel.py runs it); the jobs run the session's
vztt (VZTT, SETUP=true) instead of `make setup` in every job directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from aptrepo import make_gpg_key, make_repo
from conftest import PACKAGE_CACHE, RECIPES, BuiltTemplate
from gitlabci import GCL, GitLabLocal, Run
from minidist import sha256_file, stage_locked_debs
from mirrorkit import Keys, keys, snapshot, web
from vztt.mirror.index import files_of, parse_index
from nginx import DAV_PASSWORD, DAV_USER, Nginx
from sbomcheck import problems
from test_kernel import built_kernel, built_kernel_arm64  # noqa: F401  (the session's kernel cache, both arches)

__all__ = ["built_kernel", "built_kernel_arm64", "keys", "web"]     # fixtures

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(not GCL.exists(), reason="gitlab-ci-local is installed by `make test` (tests/tools)")]

REPO = Path(__file__).resolve().parent.parent
GOOD, BAD = ("fx-a", "fx-b"), "fx-bad"
CHILD = "nightly.gitlab-ci.yml"
FORMATS = "plain,lxc"       # the source format and one of the other hosts' (its parts, SHA256SUMS, LXC's index)

RECIPE = """# A small Debian 12 for the pipeline test: Essential, apt, systemd and iproute2.
distro = "debian"
release = "stable"
version = "12"
summary = "pipeline fixture {name}"

[packages]
priority = "essential"
include = ["systemd-sysv", "iproute2"{extra}]

[[repositories]]
name = "main"
url = "$FIXTURE_MIRROR"
suite = "stable"
components = ["main"]
keyring = "fixture.gpg"

[[files]]
path = "/etc/hosts"
source = "hosts"

[compression]
level = 0

[boot]
network = false      # no ifupdown, sshd or ping here: test_network.py boots templates with a network

[[smoke]]
name = "os-release"
command = "cat /etc/os-release"
output = 'VERSION_ID="12"'
"""
FAILING_SMOKE = """
[[smoke]]
name = "made-to-fail"
command = "echo this template is made to fail its boot test; exit 3"
"""


@dataclass
class Lab:
    gcl: GitLabLocal
    web: Nginx
    keys: Keys
    recipes: Path
    variables: dict[str, str]

    @property
    def mirror(self) -> Path:
        return self.web.dav_root


def _variables(tmp: Path, web: Nginx, keys: Keys, recipes: Path, kernel_cache: Path) -> dict[str, str]:
    signing_key = tmp / "signing-key.asc"          # what a File variable holds: a path
    signing_key.write_bytes(subprocess.run(
        ["gpg", "--homedir", str(keys.home), "--batch", "--pinentry-mode", "loopback", "--passphrase", "",
         "--armor", "--export-secret-keys", keys.publisher], check=True, capture_output=True).stdout)
    netrc = tmp / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {DAV_USER} password {DAV_PASSWORD}\n")
    netrc.chmod(0o600)
    return {
        "VZTT": str(Path(sys.executable).parent / "vztt"), "SETUP": "true",
        "VZTT_RECIPES": str(recipes), "VZTT_PACKAGE_CACHE": str(PACKAGE_CACHE),
        "VZTT_KERNEL_CACHE": str(kernel_cache),
        "VZTT_MIRROR_FIXTURE_MIRROR": web.url("mirror") + "apt",
        "TEMPLATE_MIRROR": web.url("dav"), "TEMPLATE_MIRROR_URL": web.url("dav"),
        "SIGNING_KEY": str(signing_key), "SIGNING_KEY_ID": keys.publisher, "MIRROR_NETRC": str(netrc),
        "KERNEL_CHECK": "false", "VM_TEST_TEMPLATES": "fx-a", "TEMPLATE_FORMATS": FORMATS,
    }


@pytest.fixture(scope="module")
def lab(debian12: BuiltTemplate, built_kernel: Path, built_kernel_arm64: Path, keys: Keys, web: Nginx,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Lab:
    tmp = tmp_path_factory.mktemp("pipeline")
    apt_key = make_gpg_key(tmp / "apt-key")
    debs = stage_locked_debs(debian12.lock, PACKAGE_CACHE, tmp / "debs")
    make_repo(web.mirror_root / "apt", debs, suite="stable", key=apt_key)
    recipes = tmp / "recipes"
    (recipes / "keys").mkdir(parents=True)
    shutil.copyfile(apt_key.keyring, recipes / "keys" / "fixture.gpg")
    shutil.copyfile(RECIPES / "files" / "hosts", recipes / "hosts")
    (recipes / "fx-a.toml").write_text(RECIPE.format(name="fx-a", extra=""))
    (recipes / "fx-b.toml").write_text(RECIPE.format(name="fx-b", extra=', "less"'))
    (recipes / f"{BAD}.toml").write_text(RECIPE.format(name=BAD, extra="") + FAILING_SMOKE)
    variables = _variables(tmp, web, keys, recipes, built_kernel)
    return Lab(GitLabLocal(REPO, tmp, variables), web, keys, recipes, variables)


def _verify_index(lab: Lab, root: Path) -> dict:
    """index.json as a host checks it: gpgv against the publisher's key only."""
    check = subprocess.run(["gpgv", "--keyring", str(lab.keys.trusted), str(root / "index.json.asc"),
                            str(root / "index.json")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return json.loads((root / "index.json").read_text())


def _assert_every_named_file_whole(index: dict, root: Path) -> None:
    for t in index["templates"].values():
        for b in t["builds"]:
            for rec in files_of(b):
                path = root / rec["path"]
                assert path.stat().st_size == rec["size"] and sha256_file(path) == rec["sha256"], path


@pytest.fixture(scope="module")
def first(lab: Lab) -> Run:
    leaked = set(Path("/tmp").glob("gitlab-ci-local-file-variables-*"))
    run = lab.gcl.run()
    assert run.jobs, run.tail()
    assert set(Path("/tmp").glob("gitlab-ci-local-file-variables-*")) == leaked     # no File variable copied out
    return run


def test_plan_makes_one_job_per_template(lab: Lab, first: Run) -> None:
    child = yaml.safe_load((lab.gcl.artifacts("plan") / CHILD).read_text())
    assert sorted(k for k in child if k.startswith("update: ")) == [f"update: {t}" for t in sorted((*GOOD, BAD))]
    ran = {job: state for job, state in first.jobs.items() if job.startswith("update: ")}
    assert ran == {"update: fx-a": "PASS", "update: fx-b": "PASS", f"update: {BAD}": "FAIL"}, first.tail()
    for job in ("plan", "nightly", "kernel", "publish"):
        assert first.jobs.get(job) == "PASS", first.tail()
    bad = lab.gcl.job_log(f"update: {BAD}")
    assert "vztt: check error: fx-bad:" in bad and "made-to-fail" in bad
    assert "nothing to build" in lab.gcl.job_log("kernel")          # the session's kernel, through the cache variable
    assert "kernel check skipped" in lab.gcl.job_log("kernel")


def test_boot_tests_report_as_junit(lab: Lab, first: Run) -> None:
    for template, files in (("fx-a", ["junit-fx-a.xml", "junit-vm-fx-a.xml"]), ("fx-b", ["junit-fx-b.xml"])):
        artifacts = lab.gcl.artifacts(f"update: {template}")
        assert sorted(p.name for p in artifacts.glob("junit-*.xml")) == files
        for name in files:
            suite = ET.parse(artifacts / name).getroot().find("testsuite")
            assert suite is not None and suite.get("failures") == "0" and int(suite.get("tests", "0")) >= 7
    assert "qemu microvm" in (lab.gcl.artifacts("update: fx-a") / "junit-vm-fx-a.xml").read_text()
    bad = lab.gcl.artifacts(f"update: {BAD}") / "cache"
    report = json.loads((bad / f"{BAD}.manifest.json-failed").read_text())["boot_test"]   # for people to read
    assert [c["name"] for c in report["checks"] if c["result"] == "failed"] == ["smoke:made-to-fail"]
    assert not (bad / f"{BAD}.manifest.json").exists() and (bad / "logs" / f"{BAD}.console.log").is_file()


def test_publish_puts_only_what_passed_on_the_mirror(lab: Lab, first: Run) -> None:
    index = _verify_index(lab, lab.mirror)
    assert sorted(index["templates"]) == sorted(GOOD)
    parse_index((lab.mirror / "index.json").read_bytes(), "the pipeline's mirror")      # as pull reads it
    _assert_every_named_file_whole(index, lab.mirror)
    for template in GOOD:
        (build,) = index["templates"][template]["builds"]
        assert build["boot_test"] == "passed" and sorted(build["archives"]) == ["lxc", "plain"]
        assert sorted(build["sbom"]) == ["cyclonedx", "spdx"] and build["host_files"]     # beside the host files
        manifest = json.loads((lab.gcl.artifacts(f"update: {template}") / "cache" /
                               f"{template}.manifest.json").read_text())
        assert build["id"] == manifest["build_id"]
        for kind, rec in build["sbom"].items():
            assert problems(lab.mirror / rec["path"]) == [], kind
    front = (lab.mirror / "index.html").read_text()
    assert 'data-template="fx-a"' in front and 'data-template="fx-b"' in front and BAD not in front
    assert f"vztt create fx-a /vz/private/101 --from {lab.web.url('dav')}" in front


def test_publish_refuses_a_build_that_failed_its_boot_test(lab: Lab, first: Run) -> None:
    """The publish job handed fx-bad's failed build as if it had been promoted (its manifest, which
    says the boot test failed, under the promoted name; archives beside it): exit 11, nothing uploaded."""
    shutil.copyfile(lab.gcl.state / "includes" / "triggers" / "nightly.yml", lab.gcl.clone / CHILD)
    cache = lab.gcl.artifacts(f"update: {BAD}") / "cache"
    failed = cache / f"{BAD}.manifest.json-failed"
    manifest = json.loads(failed.read_text())
    assert manifest["boot_test"]["result"] == "failed"
    handed = [cache / f"{BAD}.manifest.json"] + [cache / a["file"] for a in manifest["archives"].values()]
    shutil.copyfile(failed, handed[0])
    for archive in handed[1:]:             # the archive's bytes do not matter: the refusal comes first
        shutil.copyfile(lab.gcl.artifacts("update: fx-b") / "cache" / archive.name.replace(BAD, "fx-b"), archive)
    before = snapshot(lab.mirror)
    try:
        run = lab.gcl.run("publish", file=CHILD)
    finally:
        for path in handed:
            path.unlink()
    assert run.jobs.get("publish") == "FAIL", run.tail()
    log = lab.gcl.job_log("publish")
    assert "FAIL 11" in run.output and "vztt: publish error: fx-bad: refused: its boot test failed" in log, log
    assert snapshot(lab.mirror) == before


def test_a_cancelled_publish_leaves_nothing_half_written(lab: Lab, first: Run) -> None:
    """SIGTERM to the pipeline once the first archive is on the mirror (as GitLab cancels a job)."""
    shutil.copyfile(lab.gcl.state / "includes" / "triggers" / "nightly.yml", lab.gcl.clone / CHILD)
    target = lab.web.url("dav") + "cancelled/"
    root = lab.web.dav_root / "cancelled"

    def an_archive_is_up() -> bool:
        return any('"MOVE /dav/cancelled/templates/' in line and ".tar.lz4" in line for line in lab.web.access_log())

    cancelled = lab.gcl.run("publish", "--variable", f"TEMPLATE_MIRROR={target}", file=CHILD,
                            cancel_when=an_archive_is_up)
    assert cancelled.returncode != 0 and an_archive_is_up(), cancelled.tail()
    assert not (root / "index.json").exists()                     # cancelled before the commit
    assert [p for p in root.rglob("*") if ".tmp-" in p.name] == []    # no temporary upload left either
    expected = {}
    for template in GOOD:
        m = json.loads((lab.gcl.artifacts(f"update: {template}") / "cache" / f"{template}.manifest.json").read_text())
        expected.update({a["file"]: a["sha256"] for a in m["archives"].values()})
    for path in (p for p in root.rglob("*.tar.lz4")):
        assert sha256_file(path) == expected[path.name], path            # what is there is whole

    again = lab.gcl.run("publish", "--variable", f"TEMPLATE_MIRROR={target}", file=CHILD)
    assert again.jobs.get("publish") == "PASS", again.tail()
    index = _verify_index(lab, root)
    assert sorted(index["templates"]) == sorted(GOOD)
    _assert_every_named_file_whole(index, root)


def test_second_run_rebuilds_nothing(lab: Lab, first: Run) -> None:
    """fx-bad leaves the recipes; everything else is as it was: nothing is built or published."""
    (lab.recipes / f"{BAD}.toml").unlink()
    lab.gcl.set_variables({**lab.variables, "VM_TEST_TEMPLATES": ""})     # booted in the VM the first time
    index_before = (lab.mirror / "index.json").read_bytes()
    requests_before = len(lab.web.access_log())
    second = lab.gcl.run("--no-json-schema-validation")
    assert second.returncode == 0, second.tail()
    child = yaml.safe_load((lab.gcl.artifacts("plan") / CHILD).read_text())
    assert sorted(k for k in child if k.startswith("update: ")) == [f"update: {t}" for t in GOOD]
    for template in GOOD:
        assert second.jobs.get(f"update: {template}") == "PASS", second.tail()
        assert f"{template}: up to date" in lab.gcl.job_log(f"update: {template}")
    assert "already on the mirror" in lab.gcl.job_log("publish")
    assert (lab.mirror / "index.json").read_bytes() == index_before
    written = [l for l in lab.web.access_log()[requests_before:] if '"PUT ' in l or '"MOVE ' in l or '"DELETE ' in l]
    assert written == []
