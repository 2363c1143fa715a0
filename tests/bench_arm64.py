#!/usr/bin/env python3
"""arm64 under emulation (part of `make bench`): our foreign build against our own
amd64 build of the same package set and against mmdebstrap's arm64 build, in the
same run, on this x86_64 machine (qemu-user through binfmt_misc: `make binfmt`).

  arm64 cold   vztt build debian-12-aarch64-minimal --no-test, empty cache
  arm64 warm   the same again: every package from the package cache
  amd64 warm   vztt build debian-12-x86_64-minimal --no-test, warm, natively
  mmdebstrap   --arch=arm64 --variant=minbase --include=<the recipe's packages>, to a
               tarball (it downloads into a cache of its own each time: compare with cold)

Ratios: arm64 cold / mmdebstrap arm64 (aim: <= 1.0), arm64 warm / amd64 warm (the
cost of the emulation).

    python3 tests/bench_arm64.py [--out FILE]    # on its own
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vztt.recipe.recipe import RecipeStore  # noqa: E402

ARM64 = "debian-12-aarch64-minimal"
AMD64 = "debian-12-x86_64-minimal"


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start


def arm64_vs(scratch: Path) -> dict[str, float]:
    """The three builds and mmdebstrap's, timed; the ratios."""
    vztt = [sys.executable, "-m", "vztt"]
    env = {**os.environ, "VZTT_CACHE": str(scratch / "cache-arm64"), "VZTT_PACKAGE_CACHE": str(scratch / "pkgs-arm64")}
    out: dict[str, float] = {}
    out["arm64_cold"] = _timed(vztt + ["build", ARM64, "--no-test"], env)
    print(f"  arm64 vztt build, cold   {out['arm64_cold']:6.1f} s   (emulated)", flush=True)
    out["arm64_warm"] = _timed(vztt + ["build", ARM64, "--no-test"], env)
    print(f"  arm64 vztt build, warm   {out['arm64_warm']:6.1f} s", flush=True)
    amd = {**os.environ, "VZTT_CACHE": str(scratch / "cache-amd64"), "VZTT_PACKAGE_CACHE": str(scratch / "pkgs-amd64")}
    _timed(vztt + ["build", AMD64, "--no-test"], amd)          # warms lists and packages
    out["amd64_warm"] = _timed(vztt + ["build", AMD64, "--no-test"], amd)
    print(f"  amd64 vztt build, warm   {out['amd64_warm']:6.1f} s   (native, the same package set)", flush=True)
    recipe = RecipeStore(REPO / "recipes").load(ARM64)
    # mmdebstrap reads the host's apt sources for its mirror, as our DEBIAN_MIRROR default does.
    out["mmdebstrap_arm64"] = _timed(["mmdebstrap", "--arch=arm64", "--variant=minbase", "--mode=root", "--quiet",
                                      f"--include={','.join(recipe.include)}", recipe.release,
                                      str(scratch / "mmdebstrap-arm64.tar")])
    print(f"  arm64 mmdebstrap         {out['mmdebstrap_arm64']:6.1f} s", flush=True)
    out["ratio_arm64_cold_mmdebstrap"] = round(out["arm64_cold"] / out["mmdebstrap_arm64"], 2)
    out["ratio_arm64_warm_mmdebstrap"] = round(out["arm64_warm"] / out["mmdebstrap_arm64"], 2)
    out["ratio_arm64_amd64"] = round(out["arm64_warm"] / out["amd64_warm"], 2)
    print(f"  ratio arm64 cold / mmdebstrap arm64  {out['ratio_arm64_cold_mmdebstrap']:6.2f}   (aim: <= 1.0)")
    print(f"  ratio arm64 warm / mmdebstrap arm64  {out['ratio_arm64_warm_mmdebstrap']:6.2f}")
    print(f"  ratio arm64 warm / amd64 warm        {out['ratio_arm64_amd64']:6.2f}   (the emulation's cost)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench-arm64.json"))
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="vztt-bench-arm64-", dir="/var/tmp"))
    try:
        print(f"bench: {ARM64} on {os.uname().machine} ({os.cpu_count()} cores)", flush=True)
        results = arm64_vs(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
