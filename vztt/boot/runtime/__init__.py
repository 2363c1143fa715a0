"""A small container runtime to boot templates with their own init (systemd)
as PID 1 and run checks in them (container.py), and the same interface for a
qemu VM with vztt's kernel (vm.py)."""

from vztt.base.errors import BootError, CheckFailed, RuntimeUnavailable
from ._linux import OSRELEASE_SYSCTL
from .container import Container
from .stale import cleanup_stale

__all__ = ["BootError", "CheckFailed", "Container", "OSRELEASE_SYSCTL", "RuntimeUnavailable", "cleanup_stale"]
