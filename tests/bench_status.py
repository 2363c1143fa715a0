#!/usr/bin/env python3
"""`make bench`, no-op status: how long `vztt status` takes for one template and
for every Debian and Ubuntu template, and how that grows with templates that
share repositories (each repository's metadata is refreshed once per run,
backend/aptlists.py).

    status, 1 template            vztt status debian-12-x86_64-minimal
    status, Debian and Ubuntu     vztt status over every shipped Debian/Ubuntu template
                                  (Ubuntu's when UBUNTU_MIRROR is configured)
    status, + N variants          the same plus N recipes extending debian-12 (same repositories)

Each template is resolved first (its lock: what a no-op status compares
with). Each status is run twice and the second time is reported (the first
fills apt's lists). The number of `apt-get update` runs (refreshed repositories) is read
from the resolve logs. On its own: python3 tests/bench_status.py --cache DIR.
"""

from __future__ import annotations

import argparse
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

from vztt.recipe import variables  # noqa: E402
from vztt.recipe.recipe import RecipeStore  # noqa: E402

VARIANTS = 8


def _status(vztt: list[str], names: list[str], env: dict[str, str], cache: Path) -> tuple[float, int]:
    """Seconds for one `vztt status NAMES` (exit 0 or 2: current or not), and its apt-get update runs."""
    for log in (cache / "logs").glob("*.resolve.log"):
        log.unlink()
    start = time.monotonic()
    proc = subprocess.run(vztt + ["status", *names], env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode not in (0, 2):
        sys.exit(f"bench: vztt status {' '.join(names)} failed:\n{proc.stderr[-2000:]}")
    updates = sum(len(re.findall(r"^\$ apt-get update", log.read_text(errors="replace"), re.M))
                  for log in (cache / "logs").glob("*.resolve.log"))
    return took, updates


def status_times(cache: Path, recipe: str = "debian-12-x86_64-minimal") -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix="vztt-bench-status-", dir="/var/tmp"))
    try:
        recipes = scratch / "recipes"
        shutil.copytree(REPO / "recipes", recipes)
        for i in range(1, VARIANTS + 1):
            (recipes / f"{recipe}-v{i}.toml").write_text(f'extends = "{recipe}"\n')
        store = RecipeStore(recipes)
        configured = variables.load().values
        shipped = [n for n in RecipeStore(REPO / "recipes").names()
                   if n.startswith("debian-") or (n.startswith("ubuntu-") and "UBUNTU_MIRROR" in configured)]
        variants = [f"{recipe}-v{i}" for i in range(1, VARIANTS + 1)]
        assert all(v in store.names() for v in variants)
        env = {**os.environ, "VZTT_CACHE": str(cache), "VZTT_RECIPES": str(recipes)}
        vztt = [sys.executable, "-m", "vztt"]
        # A no-op status: every template has its lock (a built one has it too); layers whose
        # base is not built are left to status (it says so without resolving).
        for name in shipped + variants:
            if not store.load(name).base_template and not (cache / "locks" / f"{name}.lock.json").is_file():
                subprocess.run(vztt + ["resolve", name], env=env, capture_output=True, text=True, check=True)
        results: dict[str, float] = {}
        for label, names in (("status_one", [recipe]), ("status_all", shipped),
                             ("status_all_variants", shipped + variants)):
            _status(vztt, names, env, cache)                       # fills apt's lists
            took, updates = _status(vztt, names, env, cache)
            results[label] = round(took, 2)
            results[f"{label}_refreshes"] = updates
            print(f"  status, {len(names):2d} templates     {took:6.2f} s   ({updates} repositories refreshed: "
                  f"{'; '.join(names) if len(names) < 3 else label.replace('_', ' ')})", flush=True)
        if "UBUNTU_MIRROR" not in configured:
            print("  (Ubuntu's templates left out: UBUNTU_MIRROR is not configured here)", flush=True)
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a cache directory (a built debian-12 makes its status a no-op)")
    args = ap.parse_args()
    print(f"bench: no-op status ({os.cpu_count()} cores)", flush=True)
    status_times(Path(args.cache))


if __name__ == "__main__":
    main()
