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


class BadUsage(VzttError):
    """A bad command-line value that only a closer look finds (a host name, a mirror's
    scheme, an address, a key file, a password hash): refused before anything is done,
    with the same exit status as click's own usage errors."""

    exit_code = 2
    kind = "usage"


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


class BootError(VzttError):
    """The template does not boot: init is missing or exits, or the system
    never reaches running/degraded in time."""

    exit_code = 8
    kind = "boot"


class CheckFailed(VzttError):
    """A check run inside a booted template failed (raised by the caller)."""

    exit_code = 9
    kind = "check"


class RuntimeUnavailable(VzttError):
    """The container runtime cannot start here: not root, a kernel feature or
    a tool missing, or leftovers of an earlier run cannot be removed."""

    exit_code = 10
    kind = "runtime"


class PublishRefused(VzttError):
    """`vztt publish` of a template that failed its boot test (or skipped it,
    without --allow-untested): nothing was uploaded."""

    exit_code = 11
    kind = "publish"


class Interrupted(VzttError):
    """SIGINT or SIGTERM: we cleaned up and stopped."""

    exit_code = 130
    kind = "interrupted"


# (code, class) for docs and --help, in one place.
EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (1, "internal error (a bug: please report the traceback)"),
    (BadUsage.exit_code, "usage error (bad command line, a bad --hostname, an --ip, --gateway, --ssh-key or "
                         "--root-password-hash that does not parse, a mirror vztt cannot read); "
                         "for `vztt status`: updates are available"),
    (RecipeError.exit_code, "recipe, mirrors file or EZ template (`vztt import-ez`) invalid, or unknown template "
                            "(`vztt list` lists the valid recipes and marks the invalid ones first)"),
    (ResolveError.exit_code, "resolution failed (unknown package, broken dependency, bad repository signature, stale lock)"),
    (FetchError.exit_code, "download failed, checksum mismatch, bad signature, or a stale or rolled-back mirror index"),
    (BuildError.exit_code, "install, hook, image or archive step failed (an archive the guard refuses, a destination taken)"),
    (EnvironmentProblem.exit_code, "host problem (not root, cache not writable, missing tool, not enough space, template busy, no emulator for a foreign arch: binfmt_misc)"),
    (BootError.exit_code, "the template does not boot (the console log is kept; its path is shown)"),
    (CheckFailed.exit_code, "a boot-test check failed (failed unit, smoke check, package database, hostname, loopback, network, poweroff)"),
    (RuntimeUnavailable.exit_code, "the container runtime cannot start (not root, missing kernel feature, user "
                                   "namespaces disabled: `user.max_user_namespaces = 0`, python3-seccomp missing, "
                                   "a CPU without the template's cpu_level)"),
    (PublishRefused.exit_code, "publish refused: the template failed its boot test, or skipped it without --allow-untested"),
    (Interrupted.exit_code, "interrupted (SIGINT/SIGTERM); everything was cleaned up"),
]
