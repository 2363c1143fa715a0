"""Under `make test` (VZTT_STRICT_SKIPS=1) a skip is a failure unless its reason names an
optional resource. A skip-if-missing-tool guard otherwise turns a broken set-up (a package
the Makefile failed to install) into a quiet skip on CI.

Optional: the real Ubuntu archive (tests/test_ubuntu_real.py needs UBUNTU_MIRROR or a
reachable archive), what the host's CPU or kernel is (constant TSC, a Virtuozzo kernel's
kernel.virt_osrelease), and, in a run that is not root, whatever needs root. Everything
else (a missing tool, a missing cached tree, no KVM...) fails the run. tests/conftest.py
imports the hook; tests/test_strict_skips.py runs it on a throwaway suite.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

OPTIONAL = [
    r"no Ubuntu archive configured or reachable",            # the real Ubuntu archive
    r"no constant TSC here",                                  # this host's CPU
    r"this host's kernel has kernel\.virt_osrelease",         # a Virtuozzo host kernel
]
ROOT_ONLY = r"\bneeds? root\b|\bas root\b"                               # optional only in a run that is not root


def optional(reason: str) -> bool:
    patterns = OPTIONAL + ([ROOT_ONLY] if os.geteuid() != 0 else [])
    return any(re.search(p, reason) for p in patterns)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("VZTT_STRICT_SKIPS") != "1" or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if optional(reason):
        return
    rep.outcome = "failed"
    rep.longrepr = (f"unexpected skip ({reason}): under `make test` (VZTT_STRICT_SKIPS=1) only an optional "
                    "resource may be missing (tests/strictskips.py lists them); the set-up is broken")
