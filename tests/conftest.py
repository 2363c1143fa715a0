"""Shared test fixtures: run the real CLI, and build the real Debian 12
template once per session (every test that needs a real template reuses it).

The bootable EL fixture distribution (tests/rpmdist.py) is built once per
change of its scripts and kept in FIXTURE_CACHE.

The package cache is shared with `make demo` (cache/packages in the checkout,
or VZTT_TEST_PACKAGE_CACHE), so a developer's second test run downloads
nothing; CI's fresh machine fills it once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import prebuild
from strictskips import pytest_runtest_makereport  # noqa: F401  (make test: an unexpected skip fails)

# A run started in the background of a shell script (`make test &`, nohup) inherits SIGINT
# ignored, and so would every vztt the tests start (exec keeps an ignored signal): the tests
# that interrupt vztt (Ctrl-C) would see it run on. Handled here, children get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
PACKAGE_CACHE = Path(os.environ.get("VZTT_TEST_PACKAGE_CACHE") or REPO / "cache" / "packages")
# Fixtures that take minutes to make (tests/rpmdist.py's distribution), kept between runs
# under the checkout's gitignored cache/, keyed by the digest of the scripts that make them.
FIXTURE_CACHE = Path(os.environ.get("VZTT_TEST_FIXTURE_CACHE") or REPO / "cache" / "fixtures")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):  # type: ignore[no-untyped-def]
        return json.loads(self.stdout)


def vztt_command(*args: str | os.PathLike[str], cache: Path | None = None, recipes: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the real command line, as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}
    full_env["VZTT_PACKAGE_CACHE"] = str(PACKAGE_CACHE)
    full_env.update(env or {})
    argv = [sys.executable, "-m", "vztt"]
    if cache is not None:
        argv += ["--cache-dir", str(cache)]
    if recipes is not None:
        argv += ["--recipes", str(recipes)]
    return argv + [str(a) for a in args], full_env


def run_vztt(*args: str | os.PathLike[str], cache: Path | None = None, recipes: Path | None = None,
             env: dict[str, str] | None = None, timeout: float = 900, check: bool = False) -> Result:
    """The real command line, as a user runs it."""
    argv, full_env = vztt_command(*args, cache=cache, recipes=recipes, env=env)
    proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"vztt {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return result


def one_line_error(result: Result) -> str:
    """The error a failing command printed: exactly one line on stderr, starting 'vztt: '."""
    lines = [l for l in result.stderr.splitlines() if l.startswith("vztt: ")]
    assert len(lines) == 1, f"expected one error line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def leftovers(cache: Path) -> list[str]:
    """Anything a build may leave behind: loop devices, mounts, scratch and temp files."""
    found = []
    for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines():
        if str(cache) in line:
            found.append(line)
    for line in Path("/proc/mounts").read_text().splitlines():
        if str(cache) in line.split()[1]:
            found.append(line)
    work = cache / ".work"
    if work.is_dir():
        found += [str(p) for p in work.iterdir()]
    found += [str(p) for p in cache.glob(".*.tmp-*")]
    return found


def processes_naming(path: Path) -> list[str]:
    """Processes whose command line names `path` (what a test must not leave running)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@dataclass
class BuiltTemplate:
    cache: Path
    name: str
    archive: Path
    lock: dict
    build: Result

    @property
    def manifest(self) -> dict:
        """Read afresh: other tests rebuild this template from the same lock (same archive
        bytes, but a new manifest: build id, times)."""
        return json.loads((self.cache / f"{self.name}.manifest.json").read_text())


@pytest.fixture(scope="session")
def debian12(tmp_path_factory: pytest.TempPathFactory) -> BuiltTemplate:
    """debian-12-x86_64-minimal, built for real from Debian's mirror."""
    cache = tmp_path_factory.mktemp("debian12-cache")
    name = "debian-12-x86_64-minimal"
    result = run_vztt("build", name, "--json", cache=cache)
    assert result.returncode == 0, result.stderr
    doc = result.json()
    lock = json.loads((cache / "locks" / f"{name}.lock.json").read_text())
    return BuiltTemplate(cache=cache, name=name, archive=Path(doc["archive"]), lock=lock, build=result)


# -- made in the background (tests/prebuild.py) ---------------------------------------

ARM64 = "debian-12-aarch64-minimal"


def _arm64_build(basetemp: Path) -> prebuild.Prebuild:
    argv, env = vztt_command("build", ARM64, "--json", cache=basetemp / "debian12-arm64" / "cache")
    return prebuild.Prebuild("debian12_arm64", argv, env, REPO, basetemp / "prebuild")


def _arm64_rebuild(basetemp: Path) -> prebuild.Prebuild:
    """The same template again from the first build's lock (as soon as it is written),
    into a cache of its own: the two archives must be the same bytes."""
    first = basetemp / "debian12-arm64" / "cache" / "locks" / f"{ARM64}.lock.json"
    cache = basetemp / "debian12-arm64-again" / "cache"
    argv, env = vztt_command("build", ARM64, "--locked", "--no-test", "--json", cache=cache)
    script = ('first=$1 cache=$2; shift 2; for i in $(seq 1200); do [ -s "$first" ] && break; sleep 1; done; '
              'mkdir -p "$cache/locks" && cp "$first" "$cache/locks/" && exec "$@"')
    shell = ["/bin/sh", "-c", script, "sh", str(first), str(cache), *argv]
    return prebuild.Prebuild("debian12_arm64_again", shell, env, REPO, basetemp / "prebuild")


def kernel_cache(basetemp: Path) -> Path:
    """The session's kernel cache (every architecture's entries): VZTT_TEST_KERNEL_CACHE
    to keep it between runs (a second `vztt kernel build` there builds nothing)."""
    env_cache = os.environ.get("VZTT_TEST_KERNEL_CACHE")
    return Path(env_cache) if env_cache else basetemp / "vztt-kernel" / "kernel"


def _kernel_build(arch: str) -> Callable[[Path], prebuild.Prebuild]:
    def make(basetemp: Path) -> prebuild.Prebuild:
        argv, env = vztt_command("kernel", "build", "--arch", arch, "--json", cache=basetemp / "vztt-kernel" / "cache",
                                 env={"VZTT_KERNEL_CACHE": str(kernel_cache(basetemp))})
        return prebuild.Prebuild(f"kernel-{arch}", argv, env, REPO, basetemp / "prebuild")
    return make


prebuild.MAKERS.update(debian12_arm64=_arm64_build, debian12_arm64_again=_arm64_rebuild,
                       built_kernel=_kernel_build("x86_64"), built_kernel_arm64=_kernel_build("aarch64"))


def prebuilt_kernel(fixture: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel cache, once the fixture's `vztt kernel build` has succeeded."""
    basetemp = tmp_path_factory.getbasetemp()
    outcome = prebuild.get(fixture, basetemp).wait()
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    return kernel_cache(basetemp)


def prebuilt_template(fixture: str, tmp_path_factory: pytest.TempPathFactory) -> BuiltTemplate:
    if fixture == "debian12_arm64" and (source := os.environ.get("VZTT_TEST_ARM64_CACHE")):
        return _copied_arm64(Path(source), tmp_path_factory)
    job = prebuild.get(fixture, tmp_path_factory.getbasetemp())
    outcome = job.wait()
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    result = Result(outcome.returncode, outcome.stdout, outcome.stderr)
    doc = result.json()
    cache = Path(job.argv[job.argv.index("--cache-dir") + 1])
    lock = json.loads((cache / "locks" / f"{ARM64}.lock.json").read_text())
    return BuiltTemplate(cache=cache, name=ARM64, archive=Path(doc["archive"]), lock=lock, build=result)


def _copied_arm64(source: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltTemplate:
    """VZTT_TEST_ARM64_CACHE: a cache holding a build of it already (a developer's shortcut;
    `make test` builds it)."""
    cache = tmp_path_factory.mktemp("arm64-cache")
    for path in source.glob(f"{ARM64}.*"):
        shutil.copy2(path, cache / path.name)
    for sub in ("locks", "history"):
        if (source / sub).is_dir():
            shutil.copytree(source / sub, cache / sub)
    manifest = json.loads((cache / f"{ARM64}.manifest.json").read_text())
    lock = json.loads((cache / "locks" / f"{ARM64}.lock.json").read_text())
    return BuiltTemplate(cache=cache, name=ARM64, archive=cache / manifest["archive"]["file"], lock=lock,
                         build=Result(0, json.dumps({"archive": str(cache / manifest["archive"]["file"])}), ""))


@pytest.fixture(scope="session")
def debian12_arm64(tmp_path_factory: pytest.TempPathFactory) -> BuiltTemplate:
    """debian-12-aarch64-minimal, built for real from Debian's mirror on this x86_64 host:
    its maintainer scripts ran under qemu-user (binfmt_misc, `make binfmt`), and `vztt build`
    boot-tested it in the container runtime under emulation before promoting it."""
    return prebuilt_template("debian12_arm64", tmp_path_factory)


@pytest.fixture(scope="session")
def debian12_arm64_again(debian12_arm64: BuiltTemplate, tmp_path_factory: pytest.TempPathFactory) -> BuiltTemplate:
    """The same template built again from debian12_arm64's lock (`--locked --no-test`)."""
    return prebuilt_template("debian12_arm64_again", tmp_path_factory)


@pytest.hookimpl(trylast=True)      # after -m and -k have deselected what will not run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Start the background work the collected tests need (tests/prebuild.py) and move the
    modules that wait for it to the end of the run, in their order."""
    wanted = [f for f in prebuild.MAKERS if any(f in getattr(item, "fixturenames", ()) for item in items)
              and not (f.startswith("debian12_arm64") and os.environ.get("VZTT_TEST_ARM64_CACHE"))]
    if not wanted or not prebuild.enabled():
        return
    late = {item.module for item in items
            if set(wanted) & set(getattr(item, "fixturenames", ())) and getattr(item, "module", None)}
    items[:] = [i for i in items if getattr(i, "module", None) not in late] + \
               [i for i in items if getattr(i, "module", None) in late]
    basetemp = config._tmp_path_factory.getbasetemp()      # type: ignore[attr-defined]
    for fixture in wanted:
        prebuild.get(fixture, basetemp).start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    prebuild.stop_all()       # an interrupted or filtered run leaves nothing running


@pytest.fixture(scope="session")
def el_distribution():  # type: ignore[no-untyped-def]
    """The bootable EL fixture distribution (rpmdist.Distribution), from FIXTURE_CACHE
    or built (a few minutes; the Debian mirror is needed then)."""
    from rpmdist import build_distribution
    return build_distribution(FIXTURE_CACHE, log=lambda line: sys.stderr.write(f"rpmdist: {line}\n"))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """The fault suite's table (tests/faults/), when it ran."""
    import faultkit
    faultkit.print_table(terminalreporter.write)
