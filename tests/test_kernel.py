"""The container kernel (issue #6): kernel/ (series, patches, fragment) and
`vztt kernel check|build|info`.

The host's (x86_64) kernel is built once per session (`built_kernel`, about
5 minutes with 2 cores) into a kernel cache under pytest's base temp
directory; test_vm.py boots it. The arm64 kernel (`built_kernel_arm64`,
cross-compiled, about 5 more minutes) goes into the same kernel cache, once
per session too; test_vm_arm64.py boots it. Set VZTT_TEST_KERNEL_CACHE to a
directory to keep both builds between runs (a second `vztt kernel build`
there builds nothing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, prebuilt_kernel, run_vztt
from vztt.kernel import build as kernel
from vztt.kernel import kconfig as kernel_config
from vztt.kernel import series as kernel_series
from vztt.kernel import source as kernel_source

KERNEL = REPO / "kernel"
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the kernel tests use the host's apt as root")


# -- the session's kernel ------------------------------------------------------------

@pytest.fixture(scope="session")
def built_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel cache holding the x86_64 kernel for kernel/ as it is, built by `vztt
    kernel build` once per session (in the background from the start of the run:
    tests/prebuild.py). Returns the kernel cache directory (for VZTT_KERNEL_CACHE); a
    fixed path, so that test_vm.py, which imports this fixture, finds the same build."""
    return prebuilt_kernel("built_kernel", tmp_path_factory)


@pytest.fixture(scope="session")
def built_kernel_arm64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel cache (built_kernel's: entries are per architecture) holding the
    aarch64 kernel for kernel/ as it is, cross-compiled by `vztt kernel build --arch
    aarch64` once per session (in the background, as built_kernel)."""
    return prebuilt_kernel("built_kernel_arm64", tmp_path_factory)


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


def fragment(arch: str, kdir: Path = KERNEL) -> dict[str, str]:
    """The options merged for arch: the shared fragment, then arch/<arch>.config."""
    return kernel_config.read_fragments(kernel_series.fragment_paths(kdir, arch))[0]


def test_fragment_has_what_a_template_needs() -> None:
    wanted = ["VIRTIO_PCI", "VIRTIO_MMIO", "VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_CONSOLE", "EXT4_FS", "TMPFS",
              "DEVTMPFS", "OVERLAY_FS", "UTS_NS", "IPC_NS", "PID_NS", "NET_NS", "USER_NS", "CGROUPS", "MEMCG",
              "CGROUP_PIDS", "SECCOMP", "SECCOMP_FILTER", "VIRT_OSRELEASE", "BASE_FULL", "FILE_LOCKING",
              "POSIX_TIMERS", "VIRTIO_MENU", "NETDEVICES", "BLOCK"]
    x86 = wanted + ["ACPI", "SERIAL_8250_CONSOLE", "64BIT"]
    arm64 = wanted + ["SERIAL_AMBA_PL011_CONSOLE", "RTC_DRV_PL031", "PCI_HOST_GENERIC", "ARM64_VA_BITS_48"]
    for arch, names in (("x86_64", x86), ("aarch64", arm64)):
        options = fragment(arch)
        assert {k: options.get(f"CONFIG_{k}") for k in names} == {k: "y" for k in names}, arch
        assert options["CONFIG_MODULES"] == "n" and options["CONFIG_BLK_DEV_INITRD"] == "n"


def test_fragments_split_what_is_shared_from_what_is_one_architecture_s() -> None:
    """container.config holds what every architecture needs; x86-only options
    (which arm64's Kconfig does not have, or where virt has other devices) are
    in arch/x86_64.config only, arm64's in arch/aarch64.config only; the
    x86_64 kernel gets the 81 options of the single fragment before the split."""
    shared = kernel_config.parse_config((KERNEL / kernel_series.FRAGMENT).read_text())
    x86 = kernel_config.parse_config((KERNEL / "arch" / "x86_64.config").read_text())
    arm64 = kernel_config.parse_config((KERNEL / "arch" / "aarch64.config").read_text())
    x86_only = {"CONFIG_64BIT", "CONFIG_HYPERVISOR_GUEST", "CONFIG_PARAVIRT", "CONFIG_KVM_GUEST", "CONFIG_ACPI",
                "CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE"}
    arm64_only = {"CONFIG_SERIAL_AMBA_PL011", "CONFIG_SERIAL_AMBA_PL011_CONSOLE", "CONFIG_RTC_CLASS",
                  "CONFIG_RTC_HCTOSYS", "CONFIG_RTC_DRV_PL031", "CONFIG_PCI_HOST_GENERIC", "CONFIG_ARM64_4K_PAGES",
                  "CONFIG_ARM64_VA_BITS_48"}
    assert set(x86) == x86_only and set(arm64) == arm64_only
    assert not (set(shared) & (x86_only | arm64_only))
    assert len(shared) == 74 and len(fragment("x86_64")) == 81 and len(fragment("aarch64")) == 82
    assert list(fragment("x86_64"))[:74] == list(shared)          # merge order: shared, then the arch's
    assert sorted(p.name for p in (KERNEL / "arch").iterdir()) == ["aarch64.config", "x86_64.config"]
    assert sorted(kernel_config.TARGETS) == ["aarch64", "x86_64"]   # one fragment per target, no more


def test_the_architecture_table() -> None:
    arm64, x86 = kernel_config.TARGETS["aarch64"], kernel_config.TARGETS["x86_64"]
    assert (arm64.make_arch, arm64.srcarch, arm64.image_path) == ("arm64", "arm64", "arch/arm64/boot/Image")
    assert (x86.make_arch, x86.srcarch, x86.image_path) == ("x86_64", "x86", "arch/x86/boot/bzImage")
    assert kernel_config.target(None) == kernel_config.TARGETS[kernel_config.host_arch()]
    tree = Path("/src/linux")
    if kernel_config.host_arch() == "x86_64":
        assert arm64.cross_prefix() == "aarch64-linux-gnu-" and x86.cross_prefix() == ""
        assert kernel_config.make_command(tree, arm64, "Image", jobs=2) == [
            "make", "-C", "/src/linux", "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "-j2", "Image"]
        assert kernel_config.make_command(tree, x86, "bzImage") == [
            "make", "-C", "/src/linux", "ARCH=x86_64", "-j1", "bzImage"]
    with pytest.raises(kernel.VzttError, match=r"no container kernel for architecture 'riscv64'") as e:
        kernel_config.target("riscv64")
    assert e.value.exit_code == 2


def test_an_unknown_architecture_is_a_usage_error() -> None:
    for command in ("build", "check", "info"):
        result = run_vztt("kernel", command, "--arch", "riscv64")
        assert result.returncode == 2, result.stderr
        line = one_line_error(result)
        assert line.startswith("vztt: usage error: Invalid value for '--arch': 'riscv64' is not one of "
                               "'aarch64', 'x86_64'"), line


def test_a_missing_cross_compiler_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-compiling for aarch64 needs Debian's gcc-aarch64-linux-gnu: one line, exit 7."""
    if kernel_config.host_arch() != "x86_64":
        pytest.skip("the cross compiler is needed on an x86_64 host")
    real = kernel.which
    monkeypatch.setattr(kernel, "which", lambda tool: None if tool == "aarch64-linux-gnu-gcc" else real(tool))
    with pytest.raises(kernel.EnvironmentProblem, match=r"building the kernel needs gcc-aarch64-linux-gnu \(") as e:
        kernel._require_tools(kernel_config.TARGETS["aarch64"])
    assert e.value.exit_code == 7 and "\n" not in str(e.value)
    kernel._require_tools(kernel_config.TARGETS["x86_64"])          # the host's build does not need it


def test_arm64_image_version_reads_the_banner(tmp_path: Path) -> None:
    banner = (b"6.1.192-vztt (vztt@vztt) (aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils "
              b"for Debian) 2.40) #1 SMP Thu Nov 26 17:12:56 UTC 2026")
    image = bytearray(0x1000)
    image[0x38:0x3C] = b"ARM\x64"
    image[0x200:0x200 + 40] = b"Linux version %s (%s)\0 unrelated string"   # a message, not the banner
    image[0x400:0x400 + len(banner) + 16] = b"Linux version " + banner + b"\n\0"
    (tmp_path / "Image").write_bytes(bytes(image))
    assert kernel.image_version(tmp_path / "Image", "aarch64") == banner.decode()
    image[0x38:0x3C] = b"\0\0\0\0"
    (tmp_path / "Image").write_bytes(bytes(image))
    with pytest.raises(kernel.BuildError, match=r"Image: not an arm64 Image"):
        kernel.image_version(tmp_path / "Image", "aarch64")


def test_digests_follow_the_series_and_the_fragments(tmp_path: Path) -> None:
    kdir = copy_kernel_dir(tmp_path)
    series = kernel_series.series_digest(kdir)
    x86, arm64 = kernel_series.fragment_digest(kdir, "x86_64"), kernel_series.fragment_digest(kdir, "aarch64")
    assert (series, x86, arm64) == (kernel_series.series_digest(KERNEL), kernel_series.fragment_digest(KERNEL, "x86_64"),
                                    kernel_series.fragment_digest(KERNEL, "aarch64"))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", series) and re.fullmatch(r"sha256:[0-9a-f]{64}", x86)
    assert x86 != arm64
    with open(kdir / "patches" / "virt_osrelease.patch", "a") as f:
        f.write("\n")
    assert kernel_series.series_digest(kdir) != series and kernel_series.fragment_digest(kdir, "x86_64") == x86
    with open(kdir / "arch" / "aarch64.config", "a") as f:       # one architecture's: only its kernel changes
        f.write("CONFIG_IKCONFIG=y\n")
    assert kernel_series.fragment_digest(kdir, "aarch64") != arm64
    assert kernel_series.fragment_digest(kdir, "x86_64") == x86
    assert kernel_series.fragments_digest(kdir) != kernel_series.fragments_digest(KERNEL)   # CI's cache key
    with open(kdir / kernel_series.FRAGMENT, "a") as f:          # the shared one: both
        f.write("CONFIG_IKCONFIG=y\n")
    assert kernel_series.fragment_digest(kdir, "x86_64") != x86
    name = kernel.entry_name("6.1.192-2", "aarch64", series, arm64)
    assert name == f"6.1.192-2-aarch64-s{series[7:19]}-f{arm64[7:19]}"
    (kdir / "arch" / "aarch64.config").unlink()
    with pytest.raises(kernel.BuildError, match=r"arch/aarch64.config: the config fragment for aarch64 is missing"):
        kernel_series.fragment_digest(kdir, "aarch64")


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
    assert doc["arch"] == "x86_64"
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
    assert Path(doc["path"]).name == kernel.entry_name(doc["source"]["version"], "x86_64",
                                                       kernel_series.series_digest(KERNEL),
                                                       kernel_series.fragment_digest(KERNEL, "x86_64"))
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
    assert doc["fragment_digest"] == kernel_series.fragment_digest(KERNEL, "x86_64")
    assert doc["patches"] == ["virt_osrelease.patch"]
    assert doc["arch"] == "x86_64" and doc["fragments"] == ["container.config", "arch/x86_64.config"]
    assert [o["name"] for o in doc["options"]] == list(fragment("x86_64"))
    assert all(o["survived"] for o in doc["options"]) and doc["dropped"] == []
    assert doc["image"]["file"] == "bzImage" and 1e6 < doc["image"]["size"] < 8e6
    config = kernel_config.parse_config((Path(doc["path"]) / "config").read_text())
    assert config["CONFIG_VIRT_OSRELEASE"] == "y" and config.get("CONFIG_MODULES", "n") == "n"
    info = json.loads((Path(doc["path"]) / "info.json").read_text())
    assert info["compile_seconds"] > 0 and info["jobs"] >= 1
    # Reproducible: the build's timestamp is the source package's date, not the clock's.
    deb = next((built_kernel / "source").glob("linux-source-6.1_*.deb"))
    epoch = kernel_source.source_date_epoch(deb)
    assert info["source_date_epoch"] == epoch
    assert doc["version_string"] == f"{upstream}-vztt (vztt@vztt) #1 SMP {kernel_config.build_timestamp(epoch)}"
    assert doc["version_string"] == kernel.bzimage_version(Path(doc["image_path"]))

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
    entry = tmp_path / kernel.entry_name("6.1.1-1", "x86_64", "sha256:" + "a" * 64, "sha256:" + "b" * 64)
    entry.mkdir()
    (entry / "bzImage").write_bytes(b"kernel")
    (entry / "info.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00+00:00"}))
    assert kernel.entries(tmp_path) == []
    (entry / "info.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00+00:00", "format": 2,
                                                 "bzImage": {"size": 6}}))   # before per-architecture builds
    assert kernel.entries(tmp_path) == []
    (entry / "info.json").write_text(json.dumps({"built_at": "2026-01-01T00:00:00+00:00", "arch": "x86_64",
                                                 "format": kernel.BUILD_FORMAT, "image": {"file": "bzImage"}}))
    assert [e.path for e in kernel.entries(tmp_path)] == [entry]
    assert kernel.entries(tmp_path, "aarch64") == []


def test_vm_runtime_wants_a_built_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel in the kernel cache: the VM runtime cannot start (exit 10),
    and says what to run."""
    from vztt.store.templates import TemplateCache
    from vztt.base.errors import RuntimeUnavailable
    monkeypatch.setenv("VZTT_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(kernel, "source_package", lambda log=None: kernel_source.SourcePackage(
        "linux-source-6.1", "6.1.1-1", "", 0))
    with pytest.raises(RuntimeUnavailable, match=r"run `vztt kernel build` first"):
        kernel.vm_kernel(TemplateCache(tmp_path / "cache"), kernel_config.host_arch())
    if kernel_config.host_arch() == "x86_64":
        with pytest.raises(RuntimeUnavailable, match=r"no aarch64 kernel built .*run `vztt kernel build --arch "
                                                     r"aarch64` first"):
            kernel.vm_kernel(TemplateCache(tmp_path / "cache"), "aarch64")


# -- the arm64 kernel (issue #21): cross-compiled on this host -------------------------

@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_the_arm64_kernel_is_ours_and_a_second_build_builds_nothing(built_kernel_arm64: Path,
                                                                      tmp_path: Path) -> None:
    env = kernel_env(built_kernel_arm64)
    result = run_vztt("kernel", "build", "--arch", "aarch64", "--json", cache=tmp_path / "cache", env=env)
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["built"] is False and doc["seconds"] < 15
    assert Path(doc["path"]).parent == built_kernel_arm64
    assert Path(doc["path"]).name == kernel.entry_name(doc["source"]["version"], "aarch64",
                                                       kernel_series.series_digest(KERNEL),
                                                       kernel_series.fragment_digest(KERNEL, "aarch64"))
    assert "-aarch64-s" in Path(doc["path"]).name
    text = run_vztt("kernel", "build", "--arch", "aarch64", cache=tmp_path / "cache", env=env)
    assert text.returncode == 0 and "nothing to build" in text.stdout, text.stdout + text.stderr

    info = run_vztt("kernel", "info", "--arch", "aarch64", "--json", cache=tmp_path / "cache", env=env)
    assert info.returncode == 0, info.stderr
    doc = info.json()
    upstream = kernel_source.source_package().version.split("-")[0]
    assert doc["built"] is True and doc["arch"] == "aarch64" and doc["kernelrelease"] == f"{upstream}-vztt"
    assert doc["cross_compile"] == ("aarch64-linux-gnu-" if kernel_config.host_arch() != "aarch64" else "")
    assert doc["fragments"] == ["container.config", "arch/aarch64.config"]
    assert [o["name"] for o in doc["options"]] == list(fragment("aarch64"))
    assert all(o["survived"] for o in doc["options"]) and doc["dropped"] == []
    image = Path(doc["image_path"])
    assert image.name == "Image" and doc["image"]["file"] == "Image" and 2e6 < image.stat().st_size < 12e6
    head = image.read_bytes()[:64]
    assert head[0x38:0x3C] == b"ARM\x64"                          # an arm64 Image's header magic
    epoch = kernel_source.source_date_epoch(next((built_kernel_arm64 / "source").glob("linux-source-6.1_*.deb")))
    version = doc["version_string"]
    assert version.startswith(f"{upstream}-vztt (vztt@vztt) (aarch64-linux-gnu-gcc ") or \
        kernel_config.host_arch() == "aarch64", version
    assert version.endswith(f"#1 SMP {kernel_config.build_timestamp(epoch)}"), version
    config = kernel_config.parse_config((Path(doc["path"]) / "config").read_text())
    assert config["CONFIG_ARM64"] == "y" and config.get("CONFIG_X86", "n") == "n"
    assert config["CONFIG_VIRT_OSRELEASE"] == "y" and config["CONFIG_SERIAL_AMBA_PL011_CONSOLE"] == "y"
    # The host's kernel is another entry of the same cache, found by its own --arch.
    host = run_vztt("kernel", "info", "--json", cache=tmp_path / "cache", env=env).json()
    assert host["wanted"]["arch"] == kernel_config.host_arch()
    assert host.get("path") != doc["path"]
    assert not (tmp_path / "cache" / ".work").exists() or not list((tmp_path / "cache" / ".work").iterdir())


@ROOT
@pytest.mark.network
@pytest.mark.slow
def test_an_option_arm64_does_not_have_is_named_and_nothing_is_built(built_kernel_arm64: Path,
                                                                      tmp_path: Path) -> None:
    """An x86-only option put into the shared fragment: the aarch64 kernel's
    configuration drops it; check and build name it, its file and why (one
    line, exit 6), and the build writes nothing into the kernel cache."""
    kdir = copy_kernel_dir(tmp_path)
    shared = kdir / kernel_series.FRAGMENT
    shared.write_text(shared.read_text() + "CONFIG_KVM_GUEST=y\n")
    env = kernel_env(built_kernel_arm64)             # its source .deb: nothing to download
    before = sorted(p.name for p in built_kernel_arm64.iterdir())

    result = run_vztt("kernel", "--kernel-dir", kdir, "check", "--arch", "aarch64", "--json",
                      cache=tmp_path / "cache", env=env)
    assert result.returncode == 6, result.stderr
    doc = result.json()
    assert doc["arch"] == "aarch64" and doc["dropped"] == ["CONFIG_KVM_GUEST"]
    option = next(o for o in doc["options"] if o["name"] == "CONFIG_KVM_GUEST")
    assert option["fragment"] == "container.config"
    assert option["needs"] == "no such option in this kernel's Kconfig for arm64"
    line = one_line_error(result)
    assert line == (f"vztt: build error: {shared}: 1 options did not survive olddefconfig on linux-source-6.1 "
                    f"{doc['source']['version']} for aarch64: CONFIG_KVM_GUEST=y became n (no such option in this "
                    "kernel's Kconfig for arm64)"), line

    result = run_vztt("kernel", "--kernel-dir", kdir, "build", "--arch", "aarch64", cache=tmp_path / "cache", env=env)
    assert result.returncode == 6, result.stderr
    line = one_line_error(result)
    assert line.startswith(f"vztt: build error: {shared}: 1 options did not survive olddefconfig for aarch64: "
                           "CONFIG_KVM_GUEST=y became n (no such option"), line
    assert sorted(p.name for p in built_kernel_arm64.iterdir()) == before
    assert not (tmp_path / "cache" / ".work").exists() or not list((tmp_path / "cache" / ".work").iterdir())
