"""Layered recipes (`base = "<template>"`): what a layer adds to its base.

A layer's recipe is merged with its base's as with `extends`, so it knows
the distro, the repositories, the environment and the base's smoke checks.
What it builds is only what the merged recipe has beyond the base's: the
packages, files and hooks its base does not have (they are in the base's
archive already). These helpers compute that from the merged settings of
both, and the Virtuozzo application-template names the layer stands for.
"""

from __future__ import annotations

import re
from typing import Any, Sequence, TypeVar

from vztt.base.errors import RecipeError

T = TypeVar("T")

# Settings a layer takes from its base and cannot change: the base system is the base's build.
FIXED_BY_BASE = ("distro", "release", "arch")


def own_items(items: Sequence[T], records: Sequence[Any], base_records: Sequence[Any]) -> tuple[T, ...]:
    """The items whose merged record (same position in `records`) the base does not have as it is:
    a file or hook the layer adds, or one whose settings it changes."""
    return tuple(item for item, record in zip(items, records) if record not in base_records)


def own_packages(include: Sequence[str], base_include: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for p in include if p not in base_include)


def default_app_name(layer: str, distro: str, version: str, arch: str) -> str:
    """`debian-12-x86_64-nginx` on a Debian 12 x86_64 base stands for the application template `nginx`."""
    prefix = f"{distro}-{version}-{arch}-"
    return layer[len(prefix):] if layer.startswith(prefix) and len(layer) > len(prefix) else layer


def app_names(layer: str, merged: dict[str, Any], base_apps: Sequence[str]) -> tuple[str, ...]:
    """The base's application templates, then this layer's (`app_templates`, or its default)."""
    own = merged.get("app_templates") or [default_app_name(layer, merged["distro"], str(merged["version"]),
                                                            merged["arch"])]
    return tuple(base_apps) + tuple(a for a in own if a not in base_apps)


def check_name(base: str, layer: str, name_re: re.Pattern[str], where: str, loading: Sequence[str]) -> None:
    if base == layer or not name_re.match(base):
        raise RecipeError(f"{where}: {base!r} is not another template's name")
    if base in loading:
        raise RecipeError(f"{where}: cycle of bases {' -> '.join([*loading, layer, base])}")


def check_fixed(merged: dict[str, Any], base_merged: dict[str, Any], where: str, base: str) -> None:
    """A layer cannot set distro, release or arch otherwise than its base."""
    for key in FIXED_BY_BASE:
        if merged.get(key) != base_merged.get(key):
            raise RecipeError(f"{where}: {key} {merged.get(key)!r} differs from base {base}'s {base_merged.get(key)!r}")
