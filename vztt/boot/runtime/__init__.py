"""A small container runtime to boot templates with their own init (systemd)
as PID 1 and run checks in them. See container.py."""

from vztt.base.errors import BootError, CheckFailed, RuntimeUnavailable
from .container import Container, cleanup_stale

__all__ = ["BootError", "CheckFailed", "Container", "RuntimeUnavailable", "cleanup_stale"]
