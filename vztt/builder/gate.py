"""The build's gate: boot-test the packed archive between pack and promote,
and promote only a template that passes.

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
from vztt.boot.report import SKIPPED, format_table, manifest_record
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
    """Boot-test the packed plain archive among `outputs` ((temporary, final)
    pairs) before promote. Passed or skipped: returns the manifest's
    `boot_test` record. Failed: every output is renamed to `<final>-failed`,
    the manifest (with the report) written as `<manifest>-failed`, nothing is
    promoted, and BootError or CheckFailed is raised.

    `manifest` is the build's Manifest (a dict, as the pipeline made it before
    the typed Manifest, is converted)."""
    if not test:
        remove_failed(cache, manifest_path)   # superseded by what is promoted now
        return {"result": SKIPPED}
    plain = cache.file(formats.get("plain").file_name(recipe.name))
    tested = next((tmp for tmp, final in outputs if final == plain), None)
    if tested is None:
        # A ploop-only build: the runtime boots a root tree, and the ploop
        # image's ext4 is not unpacked here (yet).
        progress.say("  test       skipped: no plain archive to boot (build with --format all to test)")
        return {"result": SKIPPED, "reason": "no plain archive to boot"}
    with progress.step("test") as st:
        try:
            report = boot_test(recipe, cache, tested)
        except RuntimeUnavailable as e:
            e.message += " (`vztt build --no-test` builds without the boot test)"
            raise
        record = manifest_record(report)
        error = report.exception()
        if error is None:
            st.note(f"{len(report.checks)} checks passed, boot {report.boot_seconds:.2f} s, "
                    f"checks done {report.ready_seconds:.2f} s after start")
            remove_failed(cache, manifest_path)
            return record
        st.note("did not boot" if report.error_kind == "boot" else
                "FAILED: " + ", ".join(c.name for c in report.failed))
        progress.say(format_table(report).rstrip())
        remove_failed(cache, manifest_path)
        kept = []
        for tmp, final in outputs:
            if tmp.exists():
                replace_into_place(tmp, failed_path(final))
                kept.append(failed_path(final).name)
        built = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, str(manifest_path))
        failed_manifest = failed_path(manifest_path)
        dataclasses.replace(built, boot_test=record, failed_files=kept).write(failed_manifest)
        error.message = (f"{error.message}; nothing promoted: kept as {failed_path(plain)} "
                         f"with its report in {failed_manifest}")
        raise error


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
