"""The container kernel (issue #6): kernel/ (series, patches, fragment) and
`vztt kernel check|build|info`.

The kernel is built once per session (`built_kernel`, about 5 minutes with 2
cores) into a kernel cache under pytest's base temp directory; test_vm.py
boots it. Set VZTT_TEST_KERNEL_CACHE to a directory to keep the build
between runs (a second `vztt kernel build` there builds nothing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, run_vztt
from vztt.kernel import build as kernel
from vztt.kernel import kconfig as kernel_config
from vztt.kernel import series as kernel_series
from vztt.kernel import source as kernel_source

KERNEL = REPO / "kernel"
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel tests use the host's apt as root")


# -- the session's kernel ------------------------------------------------------------

@pytest.fixture(scope="session")
def built_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel cache holding the kernel for kernel/ as it is, built by
    `vztt kernel build` once per session. Returns the kernel cache directory
    (for VZTT_KERNEL_CACHE). A fixed path, so that test_vm.py, which imports
    this fixture, finds the same build."""
    env_cache = os.environ.get("VZTT_TEST_KERNEL_CACHE")
    root = tmp_path_factory.getbasetemp() / "vztt-kernel"
    kcache = Path(env_cache) if env_cache else root / "kernel"
    root.mkdir(exist_ok=True)
    result = run_vztt("kernel", "build", "--json", cache=root / "cache", env={"VZTT_KERNEL_CACHE": str(kcache)},
                      timeout=3 * 3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return kcache


def kernel_env(kcache: Path) -> dict[str, str]:
    return {"VZTT_KERNEL_CACHE": str(kcache)}


def copy_kernel_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "kernel"
    shutil.copytree(KERNEL, dest)
    return dest


# -- kernel/ itself: fast -----------------------------------------------------------

def test_series_starts_with_our_patch() -> None:
    patches = kernel_series.read_series(KERNEL)
    assert patches[0].name == "virt_osrelease.patch"
    assert patches[0].files() == ["init/Kconfig", "kernel/utsname_sysctl.c"]
    text = patches[0].path.read_text()
    assert "ns_capable(ns->user_ns, CAP_SYS_ADMIN)" in text
    assert "ns == &init_uts_ns" in text
    assert "config VIRT_OSRELEASE" in text


def test_fragment_has_what_a_template_needs() -> None:
    options = kernel_config.parse_config((KERNEL / kernel_series.FRAGMENT).read_text())
    wanted = ["VIRTIO_PCI", "VIRTIO_MMIO", "VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_CONSOLE", "EXT4_FS", "TMPFS",
              "DEVTMPFS", "OVERLAY_FS", "UTS_NS", "IPC_NS", "PID_NS", "NET_NS", "USER_NS", "CGROUPS", "MEMCG",
              "CGROUP_PIDS", "SECCOMP", "SECCOMP_FILTER", "VIRT_OSRELEASE", "ACPI", "BASE_FULL", "FILE_LOCKING",
              "POSIX_TIMERS", "VIRTIO_MENU", "NETDEVICES", "BLOCK"]
    assert {k: options.get(f"CONFIG_{k}") for k in wanted} == {k: "y" for k in wanted}
    assert options["CONFIG_MODULES"] == "n" and options["CONFIG_BLK_DEV_INITRD"] == "n"


def test_digests_follow_the_series_and_the_fragment(tmp_path: Path) -> None:
    kdir = copy_kernel_dir(tmp_path)
    series, fragment = kernel_series.series_digest(kdir), kernel_series.fragment_digest(kdir)
    assert (series, fragment) == (kernel_series.series_digest(KERNEL), kernel_series.fragment_digest(KERNEL))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", series) and re.fullmatch(r"sha256:[0-9a-f]{64}", fragment)
    with open(kdir / "patches" / "virt_osrelease.patch", "a") as f:
        f.write("\n")
    assert kernel_series.series_digest(kdir) != series and kernel_series.fragment_digest(kdir) == fragment
    with open(kdir / kernel_series.FRAGMENT, "a") as f:
        f.write("CONFIG_IKCONFIG=y\n")
    assert kernel_series.fragment_digest(kdir) != fragment
    name = kernel.entry_name("6.1.192-2", series, fragment)
    assert name == f"6.1.192-2-s{series[7:19]}-f{fragment[7:19]}"


def test_series_names_a_missing_patch(tmp_path: Path) -> None:
    kdir = copy_kernel_dir(tmp_path)
    (kdir / "series").write_text("virt_osrelease.patch\nnot-there.patch -p1\n")
    with pytest.raises(kernel.BuildError, match=r"series:2: .*not-there.patch does not exist"):
        kernel_series.read_series(kdir)


def test_dropped_options_are_found() -> None:
    fragment = kernel_config.parse_config("CONFIG_VIRTIO_PCI=y\n# CONFIG_MODULES is not set\nCONFIG_NR_CPUS=8\n"
                                   'CONFIG_LOCALVERSION="-vztt"\n')
    final = kernel_config.parse_config("# CONFIG_VIRTIO_PCI is not set\nCONFIG_NR_CPUS=8\nCONFIG_LOCALVERSION=\"-vztt\"\n")
    options = {o.name: o for o in kernel_config.compare_options(fragment, final)}
    assert not options["CONFIG_VIRTIO_PCI"].survived and options["CONFIG_VIRTIO_PCI"].got == "n"
    assert options["CONFIG_MODULES"].survived           # unset and absent are the same
    assert options["CONFIG_NR_CPUS"].survived and options["CONFIG_LOCALVERSION"].survived


def test_a_failing_hunk_is_reported_with_its_file_and_header(tmp_path: Path) -> None:
    """apply_patch on a small tree: the second hunk's context is not there."""
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    lines = [f"line {i}" for i in range(1, 41)]
    (tree / "dir" / "file.c").write_text("\n".join(lines) + "\n")
    new = lines[:3] + ["added one"] + lines[3:30] + ["added two"] + lines[30:]
    (tmp_path / "new.c").write_text("\n".join(new) + "\n")
    diff = subprocess.run(["diff", "-u", "--label", "a/dir/file.c", "--label", "b/dir/file.c",
                           str(tree / "dir" / "file.c"), str(tmp_path / "new.c")], capture_output=True, text=True).stdout
    assert diff.count("@@ ") == 2
    # Change the context of the second hunk in the tree: it no longer applies (fuzz 0).
    (tree / "dir" / "file.c").write_text("\n".join(lines[:28] + ["changed"] + lines[29:]) + "\n")
    patch = tmp_path / "broken.patch"
    patch.write_text(diff)
    result = kernel_series.apply_patch(tree, kernel_series.Patch("broken.patch", patch))
    assert not result.ok
    header = kernel_series.hunk_headers(diff)["dir/file.c"][1]
    assert result.problems == [f"dir/file.c: hunk #2 ({header}) FAILED at line 29"], result.problems
    assert result.files == ["dir/file.c"]


# -- against Debian's real source: slow ------------------------------------------------

@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_kernel_check_passes(tmp_path: Path) -> None:
    """The series applies with fuzz 0 to apt's current linux-source-6.1, and
    every option of the fragment survives olddefconfig."""
    result = run_vztt("kernel", "check", "--json", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["ok"] and doc["config_checked"] and doc["dropped"] == []
    assert [p["name"] for p in doc["patches"]] == ["virt_osrelease.patch"] and doc["patches"][0]["ok"]
    assert doc["source"]["package"] == "linux-source-6.1"
    assert doc["source"]["version"] == kernel_source.source_package().version
    assert not (tmp_path / "cache" / ".work").exists() or not list((tmp_path / "cache" / ".work").iterdir())


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_a_broken_patch_is_reported_with_its_file_and_hunk(tmp_path: Path) -> None:
    kdir = copy_kernel_dir(tmp_path)
    patch = kdir / "patches" / "virt_osrelease.patch"
    text = patch.read_text()
    context = " #else\n #define proc_do_uts_string NULL\n"
    assert text.count(context) == 1
    patch.write_text(text.replace(context, " #else\n #define proc_do_uts_string NOTHING\n"))
    hunk = kernel_series.hunk_headers(patch.read_text())["kernel/utsname_sysctl.c"][1]

    result = run_vztt("kernel", "--kernel-dir", kdir, "check", "--patches-only", cache=tmp_path / "cache")
    assert result.returncode == 6, result.stderr
    line = one_line_error(result)
    assert line.startswith(f"vztt: build error: {patch}: does not apply to linux-source-6.1 "), line
    assert f"kernel/utsname_sysctl.c: hunk #2 ({hunk}) FAILED at line" in line
    assert "virt_osrelease.patch             FAILED" in result.stdout
    assert "Traceback" not in result.stderr


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_an_option_that_drops_is_reported_with_its_menu(tmp_path: Path) -> None:
    kdir = copy_kernel_dir(tmp_path)
    fragment = kdir / kernel_series.FRAGMENT
    fragment.write_text("".join(l for l in fragment.read_text().splitlines(keepends=True)
                                if not l.startswith("CONFIG_VIRTIO_MENU=")))
    result = run_vztt("kernel", "--kernel-dir", kdir, "check", "--json", cache=tmp_path / "cache")
    assert result.returncode == 6, result.stderr
    doc = result.json()
    assert doc["dropped"] == ["CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"]
    needs = {o["name"]: o.get("needs", "") for o in doc["options"]}
    assert "within `if VIRTIO_MENU[n]`" in needs["CONFIG_VIRTIO_PCI"]
    assert f"{fragment}: 3 options did not survive olddefconfig" in one_line_error(result)


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_second_build_builds_nothing(built_kernel: Path, tmp_path: Path) -> None:
    result = run_vztt("kernel", "build", "--json", cache=tmp_path / "cache", env=kernel_env(built_kernel))
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["built"] is False and doc["seconds"] < 15
    text = run_vztt("kernel", "build", cache=tmp_path / "cache", env=kernel_env(built_kernel))
    assert text.returncode == 0 and "nothing to build" in text.stdout, text.stdout + text.stderr
    assert Path(doc["path"]).parent == built_kernel
    assert Path(doc["path"]).name == kernel.entry_name(doc["source"]["version"], kernel_series.series_digest(KERNEL),
                                                       kernel_series.fragment_digest(KERNEL))
    assert not (tmp_path / "cache" / ".work").exists()


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_info_says_version_digests_and_options(built_kernel: Path, tmp_path: Path) -> None:
    result = run_vztt("kernel", "info", "--json", cache=tmp_path / "cache", env=kernel_env(built_kernel))
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["built"] is True
    upstream = kernel_source.source_package().version.split("-")[0]
    assert doc["kernelrelease"] == f"{upstream}-vztt"
    assert doc["series_digest"] == kernel_series.series_digest(KERNEL) == doc["wanted"]["series_digest"]
    assert doc["fragment_digest"] == kernel_series.fragment_digest(KERNEL)
    assert doc["patches"] == ["virt_osrelease.patch"]
    fragment = kernel_config.parse_config((KERNEL / kernel_series.FRAGMENT).read_text())
    assert [o["name"] for o in doc["options"]] == list(fragment)
    assert all(o["survived"] for o in doc["options"]) and doc["dropped"] == []
    assert 1e6 < doc["bzImage"]["size"] < 8e6
    config = kernel_config.parse_config((Path(doc["path"]) / "config").read_text())
    assert config["CONFIG_VIRT_OSRELEASE"] == "y" and config.get("CONFIG_MODULES", "n") == "n"
    info = json.loads((Path(doc["path"]) / "info.json").read_text())
    assert info["compile_seconds"] > 0 and info["jobs"] >= 1
    # Reproducible: the build's timestamp is the source package's date, not the clock's.
    deb = next((built_kernel / "source").glob("linux-source-6.1_*.deb"))
    epoch = kernel_source.source_date_epoch(deb)
    assert info["source_date_epoch"] == epoch
    assert doc["version_string"] == f"{upstream}-vztt (vztt@vztt) #1 SMP {kernel_config.build_timestamp(epoch)}"
    assert doc["version_string"] == kernel.bzimage_version(Path(doc["bzimage_path"]))

    text = run_vztt("kernel", "info", cache=tmp_path / "cache", env=kernel_env(built_kernel))
    assert text.returncode == 0, text.stderr
    assert "all survived olddefconfig" in text.stdout
    assert re.search(r"^  CONFIG_VIRTIO_PCI +y +ok$", text.stdout, re.MULTILINE), text.stdout


def test_bzimage_version_reads_the_setup_header(tmp_path: Path) -> None:
    image = bytearray(0x800)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    image[0x400:0x420] = b"6.1.1-vztt (vztt@vztt) #1 SMP\0"
    (tmp_path / "bzImage").write_bytes(bytes(image))
    assert kernel.bzimage_version(tmp_path / "bzImage") == "6.1.1-vztt (vztt@vztt) #1 SMP"
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(0x800))
    with pytest.raises(kernel.BuildError, match=r"vmlinux: not a bzImage"):
        kernel.bzimage_version(tmp_path / "vmlinux")
    assert kernel_config.build_timestamp(1794824260) == "Mon Nov 16 10:17:40 UTC 2026"
    assert kernel_config.build_timestamp(1700000000) == "Tue Nov 14 22:13:20 UTC 2023"


def test_an_entry_of_an_older_build_format_is_not_used(tmp_path: Path) -> None:
    """Builds stamped with the clock (no "format") are rebuilt, not booted."""
    entry = tmp_path / kernel.entry_name("6.1.1-1", "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    entry.mkdir()
    (entry / "bzImage").write_bytes(b"kernel")
    (entry / "info.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00+00:00"}))
    assert kernel.entries(tmp_path) == []
    (entry / "info.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00+00:00",
                                                 "format": kernel.BUILD_FORMAT}))
    assert [e.path for e in kernel.entries(tmp_path)] == [entry]


def test_vm_runtime_wants_a_built_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel in the kernel cache: the VM runtime cannot start (exit 10),
    and says what to run."""
    from vztt.store.templates import TemplateCache
    from vztt.base.errors import RuntimeUnavailable
    monkeypatch.setenv("VZTT_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(kernel, "source_package", lambda log=None: kernel_source.SourcePackage(
        "linux-source-6.1", "6.1.1-1", "", 0))
    with pytest.raises(RuntimeUnavailable, match=r"run `vztt kernel build` first"):
        kernel.vm_kernel(TemplateCache(tmp_path / "cache"))
