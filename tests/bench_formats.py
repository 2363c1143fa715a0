#!/usr/bin/env python3
"""`make bench`'s formats part: one `vztt build --format all` of a template, and the
time of each format's step and the size of each format's files, from its manifest.

Alone: `tests/bench_formats.py [--recipe NAME] [--level N]` builds into a scratch
cache (packages from VZTT_PACKAGE_CACHE, or downloaded), at the recipe's
compression level or --level (0-9: a copy of the recipes with that level).
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

from vztt import formats  # noqa: E402


def formats_build(vztt: list[str], recipe: str, env: dict[str, str], cache: Path) -> dict[str, float]:
    """Build every format of `recipe` (its lock, as the cache has it) and report each step."""
    started = time.monotonic()
    proc = subprocess.run(vztt + ["build", recipe, "--locked", "--format", "all", "--no-test", "--json"], env=env,
                          capture_output=True, text=True)
    took = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"bench: vztt build {recipe} --format all failed:\n{proc.stderr[-2000:]}")
    manifest = json.loads((cache / f"{recipe}.manifest.json").read_text())
    results: dict[str, float] = {"formats_build": took}
    print(f"  vztt build --format all  {took:6.1f} s   (locked, no boot test)", flush=True)
    for name in formats.names():
        fmt = formats.get(name)
        record = manifest["archives"][name]
        size = sum(f["size"] for f in [record, *record.get("parts", [])])
        seconds = manifest["steps"][fmt.step]
        results[f"format_{name}_seconds"], results[f"format_{name}_bytes"] = seconds, size
        how = record.get("compression") or record.get("squashfs") or ""
        print(f"  format {name:<7} step {fmt.step:<7} {seconds:6.1f} s  {size / 1e6:7.1f} MB  {how}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="debian-12-x86_64-minimal")
    ap.add_argument("--level", type=int, choices=range(10), help="compression.level for the build")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="vztt-bench-formats-", dir="/var/tmp"))
    try:
        recipes = REPO / "recipes"
        if args.level is not None:
            recipes = scratch / "recipes"
            shutil.copytree(REPO / "recipes", recipes)
            with open(recipes / f"{args.recipe}.toml", "a") as fh:
                fh.write(f"\n[compression]\nlevel = {args.level}\n")
        cache = scratch / "cache"
        env = {**os.environ, "VZTT_CACHE": str(cache)}
        vztt = [sys.executable, "-m", "vztt", "--recipes", str(recipes)]
        print(f"bench: {args.recipe} formats ({os.cpu_count()} cores)", flush=True)
        subprocess.run(vztt + ["resolve", args.recipe], env=env, check=True, capture_output=True)
        formats_build(vztt, args.recipe, env, cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
