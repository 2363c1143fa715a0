"""Removing container runs: one run's processes, mounts, cgroups and scratch
(`teardown`, for Container.close), and what runs whose owner died left in a
state directory (`cleanup_stale`, called on every start)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from vztt.base.errors import RuntimeUnavailable
from . import _linux, cgroup


def cleanup_stale(state_dir: str | os.PathLike) -> list[str]:
    """Remove what runs whose owner died left in state_dir: processes, mounts,
    cgroups, scratch trees, state files. A run is stale when nobody holds the
    lock on its state file (the owner holds it while alive; the kernel drops
    it when the owner dies, however it dies). Returns the names cleaned up;
    RuntimeUnavailable if something could not be removed."""
    state_dir = Path(state_dir).resolve()
    cleaned, problems = [], []
    for partial in state_dir.glob(".*.json.*"):  # its owner was killed inside Container._claim
        with contextlib.suppress(FileNotFoundError, BlockingIOError), open(partial) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            partial.unlink()
    for state_file in sorted(state_dir.glob("*.json")):
        try:
            lock = open(state_file)
        except FileNotFoundError:
            continue  # cleaned by someone else meanwhile
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            if not state_file.exists():
                continue  # cleaned by someone else before we got the lock
            try:
                record = json.load(lock)
            except ValueError:
                problems.append(f"unreadable state file {state_file}")
                continue
            found = teardown(record, state_dir)
            if found:
                problems.extend(found)
            else:
                state_file.unlink(missing_ok=True)
                cleaned.append(record["name"])
    if problems:
        raise RuntimeUnavailable("cannot clean up earlier container runs: " + "; ".join(problems))
    return cleaned


def teardown(record: dict, state_dir: Path) -> list[str]:
    """Kill, unmount, remove cgroups and scratch of one run; returns problems."""
    problems = []
    dirs = [Path(d) for d in record["cgroups"]]
    if dirs and not cgroup.kill(dirs):
        problems.append(f"processes survive SIGKILL in {dirs[0]}")
    scratch = Path(record["scratch"])
    if scratch.parent != state_dir:  # never rm -rf outside the state dir
        return problems + [f"scratch {scratch} is not in {state_dir}"]
    left = unmount_under(scratch)
    problems += [f"cannot unmount {point}" for point in left]
    problems += cgroup.remove(dirs)
    if not left and scratch.exists():
        try:
            shutil.rmtree(scratch)
        except OSError as e:
            problems.append(f"cannot remove {scratch}: {e.strerror}")
    return problems


def unmount_under(top: Path) -> list[str]:
    """Unmount everything at or below `top` on the host, last mounted first;
    returns what is still mounted."""
    def mounted() -> list[str]:
        return [point for point, _, _ in _linux.mountinfo()
                if point == str(top) or point.startswith(f"{top}/")]

    for point in reversed(mounted()):
        try:
            _linux.umount2(point)
        except OSError:
            with contextlib.suppress(OSError):
                _linux.umount2(point, _linux.MNT_DETACH)  # busy: detach, freed when unused
    return mounted()
