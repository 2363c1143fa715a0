"""The boot test (issue #5): templates booted in the container runtime, their
checks, the gate in `vztt build`, `vztt test` and `vztt run`.

The real debian-12 template comes from the session's build (conftest's
`debian12`, which now boots it before promote). Two more full builds make
templates that fail: one with a unit that fails at boot, one with a failing
smoke check. They reuse the debian-12 lock (`--locked`) and the shared package
cache, so they download nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import PACKAGE_CACHE, RECIPES, REPO, BuiltTemplate, Result, leftovers, one_line_error, run_vztt
from vztt.boot import checks as bootchecks, report as bootreport, test as boottest
from vztt.formats.plain import pack_tree
from vztt.base.errors import EXIT_CODES
from vztt.recipe.recipe import RecipeStore
from vztt.boot.runtime import BootError, CheckFailed, RuntimeUnavailable
from vztt.store.templates import TemplateCache

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="booting containers needs root")


# -- helpers -----------------------------------------------------------------------

def slug(name: str) -> str:
    """The start of the runtime container names vztt gives NAME's containers."""
    return boottest.container_name(name, "x").rsplit("-x-", 1)[0] + "-"


def processes_of(name: str, settle: float = 3.0) -> list[str]:
    """Processes in a cgroup of one of NAME's containers (zombies included)."""
    pattern = f"/vztt/{slug(name)}"
    deadline = time.monotonic() + settle
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if pattern in Path(f"/proc/{pid}/cgroup").read_text():
                    found.append(pid)
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def cgroups_of(name: str) -> list[str]:
    found = []
    for top in Path("/sys/fs/cgroup").iterdir():
        for parent, dirs, _ in os.walk(top):
            found += [os.path.join(parent, d) for d in dirs
                      if d.startswith(slug(name)) and os.path.basename(parent) == "vztt"]
    return found


def nothing_left(cache: Path, name: str) -> list[str]:
    """Everything a boot test may leave: mounts, loop devices, scratch and temp
    files (conftest.leftovers), runtime state, processes, cgroups."""
    found = leftovers(cache)
    containers = TemplateCache(cache).containers_dir
    if containers.is_dir():
        found += [str(p) for p in containers.iterdir()]
    found += [f"process {p}" for p in processes_of(name)]
    found += cgroups_of(name)
    return found


def check_rows(stdout: str) -> dict[str, str]:
    """The table `vztt test` prints: check name -> ok / FAIL / -."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("ok", "FAIL", "-") and not line.startswith(" "):
            rows[parts[0]] = parts[1]
    return rows


def junit_cases(path: Path) -> dict[str, str]:
    """testcase name -> passed / failed / skipped."""
    suites = ET.parse(path).getroot()
    assert suites.tag == "testsuites"
    out = {}
    for case in suites.iter("testcase"):
        out[case.get("name")] = ("failed" if case.find("failure") is not None else
                                 "skipped" if case.find("skipped") is not None else "passed")
    return out


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/ with the leaf recipes the failure tests build."""
    d = tmp_path_factory.mktemp("boottest") / "recipes"
    shutil.copytree(RECIPES, d)
    (d / f"{BAD_UNIT}.toml").write_text(BAD_UNIT_RECIPE)
    (d / f"{BAD_SMOKE}.toml").write_text(BAD_SMOKE_RECIPE)
    (d / f"{NO_INIT}.toml").write_text('extends = "debian-12-x86_64-minimal"\n')
    return d


BAD_UNIT = "debian-12-boottest-badunit"
BAD_UNIT_RECIPE = """\
extends = "debian-12-x86_64-minimal"

[[files]]
path = "/etc/systemd/system/vztt-broken.service"
content = \"\"\"
[Unit]
Description=A unit that fails at boot (vztt's boot test fixture)
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo broken on purpose; exit 1'
[Install]
WantedBy=multi-user.target
\"\"\"

[[hooks]]
name = "enable-broken"
run = "systemctl enable vztt-broken.service"
"""

BAD_SMOKE = "debian-12-boottest-badsmoke"
BAD_SMOKE_RECIPE = """\
extends = "debian-12-x86_64-minimal"

[[smoke]]
name = "fails-on-purpose"
command = "echo the wrong answer; exit 3"
output = "the right answer"
"""

NO_INIT = "debian-12-boottest-noinit"


def locked_cache(debian12: BuiltTemplate, cache: Path, name: str) -> None:
    """A cache whose lock for NAME is debian-12's (same packages: --locked downloads nothing)."""
    (cache / "locks").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(debian12.cache / "locks" / f"{debian12.name}.lock.json", cache / "locks" / f"{name}.lock.json")


# -- without booting -------------------------------------------------------------

def test_exit_codes_are_documented_in_step() -> None:
    codes = dict(EXIT_CODES)
    for cls, code in ((BootError, 8), (CheckFailed, 9), (RuntimeUnavailable, 10)):
        assert cls.exit_code == code and code in codes
    readme = (REPO / "README.md").read_text()
    for code in (8, 9, 10):
        assert re.search(rf"^\| {code} \| ", readme, re.M), f"exit status {code} missing from README's table"
    r = run_vztt("--help")
    for code in (8, 9, 10):
        assert re.search(rf"^\s+{code}\s+\S", r.stdout, re.M), r.stdout


def test_boot_settings_are_inherited(recipes: Path, tmp_path: Path) -> None:
    d = tmp_path / "recipes"
    shutil.copytree(recipes, d)
    (d / "mid.toml").write_text('abstract = true\nextends = "debian"\n[boot]\nallowed_failed = ["a.service"]\n')
    (d / "leaf.toml").write_text('extends = "mid"\nrelease = "bookworm"\nversion = "12"\n'
                                 '[boot]\nallowed_failed = ["b-*.service"]\ntimeout = 5\n')
    leaf = RecipeStore(d).load("leaf")
    assert boottest.allowed_failed(leaf) == ["a.service", "b-*.service"]
    assert boottest.boot_timeout(leaf) == 5
    assert boottest.boot_timeout(RecipeStore(d).load("debian-12-x86_64-minimal")) == 60
    ok, detail, _ = bootchecks.check_failed_units(None, ["a.service", "b-x.service"], boottest.allowed_failed(leaf))  # type: ignore[arg-type]
    assert ok and "a.service" in detail
    (d / "leaf.toml").write_text('extends = "mid"\nrelease = "bookworm"\nversion = "12"\n[boot]\ntimeout = "soon"\n')
    r = run_vztt("show", "leaf", recipes=d)
    assert r.returncode == 3 and "boot.timeout" in one_line_error(r)


def test_report_table_and_junit(tmp_path: Path) -> None:
    report = bootreport.Report(name="t", archive="/x/t.plain.tar.lz4", hostname="h", started="2026-01-01T00:00:00+00:00")
    report.checks = [bootreport.Check("boot", "passed", 1.5, "running in 1.50 s"),
                     bootreport.Check("smoke:x", "failed", 0.1, "exit status 3, expected 0", "bad \x1b[1moutput\x00\n"),
                     bootreport.Check("poweroff")]
    report.error_kind, report.error = "check", "1 of 3 checks failed"
    table = bootreport.format_table(report)
    assert re.search(r"^smoke:x\s+FAIL\s+0\.10\s+exit status 3", table, re.M)
    assert "    | bad" in table and re.search(r"^poweroff\s+-", table, re.M)
    path = tmp_path / "out.xml"
    bootreport.write_junit(report, path)
    assert junit_cases(path) == {"boot": "passed", "smoke:x": "failed", "poweroff": "skipped"}
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert "\\x1b" in path.read_text()         # control characters shown, the XML stays well-formed
    assert isinstance(report.exception(), CheckFailed)
    report.error_kind = "boot"
    assert isinstance(report.exception(), BootError)


def test_container_names_are_valid() -> None:
    name = boottest.container_name("debian-12-x86_64-minimal", "test")
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", name) and name.startswith("debian-12-x86-64-minimal-test-")
    assert len(boottest.container_name("a" * 80, "test")) <= 63


# -- the real template ------------------------------------------------------------

@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_build_recorded_a_passed_boot_test(debian12: BuiltTemplate) -> None:
    record = debian12.manifest["boot_test"]
    recipe = RecipeStore(RECIPES).load(debian12.name)
    assert record["result"] == "passed"
    assert [c["name"] for c in record["checks"]] == boottest.check_names(recipe)
    assert all(c["result"] == "passed" for c in record["checks"])
    assert record["seconds"] > 0 and record["ready_seconds"] > 0
    assert "test" in debian12.manifest["steps"]
    assert debian12.build.json()["boot_test"]["result"] == "passed"
    assert not list(debian12.cache.glob("*-failed"))


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_debian12_boots_and_passes_its_checks(debian12: BuiltTemplate, tmp_path: Path) -> None:
    junit = tmp_path / "boot.xml"
    r = run_vztt("test", debian12.name, "--junit", junit, cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names = boottest.check_names(RecipeStore(RECIPES).load(debian12.name))
    assert names[:8] == ["boot", "failed-units", "hostname", "loopback", "network:address", "network:ping",
                         "network:ssh", "package-db"] and names[-1] == "poweroff"
    assert "smoke:os-release" in names
    assert check_rows(r.stdout) == {n: "ok" for n in names}, r.stdout
    assert re.search(r"PASSED, 12 of 12 checks passed", r.stdout), r.stdout
    assert re.search(r"^network:ssh\s+ok\s.*ssh root@192\.0\.2\.2 uname -n: localhost; host key ", r.stdout, re.M)
    assert junit_cases(junit) == {n: "passed" for n in names}
    for step in ("unpack", "boot", "checks", "poweroff"):
        assert re.search(rf"^\s+{step}\s.*\bok\b", r.stderr, re.M), r.stderr
    assert nothing_left(debian12.cache, debian12.name) == []
    assert (debian12.cache / "logs" / f"{debian12.name}.console.log").read_text().strip()


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_json_report(debian12: BuiltTemplate) -> None:
    r = run_vztt("test", debian12.name, "--json", cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["result"] == "passed" and doc["hostname"] == "localhost"
    assert {c["name"]: c["result"] for c in doc["checks"]}["loopback"] == "passed"
    assert 0 < doc["boot_seconds"] <= doc["ready_seconds"] < doc["seconds"]
    print(f"\nboot to passed checks: {doc['ready_seconds']:.2f} s (unpack {doc['unpack_seconds']:.2f} s, "
          f"whole test {doc['seconds']:.2f} s)")
    assert nothing_left(debian12.cache, debian12.name) == []


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_run_prints_and_exits_with_the_commands_status(debian12: BuiltTemplate) -> None:
    r = run_vztt("run", debian12.name, "--", "cat", "/etc/os-release", cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'VERSION_ID="12"' in r.stdout and r.stdout.startswith("PRETTY_NAME=")
    r = run_vztt("run", debian12.name, "--", "sh", "-c", "hostname; exit 7", cache=debian12.cache, timeout=300)
    assert (r.returncode, r.stdout) == (7, "localhost\n"), r.stderr
    assert nothing_left(debian12.cache, debian12.name) == []


def test_run_is_in_a_user_namespace_unless_told_unsafe(debian12: BuiltTemplate) -> None:
    """The container's root is an unprivileged host range (boot.runtime.idmap); only
    --unsafe-no-userns makes it the host's root. Confined either way (seccomp mode 2)."""
    probe = ["--", "sh", "-c", "cat /proc/self/uid_map; grep ^Seccomp: /proc/self/status"]
    r = run_vztt("run", debian12.name, *probe, cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stderr
    uid_map, seccomp = r.stdout.splitlines()
    inside, outside, count = map(int, uid_map.split())
    assert (inside, count) == (0, 65536) and outside >= 65536, r.stdout
    assert seccomp.split() == ["Seccomp:", "2"], r.stdout
    r = run_vztt("run", debian12.name, "--unsafe-no-userns", *probe, cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["0", "0", "4294967295"], r.stdout
    assert "--unsafe-no-userns" in run_vztt("test", "--help").stdout
    assert nothing_left(debian12.cache, debian12.name) == []


def _start_test(cache: Path, name: str) -> subprocess.Popen[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VZTT_")},
           "VZTT_PACKAGE_CACHE": str(PACKAGE_CACHE)}
    return subprocess.Popen([sys.executable, "-m", "vztt", "--cache-dir", str(cache), "test", name],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_boot(proc: subprocess.Popen[str], cache: Path) -> None:
    """Until the container runs (its state file is there), plus a moment."""
    deadline = time.monotonic() + 60
    while not list(TemplateCache(cache).containers_dir.glob("*.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_interrupted_test_leaves_nothing(debian12: BuiltTemplate) -> None:
    proc = _start_test(debian12.cache, debian12.name)
    try:
        _wait_for_boot(proc, debian12.cache)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert nothing_left(debian12.cache, debian12.name) == []


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_killed_test_is_cleaned_up_by_the_next_run(debian12: BuiltTemplate) -> None:
    proc = _start_test(debian12.cache, debian12.name)
    try:
        _wait_for_boot(proc, debian12.cache)
        cgroups = cgroups_of(debian12.name)
        assert cgroups
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    # What the killed run left: its state, scratch directory and cgroups (its
    # mounts went with its mount namespace, its processes with their parent).
    assert list(TemplateCache(debian12.cache).containers_dir.glob("*.json"))
    assert any(".boot." in p for p in leftovers(debian12.cache))
    assert processes_of(debian12.name, settle=10) == []
    r = run_vztt("test", debian12.name, cache=debian12.cache, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert nothing_left(debian12.cache, debian12.name) == []
    assert not any(os.path.exists(c) for c in cgroups)


# -- templates that fail ------------------------------------------------------------

@ROOT
def test_template_without_init_does_not_boot(recipes: Path, tmp_path: Path) -> None:
    """Exit 8: the console log is kept and named; the other checks did not run."""
    cache = tmp_path / "cache"
    cache.mkdir()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('VERSION_ID="12"\n')
    archive = cache / f"{NO_INIT}.plain.tar.lz4"
    packed = pack_tree(tree, archive, 0)
    entry = {"file": archive.name, "format": "plain", "sha256": packed.sha256, "size": packed.size}
    (cache / f"{NO_INIT}.manifest.json").write_text(json.dumps({"name": NO_INIT, "archive": entry,
                                                                  "archives": {"plain": entry}}))
    junit = tmp_path / "boot.xml"
    r = run_vztt("test", NO_INIT, "--junit", junit, cache=cache, recipes=recipes, timeout=120)
    assert r.returncode == 8, r.stdout + r.stderr
    line = one_line_error(r)
    console = cache / "logs" / f"{NO_INIT}.console.log"
    assert line.startswith("vztt: boot error: ") and "cannot execute /sbin/init" in line and str(console) in line
    assert "cannot execute /sbin/init" in console.read_text()
    rows = check_rows(r.stdout)
    assert rows["boot"] == "FAIL" and set(list(rows.values())[1:]) == {"-"}, r.stdout
    cases = junit_cases(junit)
    assert cases["boot"] == "failed" and set(cases.values()) == {"failed", "skipped"}
    assert nothing_left(cache, NO_INIT) == []


def _assert_failed_build(r: Result, cache: Path, name: str, check: str, words: list[str]) -> dict:
    assert r.returncode == 9, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: check error: ") and check in line, line
    for w in words:
        assert w in line or w in r.stderr, (w, r.stderr)
    assert re.search(r"^\s+test\s.*FAILED", r.stderr, re.M), r.stderr
    assert re.search(rf"^{re.escape(check)}\s+FAIL", r.stderr, re.M), r.stderr     # the table
    failed_archive = cache / f"{name}.plain.tar.lz4-failed"
    failed_manifest = cache / f"{name}.manifest.json-failed"
    assert failed_archive.is_file() and str(failed_archive) in line
    doc = json.loads(failed_manifest.read_text())
    assert doc["boot_test"]["result"] == "failed"
    results = {c["name"]: c["result"] for c in doc["boot_test"]["checks"]}
    assert results[check] == "failed" and results["boot"] == "passed" and results["poweroff"] == "passed"
    assert doc["failed_files"] == [failed_archive.name]
    assert doc["archives"]["plain"]["sha256"] == hashlib.sha256(failed_archive.read_bytes()).hexdigest()
    assert nothing_left(cache, name) == []
    return doc


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_build_with_a_failing_unit_is_not_promoted(debian12: BuiltTemplate, recipes: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    locked_cache(debian12, cache, BAD_UNIT)
    r = run_vztt("build", BAD_UNIT, "--locked", cache=cache, recipes=recipes, timeout=600)
    doc = _assert_failed_build(r, cache, BAD_UNIT, "failed-units", ["vztt-broken.service"])
    unit = next(c for c in doc["boot_test"]["checks"] if c["name"] == "failed-units")
    assert "broken on purpose" in unit["output"]        # systemctl status, with the unit's log
    assert not (cache / f"{BAD_UNIT}.plain.tar.lz4").exists() and not (cache / f"{BAD_UNIT}.manifest.json").exists()
    listed = run_vztt("list", "--json", cache=cache, recipes=recipes).json()
    assert not next(x for x in listed if x["name"] == BAD_UNIT)["cached"]

    # The same template, with the unit allowed to fail, passes (`vztt test` on it, put in place by hand).
    os.replace(cache / f"{BAD_UNIT}.plain.tar.lz4-failed", cache / f"{BAD_UNIT}.plain.tar.lz4")
    os.replace(cache / f"{BAD_UNIT}.manifest.json-failed", cache / f"{BAD_UNIT}.manifest.json")
    leaf = recipes / f"{BAD_UNIT}.toml"
    text = leaf.read_text()
    leaf.write_text(text + '\n[boot]\nallowed_failed = ["vztt-broken.*"]\n')
    try:
        t = run_vztt("test", BAD_UNIT, cache=cache, recipes=recipes, timeout=300)
    finally:
        leaf.write_text(text)
    assert t.returncode == 0, t.stdout + t.stderr
    assert re.search(r"^failed-units\s+ok\s.*allowed to fail: vztt-broken.service", t.stdout, re.M), t.stdout
    assert nothing_left(cache, BAD_UNIT) == []


@pytest.mark.network
@pytest.mark.slow
@ROOT
def test_build_with_a_failing_smoke_check_keeps_the_previous_template(debian12: BuiltTemplate, recipes: Path,
                                                                      tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    locked_cache(debian12, cache, BAD_SMOKE)
    # A previous, good template of that name (debian-12's, renamed).
    archive, manifest = cache / f"{BAD_SMOKE}.plain.tar.lz4", cache / f"{BAD_SMOKE}.manifest.json"
    shutil.copyfile(debian12.archive, archive)
    m = dict(debian12.manifest, name=BAD_SMOKE)
    m["archive"] = dict(m["archive"], file=archive.name)
    m["archives"] = {"plain": m["archive"]}
    manifest.write_text(json.dumps(m))
    before = (archive.read_bytes(), manifest.read_bytes())

    r = run_vztt("build", BAD_SMOKE, "--locked", cache=cache, recipes=recipes, timeout=600)
    doc = _assert_failed_build(r, cache, BAD_SMOKE, "smoke:fails-on-purpose", ["output does not match"])
    smoke = next(c for c in doc["boot_test"]["checks"] if c["name"] == "smoke:fails-on-purpose")
    assert smoke["detail"] == "exit status 3, expected 0; output does not match /the right answer/"
    assert "the wrong answer" in smoke["output"]
    assert (archive.read_bytes(), manifest.read_bytes()) == before
    assert not list(cache.glob("*-old"))

    # --no-test: promoted, and the manifest says the test was skipped; the -failed pair goes.
    r = run_vztt("build", BAD_SMOKE, "--locked", "--no-test", "--json", cache=cache, recipes=recipes, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.json()["boot_test"] == {"result": "skipped"}
    assert json.loads(manifest.read_text())["boot_test"] == {"result": "skipped"}
    assert "test" not in json.loads(manifest.read_text())["steps"]
    assert not list(cache.glob("*-failed"))
    assert nothing_left(cache, BAD_SMOKE) == []
