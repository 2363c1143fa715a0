"""Where vztt finds its recipes and cache when nobody says.

Run from a clone, the checkout's own recipes/ and cache/ (the README's two
commands work without set-up); installed, the system locations.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]     # vztt/base/paths.py -> the checkout


def default_dir(env_var: str, checkout_name: str, system: str) -> Path:
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    here = CHECKOUT / checkout_name
    return here if here.is_dir() else Path(system)


def default_cache() -> Path:
    return default_dir("VZTT_CACHE", "cache", "/var/cache/vztt")


def default_recipes() -> Path:
    return default_dir("VZTT_RECIPES", "recipes", "/usr/share/vztt/recipes")
