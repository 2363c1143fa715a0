#!/usr/bin/env python3
"""Pull + create against `curl | lz4 -d | tar -x`, from a local nginx (part of `make bench`).

The cached template is published (signed) to a directory a loopback nginx
serves. Then, alternating, median of --rounds:

  baseline   curl -s URL | lz4 -d | tar -x (owners, xattrs, ACLs kept) into an empty directory
  create     vztt create NAME DIR --layout dir --from URL, with an empty cache: index and
             signature verified, the archive streamed into the guarded unpacking while it
             is hashed and written to the cache, size and sha256 checked, promoted
  pull+create  vztt pull (to an empty cache), then vztt create --offline (sha256 checked again)

Both write to the same filesystem; the page cache is flushed (sync) before each run.

    python3 tests/bench_mirror.py --cache CACHE [--recipe NAME]    # on its own, with a built template
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from nginx import Nginx  # noqa: E402


def _timed(cmd: list[str] | str, env: dict[str, str] | None = None, shell: bool = False) -> float:
    os.sync()
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, shell=shell, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {cmd if shell else ' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return took


def pull_create(cache: Path, recipe: str, scratch: Path, rounds: int = 3) -> dict[str, float]:
    """Seconds (medians) and ratios for pulling + creating NAME from a local nginx."""
    work = Path(tempfile.mkdtemp(prefix="pull-create-", dir=scratch))
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    vztt = [sys.executable, "-m", "vztt"]
    try:
        gpg = ["gpg", "--homedir", str(home), "--batch", "--yes"]
        subprocess.run(gpg + ["--passphrase", "", "--quick-gen-key", "bench <bench@example.invalid>", "ed25519",
                              "sign", "never"], check=True, capture_output=True)
        (work / "trusted.gpg").write_bytes(subprocess.run(gpg + ["--export", "bench@example.invalid"],
                                                          check=True, capture_output=True).stdout)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("VZTT_")}, "GNUPGHOME": str(home),
               "VZTT_KEYRING": str(work / "trusted.gpg")}
        with Nginx(work / "www") as web:
            subprocess.run(vztt + ["--cache-dir", str(cache), "publish", recipe, "--to", str(web.mirror_root),
                                   "--sign-key", "bench@example.invalid", "--allow-untested"],
                           env=env, check=True, capture_output=True, cwd=REPO)
            index = json.loads((web.mirror_root / "index.json").read_text())
            build = index["templates"][recipe]["builds"][0]
            url = web.url("mirror") + build["archives"]["plain"]["path"]
            times: dict[str, list[float]] = {"baseline": [], "create": [], "pull_create": []}
            for _ in range(rounds):
                for kind in times:
                    for d in ("tree", "cache"):
                        shutil.rmtree(work / d, ignore_errors=True)
                    if kind == "baseline":
                        (work / "tree").mkdir()
                        times[kind].append(_timed(
                            f"curl -sf {url} | lz4 -d | tar -x --numeric-owner -p --xattrs --xattrs-include='*' "
                            f"--acls -C {work / 'tree'}", shell=True))
                    elif kind == "create":
                        times[kind].append(_timed(vztt + ["--cache-dir", str(work / "cache"), "create", recipe,
                                                          str(work / "tree"), "--layout", "dir", "--from",
                                                          web.url("mirror")], env))
                    else:
                        times[kind].append(_timed(
                            f"{' '.join(vztt)} --cache-dir {work / 'cache'} pull {recipe} --from {web.url('mirror')}"
                            f" && {' '.join(vztt)} --cache-dir {work / 'cache'} create {recipe} {work / 'tree'} "
                            f"--layout dir --offline", env=env, shell=True))
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"curl_lz4_tar": med["baseline"], "pull_create_streamed": med["create"],
                "pull_then_create": med["pull_create"],
                "ratio_pull_create_streamed": round(med["create"] / med["baseline"], 2),
                "ratio_pull_then_create": round(med["pull_create"] / med["baseline"], 2),
                "archive_mb": round(build["archives"]["plain"]["size"] / 1e6, 1)}
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict[str, float]) -> None:
    print(f"  curl | lz4 -d | tar -x    {r['curl_lz4_tar']:6.2f} s   ({r['archive_mb']} MB archive, local nginx)")
    print(f"  vztt create (pulls)       {r['pull_create_streamed']:6.2f} s   ratio {r['ratio_pull_create_streamed']:.2f}"
          "   (aim: <= 1.2; verified, streamed)")
    print(f"  vztt pull + create        {r['pull_then_create']:6.2f} s   ratio {r['ratio_pull_then_create']:.2f}"
          "   (two commands, sha256 checked twice)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, type=Path, help="cache holding the built template")
    ap.add_argument("--recipe", default="debian-12-x86_64-minimal")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp"), help="where the trees and caches go")
    args = ap.parse_args()
    result = pull_create(args.cache.resolve(), args.recipe, args.scratch, args.rounds)
    report(result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
