"""A boot test's report: each check's result, and the report as the terminal
table (`vztt test`), JUnit XML (`--junit`), a dict (`--json`) and the record
the manifest keeps (`boot_test`)."""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vztt.base.errors import BootError, CheckFailed
from vztt.base.files import atomic_write

OUTPUT_LIMIT = 4000              # characters of a failed check's output kept in reports
PASSED, FAILED_RESULT, SKIPPED = "passed", "failed", "skipped"


@dataclass
class Check:
    name: str
    result: str = SKIPPED          # passed, failed, skipped (not run)
    seconds: float = 0.0
    detail: str = ""               # one line: what was found, or what was wrong
    output: str = ""               # what the command printed (reported for failures)

    @property
    def ok(self) -> bool:
        return self.result == PASSED

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "result": self.result, "seconds": round(self.seconds, 3)}
        if self.detail:
            d["detail"] = self.detail
        if self.result == FAILED_RESULT and self.output:
            d["output"] = self.output[-OUTPUT_LIMIT:]
        return d


@dataclass
class Report:
    name: str
    archive: str
    hostname: str
    checks: list[Check] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0                 # the whole test: unpack to scratch removed
    unpack_seconds: float = 0.0
    boot_seconds: float | None = None    # container start to running/degraded
    ready_seconds: float | None = None   # container start to the last check passed (before poweroff)
    console_log: str = ""
    error: str = ""                      # one line, when the test failed
    error_kind: str = ""                 # "boot" or "check"

    @property
    def result(self) -> str:
        return PASSED if not self.error_kind and all(c.ok for c in self.checks) else FAILED_RESULT

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.result == FAILED_RESULT]

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "result": self.result, "archive": self.archive, "hostname": self.hostname,
            "started": self.started, "seconds": round(self.seconds, 3),
            "unpack_seconds": round(self.unpack_seconds, 3),
            "boot_seconds": None if self.boot_seconds is None else round(self.boot_seconds, 3),
            "ready_seconds": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            "console_log": self.console_log,
            "checks": [c.as_dict() for c in self.checks],
        }
        if self.error:
            d["error"] = {"kind": self.error_kind, "message": self.error}
        return d

    def exception(self) -> BootError | CheckFailed | None:
        """The error this report stands for (exit 8 or 9), or None if it passed."""
        if self.result == PASSED:
            return None
        cls = BootError if self.error_kind == "boot" else CheckFailed
        return cls(f"{self.name}: {self.error}")


def format_table(report: Report) -> str:
    width = max([len(c.name) for c in report.checks] + [5])
    lines = [f"{'CHECK':<{width}}  {'RESULT':<6}  {'SECONDS':>7}  DETAIL"]
    for c in report.checks:
        mark = {PASSED: "ok", FAILED_RESULT: "FAIL", SKIPPED: "-"}[c.result]
        seconds = f"{c.seconds:7.2f}" if c.result != SKIPPED else f"{'-':>7}"
        lines.append(f"{c.name:<{width}}  {mark:<6}  {seconds}  {c.detail}".rstrip())
        if c.result == FAILED_RESULT and c.output.strip():
            lines += ["    | " + line for line in c.output[-OUTPUT_LIMIT:].rstrip().splitlines()]
    passed = sum(c.ok for c in report.checks)
    summary = f"{report.name}: {report.result.upper()}, {passed} of {len(report.checks)} checks passed"
    if report.ready_seconds is not None:
        summary += f"; boot to checks done {report.ready_seconds:.2f} s"
    summary += f"; {report.seconds:.1f} s in all"
    lines.append(summary)
    if report.result != PASSED:
        lines.append(f"console log: {report.console_log}")
    return "\n".join(lines) + "\n"


_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 cannot carry most control characters (a console's escapes): show them."""
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def junit_xml(report: Report) -> str:
    failures = len(report.failed)
    skipped = sum(c.result == SKIPPED for c in report.checks)
    attrs = {"name": f"vztt boot test {report.name}", "tests": str(len(report.checks)),
             "failures": str(failures), "errors": "0", "skipped": str(skipped),
             "time": f"{report.seconds:.3f}"}
    suites = ET.Element("testsuites", attrs)
    suite = ET.SubElement(suites, "testsuite", {**attrs, "name": report.name, "timestamp": report.started,
                                                "hostname": socket.gethostname()})
    props = ET.SubElement(suite, "properties")
    for key in ("archive", "console_log", "boot_seconds", "ready_seconds"):
        value = getattr(report, key)
        if value is not None:
            ET.SubElement(props, "property", {"name": key, "value": _xml_text(str(value))})
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", {"classname": f"vztt.boottest.{report.name}", "name": c.name,
                                                 "time": f"{c.seconds:.3f}"})
        if c.result == FAILED_RESULT:
            failure = ET.SubElement(case, "failure", {"message": _xml_text(c.detail), "type": "boot" if c.name == "boot" else "check"})
            failure.text = _xml_text(c.output[-OUTPUT_LIMIT:])
        elif c.result == SKIPPED:
            ET.SubElement(case, "skipped", {"message": "not run: " + (report.error or "an earlier step failed")})
        elif c.detail:
            ET.SubElement(case, "system-out").text = _xml_text(c.detail)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: Report, path: Path) -> None:
    atomic_write(Path(path), junit_xml(report))


def manifest_record(report: Report) -> dict[str, Any]:
    """What the manifest keeps of a boot test."""
    d = {"result": report.result, "seconds": round(report.seconds, 2),
         "boot_seconds": None if report.boot_seconds is None else round(report.boot_seconds, 2),
         "ready_seconds": None if report.ready_seconds is None else round(report.ready_seconds, 2),
         "checks": [c.as_dict() for c in report.checks]}
    if report.error:
        d["error"] = {"kind": report.error_kind, "message": report.error}
        d["console_log"] = report.console_log
    return d
