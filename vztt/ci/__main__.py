"""`python -m vztt.ci [--check]`: write (or compare) .github/workflows/nightly.yml and
.gitlab-ci.yml in the checkout, from vztt/ci/jobs.py."""

from __future__ import annotations

import sys

from vztt.base.files import atomic_write
from vztt.base.paths import CHECKOUT
from vztt.ci import github, gitlab


def rendered() -> dict[str, str]:
    return {github.PATH: github.workflow(), gitlab.PATH: gitlab.pipeline()}


def main(argv: list[str]) -> int:
    stale = []
    for rel, text in rendered().items():
        path = CHECKOUT / rel
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(rel)
        else:
            atomic_write(path, text)
            print(f"wrote {rel}")
    for rel in stale:
        print(f"{rel}: differs from vztt/ci/jobs.py's nightly; run `make ci`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
