"""The gate of `make test` on skips (tests/strictskips.py), run on a throwaway suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs apt-ftparchive")
def test_missing_tool():
    pass

def test_ubuntu():
    pytest.skip("no Ubuntu archive configured or reachable (set UBUNTU_MIRROR to run this)")
'''


def run(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "VZTT_STRICT_SKIPS"}
    env["PYTHONPATH"] = str(HERE)
    if strict:
        env["VZTT_STRICT_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "strictskips",
                           str(tmp_path / "test_sample.py")], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_unexpected_skip_fails_make_test(tmp_path: Path) -> None:
    r = run(tmp_path, strict=True)
    assert r.returncode == 1, r.stdout
    assert "1 passed, 1 skipped, 1 error" in r.stdout, r.stdout
    assert "unexpected skip (Skipped: needs apt-ftparchive)" in r.stdout
    assert "SKIPPED [1] test_sample.py:12: no Ubuntu archive configured" in r.stdout      # listed by -rs


def test_without_the_gate_skips_stay_skips(tmp_path: Path) -> None:
    r = run(tmp_path, strict=False)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 2 skipped" in r.stdout, r.stdout
