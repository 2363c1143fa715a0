#!/usr/bin/env python3
"""A layer on a cached base against the same package set from nothing (part of `make bench`).

  layer  vztt build debian-12-x86_64-nginx: the cached debian-12-x86_64-minimal's archive
         (sha256 checked) unpacked into the image, nginx installed on top, packed
  flat   the same recipe with `extends` instead of `base`: the same packages, files, hooks
         and checks, installed from nothing (Essential stage, then apt)

Both with --no-test (the boot test costs both the same), each built once to warm
its apt lists and the package cache, then timed (median of --rounds); the ratio
is layer / flat (aim: a third or less).

    python3 tests/bench_layer.py --cache CACHE    # on its own, with debian-12-x86_64-minimal built in CACHE
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYER = "debian-12-x86_64-nginx"
FLAT = "bench-debian-12-x86_64-nginx-flat"
BASE = "debian-12-x86_64-minimal"


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start


def layer_vs_flat(cache: Path, scratch: Path, rounds: int = 1) -> dict[str, float]:
    """Times of the layer and the flat build in `cache` (which holds the base's build)."""
    recipes = scratch / "recipes-layer"
    shutil.copytree(REPO / "recipes", recipes)
    text = (recipes / f"{LAYER}.toml").read_text()
    assert f'base = "{BASE}"' in text
    (recipes / f"{FLAT}.toml").write_text(text.replace(f'base = "{BASE}"', f'extends = "{BASE}"'))
    env = {**os.environ, "VZTT_CACHE": str(cache)}
    build = [sys.executable, "-m", "vztt", "--recipes", str(recipes), "build", "--no-test"]
    for name in (LAYER, FLAT):                      # warm: apt lists, package cache
        _timed(build + [name], env)
    times: dict[str, list[float]] = {LAYER: [], FLAT: []}
    for _ in range(rounds):
        for name in (LAYER, FLAT):
            times[name].append(_timed(build + [name], env))
    results = {"layer_build": statistics.median(times[LAYER]), "flat_build": statistics.median(times[FLAT])}
    results["layer_ratio"] = round(results["layer_build"] / results["flat_build"], 2)
    return results


def report(results: dict[str, float]) -> None:
    print(f"  layer on cached base     {results['layer_build']:6.1f} s   ({LAYER}, --no-test)", flush=True)
    print(f"  same set from nothing    {results['flat_build']:6.1f} s", flush=True)
    print(f"  ratio layer / nothing    {results['layer_ratio']:6.2f}   (aim: <= 0.33)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, type=Path, help=f"a cache holding {BASE}")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="vztt-bench-layer-", dir="/var/tmp"))
    try:
        report(layer_vs_flat(args.cache.resolve(), scratch, args.rounds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
