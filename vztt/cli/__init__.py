"""The `vztt` command line: the group in main.py, one module per command group.

Importing a command module registers its commands on `main`; the group itself
imports none of them, so there is no import cycle.
"""

from vztt.cli.main import main
from vztt.cli import boot, build, ezimport, kernel, mirror, nightly, recipes  # noqa: F401  (register their commands)
from vztt.cli import sbom  # noqa: F401

__all__ = ["main"]
