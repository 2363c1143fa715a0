"""The nightly job: status/update/diff against a local repository, the CI
matrix and shards, the workflow file, locks, and builds killed midway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from aptrepo import FakePackage, build_deb, make_gpg_key, make_repo
from conftest import (PACKAGE_CACHE, RECIPES, REPO, BuiltTemplate, Result, leftovers, one_line_error,
                      processes_naming, run_vztt)
from faultkit import Watched, traces
from minidist import stage_locked_debs
from vztt.nightly import matrix, parse_shard, shard
from vztt.base.errors import RecipeError

WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"


# --------------------------------------------------------------------------
# matrix, shards, workflow: no builds
# --------------------------------------------------------------------------

def test_shards_split_deterministically() -> None:
    names = [f"t{i:02d}" for i in range(11)]
    parts = [shard(list(reversed(names)), f"{k}/4") for k in range(1, 5)]
    assert sorted(sum(parts, [])) == names                         # every template once
    assert all(len(p) in (2, 3) for p in parts)
    assert parts == [shard(names, f"{k}/4") for k in range(1, 5)]  # input order does not matter
    for bad in ("0/4", "5/4", "2", "a/b", "1/0"):
        with pytest.raises(RecipeError, match=f"--shard {bad}: expected K/N"):
            parse_shard(bad)


def test_matrix_formats() -> None:
    runner = ["self-hosted", "linux", "x64", "vztt"]
    assert json.loads(matrix(["b", "a"], "github")) == {"include": [
        {"template": t, "arch": "x86_64", "runner": runner, "emulated": False, "layers": ""} for t in ("a", "b")]}
    gitlab = matrix(["b", "a"], "gitlab")          # the child pipeline (tests/test_ci.py checks it further)
    assert '"update: a":' in gitlab and "TEMPLATE: b" in gitlab
    r = run_vztt("matrix", "--format", "github", env={"GITHUB_OUTPUT": "/dev/null"})
    assert r.returncode == 0
    assert "debian-12-x86_64-minimal" in [e["template"] for e in json.loads(r.stdout)["include"]]


def test_arch_is_an_axis_of_list_status_and_shards(tmp_path: Path) -> None:
    """`--arch` picks a runner's architecture before `--shard` splits it; list and status
    show each template's architecture. (Every mirror variable unset here: status says
    `not configured` without resolving, no network.)"""
    import re
    recipes = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes)
    for toml in recipes.glob("*.toml"):
        toml.write_text(re.sub(r"\$[A-Z_]+_MIRROR\b", "$VZTT_TEST_UNSET_MIRROR", toml.read_text()))
    cache = tmp_path / "cache"
    listed = run_vztt("list", "--json", cache=cache, recipes=recipes).json()
    arm = sorted(r["name"] for r in listed if r["arch"] == "aarch64")
    assert arm and "debian-12-aarch64-minimal" in arm and all("-aarch64-" in n for n in arm)
    assert sorted(r["name"] for r in run_vztt("list", "--arch", "aarch64", "--json", cache=cache,
                                              recipes=recipes).json()) == arm
    text = run_vztt("list", "--arch", "aarch64", cache=cache, recipes=recipes).stdout.splitlines()
    assert text[0].split()[:3] == ["NAME", "ARCH", "STATE"] and text[1].split()[1] == "aarch64"
    shares = []
    for k in (1, 2):
        r = run_vztt("status", "--all", "--arch", "aarch64", "--shard", f"{k}/2", "--json", cache=cache,
                     recipes=recipes)
        assert r.returncode == 0, r.stderr
        assert {(s["arch"], s["state"]) for s in r.json()} == {("aarch64", "not configured")}
        shares.append([s["name"] for s in r.json()])
    assert sorted(shares[0] + shares[1]) == arm and not set(shares[0]) & set(shares[1])
    assert shares == [shard(arm, "1/2"), shard(arm, "2/2")]
    line = run_vztt("status", "--all", "--arch", "aarch64", "--shard", "1/2", cache=cache,
                    recipes=recipes).stdout.splitlines()[0]
    assert line.startswith(f"aarch64  {shares[0][0]}: not configured (")
    bad = run_vztt("status", "--all", "--arch", "arm64", cache=cache, recipes=recipes)
    assert bad.returncode == 2 and "'arm64' is not one of 'x86_64', 'aarch64'" in one_line_error(bad)


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run([str(tool), "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True)


def test_workflow_passes_its_linter(tmp_path: Path) -> None:
    ok = _lint(WORKFLOW)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    text = WORKFLOW.read_text()
    assert "vztt matrix --format github" in text and "vztt update" in text and "vztt publish" in text
    assert "vztt kernel check" in text and "--vm --junit" in text   # a Debian kernel update that breaks a patch
    broken = tmp_path / "broken.yml"                                 # the linter can fail
    broken.write_text(text.replace("runs-on:", "runs_on:"))
    assert _lint(broken).returncode != 0


# --------------------------------------------------------------------------
# A local repository of real Debian packages plus one synthetic package
# --------------------------------------------------------------------------

HELLO_1 = FakePackage("hello-fixture", version="1.0", files={"/usr/share/hello-fixture/VERSION": "1.0\n"})
HELLO_2 = FakePackage("hello-fixture", version="2.0", files={"/usr/share/hello-fixture/VERSION": "2.0\n"})

LEAF_A = """extends = "debian"
release = "stable"
version = "12"
[packages]
include = ["hello-fixture"]
[[repositories]]
name = "main"
url = "$FIXTURE_MIRROR"
keyring = "fixture.gpg"
[[repositories]]
name = "updates"
enabled = false
[[repositories]]
name = "security"
enabled = false
"""
LEAF_B = LEAF_A.replace('[packages]\ninclude = ["hello-fixture"]\n', "")


@dataclass
class Fixture:
    root: Path
    repo_root: Path
    recipes: Path
    cache: Path
    debs: list[Path]
    key: object

    def vztt(self, *args: str | os.PathLike[str]) -> Result:
        return run_vztt(*args, cache=self.cache, recipes=self.recipes,
                        env={"VZTT_MIRROR_FIXTURE_MIRROR": f"file://{self.repo_root}"})

    def publish(self, extra: list[Path]) -> None:
        make_repo(self.repo_root, self.debs + extra, suite="stable", key=self.key)  # type: ignore[arg-type]

    def popen(self, *args: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
        env.update(VZTT_PACKAGE_CACHE=str(PACKAGE_CACHE), VZTT_MIRROR_FIXTURE_MIRROR=f"file://{self.repo_root}")
        return subprocess.Popen([sys.executable, "-m", "vztt", "--cache-dir", str(self.cache), "--recipes",
                                 str(self.recipes), *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def fx(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    root = tmp_path_factory.mktemp("nightly")
    key = make_gpg_key(root / "key")
    debs = stage_locked_debs(debian12.lock, PACKAGE_CACHE, root / "debs")
    hello1 = build_deb(HELLO_1, root / "hello1")
    recipes = root / "recipes"
    shutil.copytree(RECIPES, recipes)
    shutil.copyfile(key.keyring, recipes / "keys" / "fixture.gpg")
    (recipes / "fx-a.toml").write_text(LEAF_A)
    (recipes / "fx-b.toml").write_text(LEAF_B)
    f = Fixture(root=root, repo_root=root / "repo", recipes=recipes, cache=root / "cache", debs=debs, key=key)
    f.publish([hello1])
    return f


def _clean(cache: Path) -> None:
    assert leftovers(cache) == []


def _solver_runs(cache: Path) -> int:
    """apt-get install --print-uris runs in the resolve logs since the last call (which removes them)."""
    runs = 0
    for log in (cache / "logs").glob("*.resolve.log"):
        runs += log.read_text(errors="replace").count("$ apt-get install --print-uris")
        log.unlink()
    return runs


@pytest.mark.network
def test_status_update_diff(fx: Fixture) -> None:
    for name in ("fx-a", "fx-b"):
        r = fx.vztt("build", name, "--no-test")
        assert r.returncode == 0, r.stderr
    _solver_runs(fx.cache)
    r = fx.vztt("status", "fx-a", "fx-b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fx-a: current" in r.stdout and "fx-b: current" in r.stdout
    # a no-op status: the Release file is the builds' locks', so the solver is not run
    assert _solver_runs(fx.cache) == 0
    before_b = (fx.cache / "fx-b.manifest.json").read_bytes()

    # A newer hello-fixture reaches the mirror: only fx-a includes it.
    fx.publish([build_deb(HELLO_1, fx.root / "hello1"), build_deb(HELLO_2, fx.root / "hello2")])
    r = fx.vztt("status", "--json", "fx-a", "fx-b")
    assert r.returncode == 2, r.stderr
    assert _solver_runs(fx.cache) > 0              # a new Packages index: a new Release, so they resolve
    states = {s["name"]: s for s in r.json()}
    assert states["fx-a"]["state"] == "outdated" and states["fx-b"]["state"] == "current"
    assert states["fx-a"]["changes"] == [{"name": "hello-fixture", "arch": "all", "old": "1.0", "new": "2.0"}]
    text = fx.vztt("status", "fx-a")
    assert text.returncode == 2 and "~ hello-fixture 1.0 -> 2.0" in text.stdout

    r = fx.vztt("update", "fx-a", "fx-b", "--json")
    assert r.returncode == 0, r.stderr
    done = {u["name"]: u for u in r.json()}
    assert done["fx-a"]["rebuilt"] and not done["fx-b"]["rebuilt"]
    assert "1 package(s) changed" in done["fx-a"]["reasons"][0]
    assert (fx.cache / "fx-b.manifest.json").read_bytes() == before_b      # untouched
    assert done["fx-a"]["build"]["boot_test"]["result"] == "passed"        # update tests before promoting
    assert fx.vztt("status", "fx-a").returncode == 0

    d = fx.vztt("diff", "fx-a", "--json").json()
    assert d["upgraded"] == [{"name": "hello-fixture", "arch": "all", "old": "1.0", "new": "2.0"}]
    assert d["added"] == [] and d["removed"] == []
    assert "plain" in d["sizes"]
    only_one = fx.vztt("diff", "fx-b")
    assert only_one.returncode == 3 and "diff needs two" in one_line_error(only_one)
    _clean(fx.cache)


@pytest.mark.network
def test_status_refreshes_a_shared_repository_once(fx: Fixture) -> None:
    """fx-a and fx-b use the same repository: one `vztt status` over both runs apt-get update once."""
    for log in (fx.cache / "logs").glob("*.resolve.log"):
        log.unlink()
    r = fx.vztt("status", "fx-a", "fx-b")
    assert r.returncode in (0, 2), r.stderr
    updates = sum(log.read_text(errors="replace").count("$ apt-get update")
                  for log in (fx.cache / "logs").glob("*.resolve.log"))
    assert updates == 1, [log.name for log in (fx.cache / "logs").glob("*.resolve.log")]


@pytest.mark.network
def test_two_builds_of_one_template(fx: Fixture) -> None:
    """One builds; the other is refused at once, naming who holds the lock; prune waits for builds."""
    first = fx.popen("build", "fx-b", "--no-test")
    assert first.stderr is not None
    lines = []
    for line in first.stderr:                      # wait until it holds the locks
        lines.append(line)
        if line.strip().startswith(("resolve", "lock")):
            break
    second = fx.vztt("build", "fx-b", "--no-test")
    prune = fx.vztt("prune")
    rest = first.communicate(timeout=600)[1]
    assert first.returncode == 0, "".join(lines) + rest
    assert second.returncode == 7
    assert f"template is busy: being built by pid {first.pid}" in one_line_error(second)
    assert prune.returncode == 7
    assert f"in use by pid {first.pid}" in one_line_error(prune)
    _clean(fx.cache)


@pytest.mark.network
@pytest.mark.parametrize("after,during,delay", [("fetch", "install", 0.0), ("fetch", "install", 5.0),
                                                ("clean", "pack", 0.3)],
                         ids=["start-of-install", "mid-install", "mid-pack"])
def test_sigkill_then_rerun(fx: Fixture, after: str, during: str, delay: float) -> None:
    """SIGKILL during a step; the next run cleans up by itself and the cached template is never corrupt."""
    name = "fx-b"
    cached = fx.cache / f"{name}.plain.tar.lz4"
    if not cached.exists():                         # a previous template of our own, whatever ran before
        r = fx.vztt("build", name, "--no-test")
        assert r.returncode == 0, r.stderr
    good = cached.read_bytes()
    proc = Watched(["--cache-dir", fx.cache, "--recipes", fx.recipes, "build", name, "--no-test", "--locked"],
                   env={"VZTT_MIRROR_FIXTURE_MIRROR": f"file://{fx.repo_root}"})
    proc.wait_step(after)                           # step lines print when a step ends: `during` runs now
    time.sleep(delay)
    proc.signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert during not in proc.steps(), proc.lines   # the kill landed in `during`, not after it
    assert cached.read_bytes() == good              # the previous template is intact
    left = leftovers(fx.cache)
    assert left, "a build killed mid-way left nothing: the kill came too late to test the cleanup"
    r = fx.vztt("build", name, "--no-test", "--locked")
    assert r.returncode == 0, r.stderr
    assert fx.vztt("inspect", cached).returncode == 0
    # Cleaned by that run, not by time: nothing of the killed build is left, nor running.
    assert traces(fx.cache) == []
    assert processes_naming(fx.cache) == []
