"""The nightly job: what changed, what to rebuild, and how to split the work.

A template is current when its recipe digest and the package set of a fresh
resolution equal what its cached manifest records. The whole lock is not
compared: a repository's Release file gets a new Date every few hours with
the same packages, and that is no reason to rebuild.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vztt.base.errors import RecipeError
from vztt.base.progress import Progress
from vztt.builder import layer as layers
from vztt.builder import pipeline as build_mod
from vztt.recipe.lock import Lock
from vztt.recipe.recipe import Recipe
from vztt.recipe.variables import Mirrors
from vztt.store.templates import TemplateCache

if TYPE_CHECKING:
    from vztt.ci.jobs import Runners

CURRENT, OUTDATED, NEW = "current", "outdated", "not built"
NOT_CONFIGURED = "not configured"      # a mirror variable it needs has no value on this host


@dataclass
class Change:
    name: str
    arch: str
    old: str | None       # None: added
    new: str | None       # None: removed

    def line(self) -> str:
        if self.old is None:
            return f"+ {self.name} {self.new}"
        if self.new is None:
            return f"- {self.name} {self.old}"
        return f"~ {self.name} {self.old} -> {self.new}"


@dataclass
class Status:
    name: str
    state: str
    reasons: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    lock: Lock | None = None          # the fresh resolution
    arch: str = ""                    # the recipe's

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "state": self.state, "reasons": self.reasons,
                "changes": [{"name": c.name, "arch": c.arch, "old": c.old, "new": c.new} for c in self.changes]}


Row = tuple[str, str, str]       # (name, arch, version), as Manifest.package_rows() gives them


def package_changes(old: list[Row], new: list[Row]) -> list[Change]:
    """Packages added, removed and changed between two package lists."""
    before = {(name, arch): version for name, arch, version in old}
    after = {(name, arch): version for name, arch, version in new}
    out = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            out.append(Change(key[0], key[1], before.get(key), after.get(key)))
    return out


def _lock_packages(lock: Lock) -> list[Row]:
    return [(p.name, p.arch, p.version) for p in lock.packages]


def status(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, progress: Progress) -> Status:
    """Resolve afresh (into a scratch lock, the real one is left alone; not at all when a lock
    at hand is what it would give: unchanged_lock) and compare. A layer
    is resolved on its base's current build, and is outdated when that is not the build it
    was made on."""
    entry = cache.entry(recipe.name)
    base = cache.entry(recipe.base_template) if recipe.base_template else None
    if recipe.base_template and base is None:
        return Status(recipe.name, NEW if entry is None else OUTDATED, [f"base {recipe.base_template} is not built"],
                      arch=recipe.arch)
    # Resolving is skipped when a lock it would make again is at hand: the cached build's, or
    # the lock file, when the resolve inputs and the repositories' Release files are unchanged
    # (builder/pipeline.py unchanged_lock). Else resolve afresh, into a scratch lock.
    candidates = []
    if entry is not None:
        candidates.append((cache.history_dir(recipe.name) / f"{entry.manifest.build_id}.lock.json",
                           entry.manifest.lock_digest))
    candidates.append((cache.lock_file(recipe.name), None))
    fresh = build_mod.unchanged_lock(recipe, cache, mirrors, candidates, progress)
    if fresh is None:
        with cache.scratch(f"status-{recipe.name}") as scratch:
            fresh = build_mod.resolve(recipe, cache, mirrors, scratch / "lock.json", progress).lock
    if entry is None:
        return Status(recipe.name, NEW, ["no cached template"], lock=fresh, arch=recipe.arch)
    m = entry.manifest
    reasons = []
    if m.recipe_digest != recipe.digest():
        reasons.append("recipe changed")
    if base is not None and m.base != layers.base_record(base):
        reasons.append(f"base {base.name} rebuilt ({m.base.build_id if m.base else 'unknown build'} -> "
                       f"{base.manifest.build_id})")
    expected = _lock_packages(fresh)
    if base is not None:
        # A layer's lock holds what it adds or changes: the image is the base's set with that on top.
        layered = {(name, arch): version for name, arch, version in base.manifest.package_rows() + expected}
        expected = [(name, arch, version) for (name, arch), version in layered.items()]
    changes = package_changes(m.package_rows(), expected)
    if m.packages_digest != fresh.packages_digest:
        reasons.append(f"{len(changes)} package(s) changed" if changes else "package files changed (same versions)")
    return Status(recipe.name, OUTDATED if reasons else CURRENT, reasons, changes, fresh, recipe.arch)


def update(recipe: Recipe, cache: TemplateCache, mirrors: Mirrors, progress: Progress,
           options: build_mod.BuildOptions) -> tuple[Status, build_mod.BuildResult | None]:
    """Rebuild (with its boot test) only when status says so, from the fresh lock."""
    st = status(recipe, cache, mirrors, progress)
    if st.state == CURRENT:
        return st, None
    assert st.lock is not None
    lock_path = options.lock_path or cache.lock_file(recipe.name)
    st.lock.write(lock_path)
    opts = build_mod.BuildOptions(**{**options.__dict__, "locked": True, "lock_path": lock_path})
    return st, build_mod.build(recipe, cache, mirrors, opts, progress)


def diff(cache: TemplateCache, name: str) -> dict[str, Any]:
    """The newest promoted build against the one before it."""
    history = cache.history(name)
    if len(history) < 2:
        raise RecipeError(f"{name}: {len(history)} build(s) in {cache.history_dir(name)}; diff needs two")
    old, new = history[-2], history[-1]
    changes = package_changes(old.package_rows(), new.package_rows())
    sizes = {fmt: {"old": old.archives[fmt].total_size if fmt in old.archives else None, "new": a.total_size}
             for fmt, a in new.archives.items()}
    return {"name": name, "old": old.build_id, "new": new.build_id,
            "added": [c.__dict__ for c in changes if c.old is None],
            "removed": [c.__dict__ for c in changes if c.new is None],
            "upgraded": [c.__dict__ for c in changes if c.old is not None and c.new is not None],
            "sizes": sizes, "lines": [c.line() for c in changes]}


def parse_shard(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", spec or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise RecipeError(f"--shard {spec}: expected K/N with 1 <= K <= N (this runner's share, e.g. 2/4)")
    return int(m.group(1)), int(m.group(2))


def shard(names: list[str], spec: str | None, base_of: dict[str, str] | None = None) -> list[str]:
    """This runner's share: sorted names, every N-th from the K-th. Same input, same split.
    A layer goes with its base (`base_of`): the groups of `groups()` are split, in order."""
    jobs = groups(names, base_of)
    if spec:
        k, n = parse_shard(spec)
        jobs = [g for i, g in enumerate(jobs) if i % n == k - 1]
    return [name for g in jobs for name in g]


def groups(names: list[str], base_of: dict[str, str] | None = None) -> list[list[str]]:
    """Templates grouped by their root: a template that is no layer (or whose base is not
    among `names`), then every layer on it, each after its base. Roots sorted by name."""
    base_of = base_of or {}
    chosen = set(names)

    def root(n: str) -> str:
        seen = {n}
        while base_of.get(n) in chosen and base_of[n] not in seen:
            n = base_of[n]
            seen.add(n)
        return n

    by_root: dict[str, list[str]] = {}
    for n in sorted(chosen):
        by_root.setdefault(root(n), []).append(n)
    return [dependency_order(by_root[r], base_of) for r in sorted(by_root)]


def dependency_order(names: list[str], base_of: dict[str, str] | None = None) -> list[str]:
    """`names` sorted, then each layer moved after its base (when the base is among them)."""
    base_of, chosen, out = base_of or {}, set(names), []

    def place(n: str, path: tuple[str, ...] = ()) -> None:
        if n in out or n in path:
            return
        if base_of.get(n) in chosen:
            place(base_of[n], path + (n,))
        out.append(n)

    for n in sorted(chosen):
        place(n)
    return out


@dataclass(frozen=True)
class MatrixJob:
    """One CI job: a template, the layers that ride in it, and where it runs."""
    templates: list[str]              # the template, then its layers (each after its base)
    arch: str                         # the template's architecture (its layers': the same)
    runner: tuple[str, ...]           # runner labels of its own arch; () for the default runners
    emulated: bool                    # on the default runners under emulation: `make binfmt` first

    def as_dict(self) -> dict[str, Any]:
        return {"template": self.templates[0], "layers": self.templates[1:], "arch": self.arch,
                "runner": list(self.runner), "emulated": self.emulated}


def matrix_jobs(names: list[str], base_of: dict[str, str] | None = None, arch_of: dict[str, str] | None = None,
                runners: Runners | None = None) -> list[MatrixJob]:
    """`groups()` with each job's architecture (its template's, `arch_of`; x86_64 when not
    known) and its runners (vztt/ci/jobs.py Runners)."""
    from vztt.ci.jobs import RUNNER_ARCH, Runners
    runners = runners or Runners()
    arch_of = arch_of or {}
    out = []
    for g in groups(names, base_of):
        arch = arch_of.get(g[0], RUNNER_ARCH)
        out.append(MatrixJob(g, arch, runners.of(arch), runners.emulated(arch)))
    return out


def matrix(names: list[str], fmt: str, base_of: dict[str, str] | None = None, arch_of: dict[str, str] | None = None,
           runners: Runners | None = None) -> str:
    """One CI job per template; a layer goes into its base's job, after it (it is built on
    the base's build, which the job has in its cache). A job runs on runners labelled for
    its template's architecture when `runners` names some, else on the default (x86_64)
    runners, under emulation for another architecture."""
    jobs = matrix_jobs(names, base_of, arch_of, runners)
    if fmt == "github":
        # For `strategy: matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}`: one `include` entry
        # per job, whose keys the workflow reads (vztt/ci/github.py): `runner` is its runs-on,
        # `emulated` runs `make binfmt` first, a base's layers ride in its job as `layers` (with
        # their cache and artifact paths).
        from vztt.ci.github import RUNNER
        entries = [{"template": j.templates[0], "arch": j.arch, "runner": list(j.runner or RUNNER),
                    "emulated": j.emulated, "layers": " ".join(j.templates[1:]),
                    **(_layer_paths(j.templates[1:]) if len(j.templates) > 1 else {})} for j in jobs]
        return json.dumps({"include": entries}, separators=(",", ":"))
    if fmt == "gitlab":
        # The child pipeline .gitlab-ci.yml's plan job writes and triggers: one job per template
        # and its layers (vztt/ci/gitlab.py).
        from vztt.ci.gitlab import child_pipeline
        return child_pipeline(jobs)
    return json.dumps([n for j in jobs for n in j.templates])


def _layer_paths(layers: list[str]) -> dict[str, str]:
    """The layers' cache and artifact paths, as the workflow reads them from the matrix entry
    (`${{ matrix.<key> }}`, vztt/ci/github.py): one path a line."""
    from vztt.ci.jobs import UPDATE, layer_path_sets, layer_paths
    return {key: "\n".join(layer_paths(paths, layers)) for key, paths in layer_path_sets(UPDATE).items()}


def write_github_output(key: str, value: str) -> None:
    """Also hand the value to GitHub Actions when run there."""
    out = os.environ.get("GITHUB_OUTPUT")
    if out:
        with open(out, "a") as fh:
            fh.write(f"{key}={value}\n")


