from vztt.cli.main import main

__all__ = ["main"]
