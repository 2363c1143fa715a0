"""SIGKILL and SIGINT of a real `vztt build` during each of its steps.

The build runs from a local signed copy of the session's Debian 12 packages (no network).
One good build is cached first. Then, per signal, a chain of builds: each is signalled
during one step (after the line of the step before it: step lines print when a step
ends), and the next build of the chain starts. Checked from outside:

- SIGKILL: exit -9; the cached template byte-identical; what the killed build left (its
  work dir, its processes, its loop device) gone once the next build has printed its
  first step line: that build cleaned it, not time.
- SIGINT: exit 130 and one error line; nothing left at all the moment it exited.
- the last build of the chain succeeds, and nothing is left.

One chain per signal keeps this to about one build's time per step.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import BuiltTemplate, run_vztt  # noqa: E402
from faultkit import (BUILD_STEPS, LocalDistro, Watched, alive, descendants, loop_devices, record,  # noqa: E402
                      signal_name, traces)

pytestmark = [pytest.mark.network, pytest.mark.slow]    # the session's Debian build is the package source

NAME = "fx-fault"
# step -> the step whose line says it has begun ("" : the first; watched by its apt-get child)
BEFORE = {"resolve": "", "fetch": "lock", "install": "fetch", "customize": "install", "clean": "customize",
          "pack": "clean", "test": "pack", "promote": "test"}


class Setup:
    def __init__(self, distro: LocalDistro, cache: Path):
        self.distro, self.cache = distro, cache
        self.archive = cache / f"{NAME}.plain.tar.lz4"
        self.good_archive = self.archive.read_bytes()
        self.good_manifest = (cache / f"{NAME}.manifest.json").read_bytes()

    def refresh(self) -> None:
        """What is cached now is what the next faults must leave as it is."""
        self.good_archive = self.archive.read_bytes()
        self.good_manifest = (self.cache / f"{NAME}.manifest.json").read_bytes()

    def start(self, *args: str, packages: Path | None = None) -> Watched:
        env = dict(self.distro.env)
        if packages is not None:
            env["VZTT_PACKAGE_CACHE"] = str(packages)
        return Watched(self.distro.argv(self.cache, "build", NAME, *args), env=env)


@pytest.fixture(scope="module")
def setup(debian12: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("faults-build")
    distro = LocalDistro(root, debian12.lock)
    cache = root / "cache"
    r = run_vztt(*distro.argv(cache, "build", NAME), env=distro.env)
    assert r.returncode == 0, r.stderr
    return Setup(distro, cache)


def landed_in(w: Watched, before: str) -> str:
    """The step the signal landed in: the first step after `before` whose line never came."""
    seen = w.steps()
    order = [s for s in BUILD_STEPS if s != ("resolve" if before else "lock")]
    start = order.index(before) + 1 if before else 0
    return next((s for s in order[start:] if s not in seen), "after promote")


def signal_during(s: Setup, step: str, sig: int, tmp: Path) -> tuple[Watched, str, dict]:
    """Start a build, signal it during `step`; (the process, where it landed, what it had running)."""
    before = BEFORE[step]
    args = [] if step == "resolve" else ["--locked"]
    # An empty package cache, so that the fetch step takes more than a blink.
    w = s.start(*args, packages=tmp / "empty-packages" if step == "fetch" else None)
    if before:
        w.wait_step(before)
    else:
        w.wait_child("apt-get")
    if step == "install":
        time.sleep(2)                 # into dpkg's work, not the image's mkfs
    kids = descendants(w.pid)
    work = sorted(p.name for p in (s.cache / ".work").iterdir()) if (s.cache / ".work").is_dir() else []
    w.signal(sig)
    w.wait(timeout=300)
    return w, landed_in(w, before), {"pids": list(kids), "work": work, "loops": loop_devices(s.cache)}


def gone(s: Setup, left: dict) -> list[str]:
    """What is still there of what a killed build had."""
    still = [f"pid {p}" for p in alive(left["pids"])]
    still += [w for w in left["work"] if (s.cache / ".work" / w).exists()]
    still += [l for l in left["loops"] if l in loop_devices(s.cache)]
    return still


def first_line_of(w: Watched) -> None:
    """Until the next build has done its start-up cleaning (it prints no line before its first step)."""
    deadline = time.monotonic() + 300
    while not w.steps() and time.monotonic() < deadline:
        if w.proc.poll() is not None:
            raise AssertionError("\n".join(w.lines))
        time.sleep(0.05)


def check_template(s: Setup, step: str) -> None:
    assert s.archive.read_bytes() == s.good_archive, f"the cached archive changed (killed in {step})"
    manifest = (s.cache / f"{NAME}.manifest.json").read_bytes()
    if step not in ("promote", "after promote"):
        assert manifest == s.good_manifest, f"the cached manifest changed (killed in {step})"
    else:                    # the old manifest or the new one, whole, naming these bytes
        doc = json.loads(manifest)
        assert doc["archive"]["sha256"] == hashlib.sha256(s.good_archive).hexdigest()


@pytest.mark.parametrize("sig,steps", [
    # The steps; "clean" (between customize and pack, a few seconds) is left out for time.
    (signal.SIGKILL, ["resolve", "fetch", "install", "customize", "pack", "test", "promote"]),
    (signal.SIGINT, ["install", "pack", "test"]),
], ids=["SIGKILL", "SIGINT"])
def test_signal_at_each_step(setup: Setup, tmp_path: Path, sig: int, steps: list[str]) -> None:
    setup.refresh()                        # another chain may have promoted a new build (same bytes)
    pending: dict | None = None            # what the last SIGKILLed build left, for the next to clean
    pending_step = ""
    for step in steps:
        w, landed, left = signal_during(setup, step, sig, tmp_path)
        if pending is not None:
            # This build ran past its start-up cleaning (it was signalled after a step line).
            assert gone(setup, pending) == [], f"the build after a SIGKILL in {pending_step} did not clean up"
            pending = None
        code = w.proc.returncode
        if code == 0:
            record(f"{signal_name(sig)} build", step, "finished before the signal (nothing to check)")
            check_template(setup, "after promote")
            continue
        assert landed == step or step in ("fetch", "customize", "clean", "promote"), (landed, w.lines)
        check_template(setup, landed)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, w.lines
            pending, pending_step = left, landed
            outcome = (f"exit -9, template intact; next build cleaned {len(left['work'])} work dir(s), "
                       f"{len(left['pids'])} process(es), {len(left['loops'])} loop device(s)")
        else:
            assert code == 130, w.lines
            assert w.errors() == ["vztt: interrupted error: interrupted; mounts, loop devices and temporary files "
                                  "were cleaned up"], w.lines
            assert traces(setup.cache) == [], f"SIGINT in {landed} left these behind"
            outcome = "exit 130, one line, template intact, nothing left"
        record(f"{signal_name(sig)} build", landed, outcome)
    final = setup.start("--locked")
    first_line_of(final)
    if pending is not None:
        assert gone(setup, pending) == [], f"the build after a SIGKILL in {pending_step} did not clean up"
    assert final.wait(timeout=900) == 0, "\n".join(final.lines)
    assert setup.archive.read_bytes() == setup.good_archive      # same lock, same bytes
    assert traces(setup.cache) == []
    record(f"{signal_name(sig)} build", "(next build)", "exit 0, same bytes, nothing left")
