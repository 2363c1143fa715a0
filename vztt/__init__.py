"""vztt: OS template builder (recipe -> lock -> packages -> image -> archive -> cache)."""

__version__ = "0.1.0"
