#!/usr/bin/env python3
"""`make bench`: our build against mmdebstrap's, in the same run, on this machine.

  cold   vztt build with an empty cache (apt lists and packages downloaded)
  warm   vztt build again: lists refreshed, every package from the package cache
  mmdebstrap --variant=minbase --include=<the recipe's extra packages>, to a tarball
  boot       vztt test on the built template: container start to every check
             passed (median of 3; the builds above include one such test each)
  pull+create  vztt create from a local nginx mirror vs curl | lz4 -d | tar -x (tests/bench_mirror.py)
  status     no-op `vztt status`: one template, every Debian and Ubuntu one, and with 8 more
             sharing debian-12's repositories (tests/bench_status.py)
  layer      debian-12-x86_64-nginx on the cached base vs the same set from nothing (tests/bench_layer.py)
  kernel     vztt kernel build, cold (source fetched through apt, tinyconfig + fragment, -j<cores>)
             and again (cached: nothing to build)
  vm boot    vztt test --vm: qemu start to every check passed, under TCG unless KVM works
             (median of 3)
  formats    vztt build --format all (locked, the recipe's compression level): each
             format's step time and its files' size (tests/bench_formats.py)
  arm64      debian-12-aarch64-minimal under qemu-user, cold and warm, against our amd64
             build of the same set and mmdebstrap --arch=arm64 (tests/bench_arm64.py)

Prints the times and the ratios (ours / mmdebstrap: below 1 is faster), and
writes them as JSON to bench-results.json (or --out).

`--boot-only CACHE`: only the boot line, for the template already in CACHE
(e.g. the same template before and after a change to the boot test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vztt.recipe.recipe import RecipeStore  # noqa: E402
import bench_mirror  # noqa: E402  (tests/: pull + create from a local nginx)
import bench_formats  # noqa: E402  (tests/: every format's step and size)
import bench_status  # noqa: E402  (tests/: no-op status, one template and all)
import bench_layer  # noqa: E402  (tests/: a layer on the cached base against the same set from nothing)
import bench_arm64  # noqa: E402  (tests/: arm64 under emulation against amd64 and mmdebstrap --arch=arm64)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return took


def boot_test(vztt: list[str], recipe: str, env: dict[str, str]) -> dict:
    """`vztt test --json`: its report (ready_seconds: container start to the last check passed)."""
    proc = subprocess.run(vztt + ["test", recipe, "--json"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: vztt test {recipe} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def bench_boot(vztt: list[str], recipe: str, env: dict[str, str]) -> dict[str, float]:
    """`vztt test`, median of 3: container start to every check passed, and the whole test."""
    boots = sorted((boot_test(vztt, recipe, env) for _ in range(3)), key=lambda d: d["ready_seconds"])
    results = {"boot_to_checks": boots[1]["ready_seconds"], "boot_test_total": boots[1]["seconds"]}
    print(f"  boot to passed checks    {results['boot_to_checks']:6.2f} s   (aim: < 3 s; whole `vztt test` "
          f"{results['boot_test_total']:.2f} s with unpack and cleanup, aim: < 4 s)", flush=True)
    return results


def bench_kernel(vztt: list[str], recipe: str, env: dict[str, str], scratch: Path) -> dict[str, float]:
    """The container kernel's build, cold and cached, and boot tests in the VM runtime."""
    results: dict[str, float] = {}
    env = {**env, "VZTT_KERNEL_CACHE": str(scratch / "kernel")}
    results["kernel_build"] = timed(vztt + ["kernel", "build"], env)
    print(f"  kernel build, cold       {results['kernel_build']:6.1f} s   (aim: about 5 min with 2 cores)", flush=True)
    results["kernel_build_cached"] = timed(vztt + ["kernel", "build"], env)
    print(f"  kernel build, cached     {results['kernel_build_cached']:6.1f} s", flush=True)
    boots = []
    for _ in range(3):
        proc = subprocess.run(vztt + ["test", recipe, "--vm", "--json"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench: vztt test {recipe} --vm failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        boots.append(json.loads(proc.stdout))
    boots.sort(key=lambda d: d["ready_seconds"])
    results["vm_boot_to_checks"] = boots[1]["ready_seconds"]
    results["vm_test_total"] = boots[1]["seconds"]
    machine = re.search(r"qemu microvm, (\w+)", boots[1]["checks"][0]["detail"])
    accel = machine.group(1) if machine else "?"
    print(f"  VM boot to passed checks {results['vm_boot_to_checks']:6.2f} s   ({accel}; whole `vztt test --vm` "
          f"{results['vm_test_total']:.2f} s)", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="debian-12-x86_64-minimal")
    ap.add_argument("--out", default=str(REPO / "bench-results.json"))
    ap.add_argument("--boot-only", metavar="CACHE", help="Only the boot test, of the template in CACHE.")
    args = ap.parse_args()
    recipe = RecipeStore(REPO / "recipes").load(args.recipe)
    if args.boot_only:
        env = {**os.environ, "VZTT_CACHE": args.boot_only}
        results = bench_boot([sys.executable, "-m", "vztt"], args.recipe, env)
        Path(args.out).write_text(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=1) + "\n")
        return
    scratch = Path(tempfile.mkdtemp(prefix="vztt-bench-", dir="/var/tmp"))
    results: dict[str, float] = {}
    try:
        env = {**os.environ, "VZTT_CACHE": str(scratch / "cache"), "VZTT_PACKAGE_CACHE": str(scratch / "packages")}
        vztt = [sys.executable, "-m", "vztt"]
        print(f"bench: {args.recipe} ({os.cpu_count()} cores)", flush=True)
        results["vztt_cold"] = timed(vztt + ["build", args.recipe], env)
        print(f"  vztt build, cold cache   {results['vztt_cold']:6.1f} s", flush=True)
        results["vztt_warm"] = timed(vztt + ["build", args.recipe], env)
        print(f"  vztt build, warm cache   {results['vztt_warm']:6.1f} s", flush=True)
        results.update(bench_boot(vztt, args.recipe, env))
        results.update(bench_mirror.pull_create(scratch / "cache", args.recipe, scratch)); bench_mirror.report(results)
        results.update(bench_status.status_times(scratch / "cache", args.recipe))
        if args.recipe == bench_layer.BASE:
            results.update(bench_layer.layer_vs_flat(scratch / "cache", scratch))
            bench_layer.report(results)
        results.update(bench_kernel(vztt, args.recipe, env, scratch))
        results.update(bench_formats.formats_build(vztt, args.recipe, env, scratch / "cache"))
        # mmdebstrap reads the host's apt sources for its mirror, as our DEBIAN_MIRROR default does.
        tar = scratch / "mmdebstrap.tar"
        cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
               f"--include={','.join(recipe.include)}", recipe.release, str(tar)]
        results["mmdebstrap"] = timed(cmd)
        print(f"  mmdebstrap minbase+same  {results['mmdebstrap']:6.1f} s", flush=True)
        results["ratio_cold"] = round(results["vztt_cold"] / results["mmdebstrap"], 2)
        results["ratio_warm"] = round(results["vztt_warm"] / results["mmdebstrap"], 2)
        print(f"  ratio cold / mmdebstrap  {results['ratio_cold']:6.2f}   (aim: <= 1.3)")
        print(f"  ratio warm / mmdebstrap  {results['ratio_warm']:6.2f}   (aim: < 1.0)")
        if args.recipe == bench_arm64.AMD64:
            results.update(bench_arm64.arm64_vs(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
