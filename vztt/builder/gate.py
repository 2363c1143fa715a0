"""The build's gate: boot-test what was packed between pack and promote, and
promote only a template that passes. Each format vztt boots is tested from
its own artifact (the plain archive unpacked; the ploop cache's disk read
back and mounted read-only): what ships is what was booted.

A failed one is kept beside the cache's templates, not promoted: every
output renamed to `<final>-failed`, its manifest (with the boot test's
report) written as `<name>.manifest.json-failed`, listing those files so that
the next build of the name, promoted or not, removes them (`remove_failed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vztt.base.files import replace_into_place
from vztt import formats
from vztt.base.progress import Progress
from vztt.boot.report import SKIPPED, Report, format_table, manifest_record
from vztt.boot.runtime import RuntimeUnavailable
from vztt.boot.test import boot_test
from vztt.recipe.recipe import Recipe
from vztt.store.manifest import Manifest, ManifestError
from vztt.store.templates import TemplateCache

FAILED = "-failed"               # suffix of a template that failed its boot test


def failed_path(final: Path) -> Path:
    return final.with_name(final.name + FAILED)


def gate(recipe: Recipe, cache: TemplateCache, outputs: list[tuple[Path, Path]], manifest_path: Path,
         manifest: Manifest | dict[str, Any], test: bool, progress: Progress) -> dict[str, Any]:
    """Boot-test what ships before promote: every format among `outputs` ((temporary,
    final) pairs) that vztt boots (plain, ploop), each from its own artifact. Passed or
    skipped: returns the manifest's `boot_test` record (the first format's report, and
    `formats`: each tested format's result). Failed: every output is renamed to
    `<final>-failed`, the manifest (with the report) written as `<manifest>-failed`,
    nothing is promoted, and BootError or CheckFailed is raised.

    `manifest` is the build's Manifest (a dict, as the pipeline made it before
    the typed Manifest, is converted)."""
    if not test:
        remove_failed(cache, manifest_path)   # superseded by what is promoted now
        return {"result": SKIPPED}
    built = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, str(manifest_path))
    temporary = {final.name: tmp for tmp, final in outputs}
    tested = [f for f in formats.bootable() if f in built.archives]
    if not tested:
        progress.say("  test       skipped: no format vztt boots was built "
                     f"({' or '.join(formats.bootable())}; the other hosts' tests boot the rest)")
        return {"result": SKIPPED, "reason": f"no {' or '.join(formats.bootable())} archive to boot"}
    record: dict[str, Any] = {}
    for fmt in tested:
        files = [temporary[f.file] for f in built.archives[fmt].files]
        with progress.step("test" if fmt == tested[0] else f"test-{fmt}") as st:
            try:
                report = boot_test(recipe, cache, files, fmt=fmt)
            except RuntimeUnavailable as e:
                e.message += " (`vztt build --no-test` builds without the boot test)"
                raise
            error = report.exception()
            if error is None:
                st.note(f"{fmt}: {len(report.checks)} checks passed, boot {report.boot_seconds:.2f} s, "
                        f"checks done {report.ready_seconds:.2f} s after start")
                tested_record = manifest_record(report)
                record = record or {**tested_record, "formats": {}}
                record["formats"][fmt] = {k: tested_record[k] for k in ("result", "seconds", "ready_seconds")}
                continue
            st.note(f"{fmt}: " + ("did not boot" if report.error_kind == "boot" else
                                  "FAILED: " + ", ".join(c.name for c in report.failed)))
            _keep_failed(cache, outputs, manifest_path, built, report, progress)
            cache_file = failed_path(cache.file(built.archives[fmt].file))
            error.message = (f"{error.message}; nothing promoted: kept as {cache_file} "
                             f"with its report in {failed_path(manifest_path)}")
            raise error
    remove_failed(cache, manifest_path)
    return record


def _keep_failed(cache: TemplateCache, outputs: list[tuple[Path, Path]], manifest_path: Path, built: Manifest,
                 report: Report, progress: Progress) -> None:
    """Every output renamed to <final>-failed, the manifest with the report beside them."""
    progress.say(format_table(report).rstrip())
    remove_failed(cache, manifest_path)
    kept = []
    for tmp, final in outputs:
        if tmp.exists():
            replace_into_place(tmp, failed_path(final))
            kept.append(failed_path(final).name)
    dataclasses.replace(built, boot_test=manifest_record(report), failed_files=kept).write(failed_path(manifest_path))


def remove_failed(cache: TemplateCache, manifest_path: Path) -> None:
    """Drop the files an earlier failed boot test left (listed in its -failed manifest)."""
    failed_manifest = failed_path(manifest_path)
    try:
        failed_files = Manifest.read(failed_manifest).failed_files
    except ManifestError:
        return
    for name in failed_files:
        if "/" not in name and name.endswith(FAILED):
            (cache.root / name).unlink(missing_ok=True)
    failed_manifest.unlink(missing_ok=True)
