"""Errors a user can act on, each with its own exit status.

Every error vztt expects to meet is a VzttError: the CLI prints its message as
one line (`vztt: error: ...`) and exits with the class's code. Anything else is
a bug and exits 1 with a traceback. The table is documented in the README and
in `vztt --help`; keep the three in step.
"""

from __future__ import annotations


class VzttError(Exception):
    """Base class: an expected failure with a one-line message."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


class RecipeError(VzttError):
    """A recipe (or mirrors file) is malformed, or a name is unknown."""

    exit_code = 3
    kind = "recipe"


class ResolveError(VzttError):
    """The package set cannot be resolved: unknown package, broken
    dependencies, repository metadata unsigned or badly signed, a lock that
    does not match."""

    exit_code = 4
    kind = "resolve"


class FetchError(VzttError):
    """A package could not be fetched or failed its checksum."""

    exit_code = 5
    kind = "fetch"


class BuildError(VzttError):
    """Installing, a hook, the image or the archive failed."""

    exit_code = 6
    kind = "build"


class EnvironmentProblem(VzttError):
    """The host cannot do the job: not root, a tool missing, a lock held."""

    exit_code = 7
    kind = "environment"


class Interrupted(VzttError):
    """SIGINT or SIGTERM: we cleaned up and stopped."""

    exit_code = 130
    kind = "interrupted"


# (code, class) for docs and --help, in one place.
EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "internal error (a bug: please report the traceback)"),
    (2, "usage error (bad command line)"),
    (RecipeError.exit_code, "recipe or mirrors file invalid, or unknown template"),
    (ResolveError.exit_code, "resolution failed (missing package or dependency, bad repository signature, stale lock)"),
    (FetchError.exit_code, "download failed or checksum mismatch"),
    (BuildError.exit_code, "install, hook, image or archive step failed"),
    (EnvironmentProblem.exit_code, "host problem (not root, missing tool, template busy)"),
    (Interrupted.exit_code, "interrupted (SIGINT/SIGTERM); everything was cleaned up"),
]
