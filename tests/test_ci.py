"""The CI files (issue 20): .github/workflows/nightly.yml and .gitlab-ci.yml are
renderings of one description (vztt/ci/jobs.py), and the child pipeline
`vztt matrix --format gitlab` writes has one job per template (a layered
template in its base's job). Each file
passes its platform's schema (check-jsonschema's vendored GitHub and GitLab
schemas), and the two platforms' files run the same commands, with the same
caches and artifacts. The pipeline itself runs in tests/test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, one_line_error, run_vztt
from vztt.ci import github, gitlab, jobs
from vztt.kernel import series
from vztt.nightly import MatrixJob, matrix
from vztt.recipe.variables import load

CHECK = Path(sys.executable).parent / "check-jsonschema"


def test_committed_files_are_the_descriptions_rendering() -> None:
    """`make ci` writes them; a change to either by hand (or to jobs.py without `make ci`) fails here."""
    assert (REPO / github.PATH).read_text() == github.workflow()
    assert (REPO / gitlab.PATH).read_text() == gitlab.pipeline()
    check = subprocess.run([sys.executable, "-m", "vztt.ci", "--check"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    # and the rendering follows the description
    later = dataclasses.replace(jobs.NIGHTLY, cron="5 4 * * *")
    assert "5 4 * * *" in github.workflow(later) and github.workflow(later) != github.workflow()


def test_both_files_pass_their_schemas(tmp_path: Path) -> None:
    """One run of the linter (GitLab's schema is slow to apply) over both files and a broken copy."""
    child = tmp_path / "child.yml"
    child.write_text(gitlab.child_pipeline(["debian-12-x86_64-minimal", "almalinux-9-x86_64-minimal",
                                            MatrixJob(["debian-12-aarch64-minimal"], "aarch64", ("arm64",), False),
                                            MatrixJob(["debian-13-aarch64-minimal"], "aarch64", (), True)]))
    broken = tmp_path / "broken.yml"
    broken.write_text(child.read_text().replace("when: always", "when: sometimes", 1))
    r = subprocess.run([str(CHECK), "--builtin-schema", "vendor.gitlab-ci", str(REPO / gitlab.PATH), str(child),
                        str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and "sometimes" in r.stdout, r.stdout + r.stderr
    assert [line for line in r.stdout.splitlines() if ".yml::" in line and "broken.yml::" not in line] == [], r.stdout


def _github_commands() -> list[str]:
    doc = yaml.safe_load((REPO / github.PATH).read_text())
    out = []
    for name in ("kernel", "update", "publish"):
        for step in doc["jobs"][name]["steps"]:
            run = step.get("run", "")
            # a step for the job's template and each of its layers: the command in the loop
            loop = re.fullmatch(r"rc=0; for t in \$\{\{ matrix.template \}\} \$\{\{ matrix.layers \}\}; do (.*?) "
                                r"\|\| \{ s=\$\?; \[ \"\$rc\" != 0 \] \|\| rc=\$s; \}; done; exit \"\$rc\"", run)
            if loop:
                run = re.sub(r"\$t\b", "${{ matrix.template }}", loop.group(1))
            if ".venv/bin/vztt" in run:
                run = re.sub(r"\$\{\{ vars\.(\w+) \|\| '([^']*)' \}\}", r'"${\1:-\2}"', run)   # a default, GitLab's way
                out.append(run.replace(".venv/bin/vztt", "VZTT").replace("${{ matrix.template }}", "T")
                           .replace("${{ matrix.layers }}", "L").replace("${{ vars.", "$").replace(" }}", "").replace("apt-get update -q && ", ""))
    return out


def _gitlab_commands(child: dict) -> list[str]:
    out = []
    for name in ("kernel", "update: T", "publish"):
        for line in child[name]["script"]:
            m = re.search(r"(\$VZTT .*?)(; else|$)", line)
            if m:
                out.append(re.sub(r"\$TEMPLATE\b", "T", m.group(1).replace("$VZTT", "VZTT").replace("$LAYERS", "L")))
    return out


def test_github_and_gitlab_run_the_same_nightly() -> None:
    """Checked on the files, not on the description: the same vztt commands, caches and artifacts."""
    child = yaml.safe_load(gitlab.child_pipeline(["T"], vm=("T",)))
    assert _github_commands() == _gitlab_commands(child)
    flow = yaml.safe_load((REPO / github.PATH).read_text())["jobs"]["update"]["steps"]
    gh_keys = sorted(s["with"]["key"].split("-${{")[0] for s in flow if "actions/cache" in s.get("uses", ""))
    gl_keys = sorted(re.sub(r"-(T|s[0-9a-f]{12}-f[0-9a-f]{12})$", "", c["key"]) for c in child["update: T"]["cache"])
    assert gh_keys == gl_keys == ["vztt-kernel", "vztt-packages", "vztt-template"]
    gh_paths = {p for s in flow if s.get("uses", "").startswith("actions/upload-artifact")
                for p in s["with"]["path"].replace("${{ matrix.template }}", "T").splitlines() if p and "matrix." not in p}
    assert gh_paths == set(child["update: T"]["artifacts"]["paths"])
    assert child["update: T"]["artifacts"]["reports"]["junit"] == ["junit-T.xml", "junit-vm-T.xml"]


def test_a_layer_builds_in_its_base_job() -> None:
    """Both renderings: the layers ride in the base's job, are updated after it, tested, cached
    and handed to publish with it (GitLab by name; GitHub through the matrix entry's keys)."""
    child = yaml.safe_load(gitlab.child_pipeline([["b", "l1", "l2"], "c"], vm=("b",)))
    assert sorted(k for k in child if k.startswith("update: ")) == ["update: b", "update: c"]
    job = child["update: b"]
    assert job["variables"] == {"TEMPLATE": "b", "LAYERS": "l1 l2"}
    assert child["update: c"]["variables"] == {"TEMPLATE": "c", "LAYERS": ""}
    script = "\n".join(job["script"])
    assert "$VZTT update $TEMPLATE $LAYERS" in script
    for t in ("l1", "l2"):
        assert f"$VZTT test {t} --junit junit-{t}.xml" in script and f"--vm --junit junit-vm-{t}.xml" in script
        assert f"cache/{t}.manifest.json" in job["artifacts"]["paths"] and f"junit-{t}.xml" in job["artifacts"]["reports"]["junit"]
        assert f"cache/{t}.*" in job["cache"][[c["key"] for c in job["cache"]].index("vztt-template-b")]["paths"]
    assert [n["job"] for n in child["publish"]["needs"]] == ["update: b", "update: c"]
    # GitHub: the same paths for the layers, from the matrix entry the plan writes
    entry = json.loads(matrix(["b", "l1", "l2", "c"], "github", {"l1": "b", "l2": "l1"}))["include"][0]
    assert entry["template"] == "b" and entry["layers"] == "l1 l2"
    flow = yaml.safe_load((REPO / github.PATH).read_text())["jobs"]["update"]["steps"]
    gh_layer_paths = set()
    for s in flow:
        for key in re.findall(r"\$\{\{ matrix\.((?:cache|artifact)_\w+) \}\}", s.get("with", {}).get("path", "")):
            gh_layer_paths |= set(entry[key].split("\n"))
    gl_layer_paths = {p for c in job["cache"] for p in c["paths"] if "l1" in p or "l2" in p} | \
        {p for p in job["artifacts"]["paths"] if "l1" in p or "l2" in p}
    assert gh_layer_paths == gl_layer_paths


ARM_LABELS = ("self-hosted", "linux", "ARM64", "vztt")


def test_arm64_jobs_run_on_arm64_runners_or_under_emulation() -> None:
    """Issue 21: an arm64 template's job runs on the runners ARM64_RUNNER names (GitHub: its
    matrix entry's runs-on; GitLab: tags), else on the x86_64 ones after `make binfmt`."""
    names = ["debian-12-aarch64-minimal", "debian-12-x86_64-minimal"]
    arch_of = {"debian-12-aarch64-minimal": "aarch64", "debian-12-x86_64-minimal": "x86_64"}
    labelled = jobs.Runners({"aarch64": ARM_LABELS})
    arm, x86 = json.loads(matrix(names, "github", None, arch_of, labelled))["include"]
    assert (arm["template"], arm["arch"], arm["runner"], arm["emulated"]) == \
        ("debian-12-aarch64-minimal", "aarch64", list(ARM_LABELS), False)
    assert (x86["arch"], x86["runner"], x86["emulated"]) == ("x86_64", list(github.RUNNER), False)
    arm, x86 = json.loads(matrix(names, "github", None, arch_of))["include"]
    assert (arm["runner"], arm["emulated"]) == (list(github.RUNNER), True)
    # The workflow: the update job runs where its entry says, `make binfmt` first when emulated
    flow = yaml.safe_load((REPO / github.PATH).read_text())["jobs"]
    assert flow["update"]["runs-on"] == "${{ matrix.runner }}"
    assert flow["kernel"]["runs-on"] == flow["plan"]["runs-on"] == list(github.RUNNER)
    runs = [(s.get("if"), s.get("run")) for s in flow["update"]["steps"] if "run" in s]
    assert runs.index(("matrix.emulated", "make binfmt")) < [r for _, r in runs].index(
        ".venv/bin/vztt update ${{ matrix.template }} ${{ matrix.layers }} --format ${{ vars.TEMPLATE_FORMATS || 'all' }}")
    assert flow["plan"]["steps"][-1]["run"].endswith('--runner "aarch64=${{ vars.ARM64_RUNNER }}"')
    # GitLab: the plan passes ARM64_RUNNER; the child's arm64 job has its tags, or emulates
    plan = yaml.safe_load((REPO / gitlab.PATH).read_text())["plan"]["script"][1]
    assert plan.startswith('$VZTT matrix --format gitlab --runner "aarch64=$ARM64_RUNNER" > ')
    child = yaml.safe_load(matrix(names, "gitlab", None, arch_of, jobs.Runners({"aarch64": ("arm64",)})))
    assert child["update: debian-12-aarch64-minimal"]["tags"] == ["arm64"]
    assert "tags" not in child["update: debian-12-x86_64-minimal"]
    assert not any("binfmt" in line for job in child.values() if isinstance(job, dict) for line in job.get("script", []))
    child = yaml.safe_load(matrix(names, "gitlab", None, arch_of))
    arm_script = child["update: debian-12-aarch64-minimal"]["script"]
    assert "tags" not in child["update: debian-12-aarch64-minimal"]
    assert arm_script.index('test "$rc" != 0 || step make binfmt') < \
        next(i for i, line in enumerate(arm_script) if "$VZTT update" in line)
    assert not any("binfmt" in line for line in child["update: debian-12-x86_64-minimal"]["script"])


def test_vztt_matrix_takes_the_runners_of_an_architecture() -> None:
    r = run_vztt("matrix", "--format", "gitlab", "--runner", "aarch64=arm64, big", "--arch", "aarch64", "--json")
    assert r.returncode == 0, r.stderr
    doc = r.json()
    assert doc["templates"] and all("-aarch64-" in t for t in doc["templates"])
    assert {(e["arch"], tuple(e["runner"]), e["emulated"]) for e in doc["entries"]} == {("aarch64", ("arm64", "big"), False)}
    child = yaml.safe_load(doc["output"])
    assert all(child[f"update: {e['template']}"]["tags"] == ["arm64", "big"] for e in doc["entries"])
    r = run_vztt("matrix", "--runner", "aarch64=", "--json")           # ARM64_RUNNER unset: emulation
    assert r.returncode == 0, r.stderr
    entries = {e["template"]: e for e in r.json()["entries"]}
    assert entries["debian-12-aarch64-minimal"]["emulated"] and entries["debian-12-aarch64-minimal"]["runner"] == []
    assert not entries["debian-12-x86_64-minimal"]["emulated"]
    for bad, says in (("arm64=x", "expected ARCH=LABELS, ARCH one of x86_64, aarch64"),
                      ("aarch64=a;b", "'a;b' is not a runner label")):
        r = run_vztt("matrix", "--runner", bad)
        assert r.returncode == 2 and says in one_line_error(r)


def test_child_pipeline_has_one_job_per_template() -> None:
    r = run_vztt("matrix", "--format", "gitlab", "--json", env={"VM_TEST_TEMPLATES": "debian-12-*"})
    assert r.returncode == 0, r.stderr
    doc = r.json()
    child = yaml.safe_load(doc["output"])
    # one job per template; a layered template in its base's job
    jobs = doc["jobs"]
    assert sorted(n for j in jobs for n in j) == doc["templates"]
    assert sorted(k for k in child if k.startswith("update: ")) == [f"update: {j[0]}" for j in jobs]
    assert [n["job"] for n in child["publish"]["needs"]] == [f"update: {j[0]}" for j in jobs]
    for j in jobs:
        assert child[f"update: {j[0]}"]["variables"]["LAYERS"] == " ".join(j[1:])
    vm = sorted(k for k, job in child.items() if k.startswith("update: ") and any("--vm" in line for line in job["script"]))
    assert vm == [f"update: {j[0]}" for j in jobs if j[0].startswith("debian-12-")]
    # the kernel cache is keyed by what keys the kernel builds: the series and every architecture's fragments
    kdir = REPO / "kernel"
    key = f"vztt-kernel-s{series.series_digest(kdir)[7:19]}-f{series.fragments_digest(kdir)[7:19]}"
    assert child["kernel"]["cache"][0]["key"] == key
    assert all(job["cache"][-1] == {"key": key, "paths": ["cache/kernel"], "policy": "pull"}
               for k, job in child.items() if k.startswith("update: "))


def test_an_empty_mirror_variable_is_unset() -> None:
    """A CI system hands an unset variable over as "" (the workflow's vars.*): not a bad URL."""
    mirrors = load(environ={"VZTT_MIRROR_CENTOS_MIRROR": "", "VZTT_MIRROR_ROCKY_MIRROR": "http://r.example/rocky"},
                   system_file=Path("/nonexistent"), user_file=Path("/nonexistent"))
    assert "CENTOS_MIRROR" not in mirrors.values and mirrors.values["ROCKY_MIRROR"] == "http://r.example/rocky"


@pytest.mark.parametrize("value, plain", [("make setup", True), ("on", False), ("a: b", False), ("*x", False),
                                          ("12", False), ("${{ matrix.template }}", True), ("- x", False)])
def test_yaml_scalars_read_back_as_written(value: str, plain: bool) -> None:
    from vztt.ci.yamltext import dump, scalar
    assert (scalar(value) == value) is plain
    assert yaml.safe_load(dump({"k": value, "l": [value]})) == {"k": value, "l": [value]}
