"""One line where one line is promised (issue #13): a pull into a cache the user
cannot write, the loser of two creates into one destination, usage errors
(a bad --hostname, an ftp:// mirror, a mistyped command), `--json` on every
command, and the README's exit-code table against the code's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import click
import pytest

from conftest import PACKAGE_CACHE, REPO, BuiltTemplate, Result, one_line_error, run_vztt
from mirrorkit import tiny_template
from vztt.base.errors import EXIT_CODES
from vztt.cli import main as vztt_main

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
TINY = "tiny-1-x86_64"
NOBODY = 65534


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory every user can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="vztt-test-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@ROOT
def test_pull_as_a_user_into_a_root_owned_cache(world_readable: Path) -> None:
    # vztt as an unprivileged user runs: the package copied where that user can read it,
    # with Debian's python3 and its libraries (what the Makefile installs).
    shutil.copytree(REPO / "vztt", world_readable / "src" / "vztt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(world_readable / "src")], check=True)
    cache = world_readable / "cache"
    tiny_template(cache)
    (cache / ".locks").mkdir()
    os.chmod(cache, 0o755)
    os.chmod(cache / ".locks", 0o755)
    keyring = world_readable / "trusted.gpg"        # readable: the cache is what stops it
    keyring.write_bytes(b"\x99 not checked before the cache")
    keyring.chmod(0o644)
    before = sorted(p.name for p in cache.rglob("*"))
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/usr/bin/python3", "-m", "vztt", "--cache-dir", str(cache), "pull", TINY,
                        "--from", "http://127.0.0.1:9/mirror/"],
                       capture_output=True, text=True, cwd="/", timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(world_readable / "src"), "HOME": "/",
                            "VZTT_KEYRING": str(keyring)})
    assert r.returncode == 7, r.stderr
    line = one_line_error(r)            # one line, no traceback
    assert str(cache) in line and "not writable" in line, line
    assert sorted(p.name for p in cache.rglob("*")) == before


@ROOT
def test_two_creates_into_one_destination(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tiny_template(cache, payload=os.urandom(24 << 20))
    dest = tmp_path / "ct" / "101"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    env["VZTT_PACKAGE_CACHE"] = str(PACKAGE_CACHE)
    argv = [sys.executable, "-m", "vztt", "--cache-dir", str(cache), "create", TINY, str(dest), "--layout", "dir",
            "--offline"]
    first = subprocess.Popen(argv + ["--hostname", "first"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    scratch = dest.parent / f".{dest.name}.vztt-create-{first.pid}"
    deadline = time.monotonic() + 60
    while not scratch.exists():                   # it is making the container beside DEST
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run_vztt("create", TINY, dest, "--layout", "dir", "--offline", "--hostname", "second", cache=cache)
        assert second.returncode == 0, second.stderr
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 6, err
    line = one_line_error(Result(first.returncode, out, err))
    assert str(dest) in line and "created meanwhile" in line, line
    assert (dest / "etc" / "hostname").read_text() == "second\n"      # the winner's container, untouched
    assert [p.name for p in dest.parent.iterdir()] == ["101"]           # the loser left nothing


def test_usage_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tiny_template(cache)
    r = run_vztt("create", TINY, tmp_path / "x", "--layout", "dir", "--hostname", "bad_name!", "--offline",
                 cache=cache)
    assert r.returncode == 2 and one_line_error(r).startswith("vztt: usage error: --hostname 'bad_name!'"), r.stderr
    r = run_vztt("pull", TINY, "--from", "ftp://mirror.example.invalid/templates/", cache=cache)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r)
    assert line.startswith("vztt: usage error: ") and "ftp://mirror.example.invalid/templates/" in line, line
    r = run_vztt("lsit")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert one_line_error(r).startswith("vztt: usage error: ") and "'list'" in r.stderr, r.stderr
    r = run_vztt("kernel", "inf")
    assert r.returncode == 2 and "'info'" in one_line_error(r), r.stderr
    r = run_vztt("list", "--bogus")
    assert r.returncode == 2 and "--bogus" in one_line_error(r), r.stderr


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def test_every_command_takes_json(tmp_path: Path) -> None:
    missing = [" ".join(path) for path, cmd in _commands(vztt_main)
               if not any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option))]
    assert missing == []
    settings = run_vztt("settings", "--json")
    assert settings.returncode == 0, settings.stderr
    keys = {s["key"]: s for s in settings.json()}
    assert keys["release"]["type"] == "str" and "packages.include" in keys
    assert {f["key"] for f in keys["repositories"]["fields"]} >= {"name", "url", "suite"}
    matrix = run_vztt("matrix", "--format", "github", "--json", env={"GITHUB_OUTPUT": "/dev/null"})
    assert matrix.returncode == 0, matrix.stderr
    doc = matrix.json()
    assert doc["format"] == "github" and "debian-12-x86_64-minimal" in doc["templates"]
    # a layer rides in its base's job (issue 18): the matrix has one entry per job
    output = json.loads(doc["output"])
    assert [e["template"] for e in output["include"]] == [job[0] for job in doc["jobs"]]
    assert sorted(n for job in doc["jobs"] for n in job) == doc["templates"]
    assert [{k: e[k] for k in ("template", "layers")} for e in output["include"]] == \
        [{"template": job[0], "layers": " ".join(job[1:])} for job in doc["jobs"]]
    # each entry says its architecture and its runner (issue 21; tests/test_ci.py)
    assert [(e["template"], e["arch"]) for e in output["include"]] == \
        [(e["template"], e["arch"]) for e in doc["entries"]]
    # and the layers' cache and artifact paths, which the workflow reads from the entry (tests/test_ci.py)
    assert all(f"cache/{layer}.manifest.json" in e["artifact_template"].split("\n")
               for e in output["include"] for layer in e["layers"].split())


def test_run_json_when_the_template_is_missing(tmp_path: Path) -> None:
    r = run_vztt("run", "debian-12-x86_64-minimal", "--json", "--", "true", cache=tmp_path / "empty")
    assert r.returncode == 3, r.stderr
    assert r.json()["error"]["exit_code"] == 3 and one_line_error(r)


@pytest.mark.network          # the real debian-12 build (conftest's `debian12`)
@pytest.mark.slow
@ROOT
def test_run_json(debian12: BuiltTemplate) -> None:
    r = run_vztt("run", debian12.name, "--json", "--", "sh", "-c", "hostname; exit 3", cache=debian12.cache,
                 timeout=300)
    assert r.returncode == 3, r.stderr
    doc = r.json()
    assert doc["name"] == debian12.name and doc["command"] == ["sh", "-c", "hostname; exit 3"]
    assert doc["status"] == 3 and doc["output"] == "localhost\n" and doc["steps"]["boot"] > 0


def test_readme_exit_codes_match_the_code() -> None:
    readme = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme.split("### Exit status", 1)[1].split("\n\n", 2)[1], re.M))
    assert {int(k) for k in table} == {code for code, _ in EXIT_CODES}
    for code, text in EXIT_CODES:
        assert table[str(code)] == text, (code, table[str(code)], text)
    helptext = run_vztt("--help").stdout
    for code, text in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+{re.escape(text[:30])}", helptext, re.M), (code, text)
