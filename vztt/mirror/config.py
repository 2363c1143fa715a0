"""What a host is configured with for template mirrors: the keys it trusts, the
mirrors it asks, and what a mirror location and a template name may look like."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from vztt.base import signing
from vztt.base.errors import BadUsage, RecipeError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

SYSTEM_KEYRING = Path("/etc/vztt/trusted.gpg")
SYSTEM_KEYRING_DIR = Path("/etc/vztt/trusted.gpg.d")
SYSTEM_MIRROR_LIST = Path("/etc/vztt/template-mirrors.list")


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise RecipeError(f"{name!r}: not a template name")


def trusted_keyrings(given: tuple[Path, ...] | list[Path] = ()) -> list[Path]:
    """--keyring, else VZTT_KEYRING (colon-separated), else /etc/vztt/trusted.gpg(.d/)."""
    if given:
        return [Path(p) for p in given]
    env = os.environ.get("VZTT_KEYRING", "").strip()
    if env:
        return [Path(p) for p in env.split(":") if p]
    found = [SYSTEM_KEYRING] if SYSTEM_KEYRING.is_file() else []
    if SYSTEM_KEYRING_DIR.is_dir():
        found += sorted(p for p in SYSTEM_KEYRING_DIR.iterdir() if p.suffix in (".gpg", ".asc") and p.is_file())
    return found


def keyring_for(given: tuple[Path, ...] | list[Path] = ()) -> bytes:
    paths = trusted_keyrings(given)
    if not paths:
        raise signing.SignatureError(f"no trusted keys: give --keyring FILE, set VZTT_KEYRING, or install the "
                                     f"publisher's key as {SYSTEM_KEYRING} (or in {SYSTEM_KEYRING_DIR}/)")
    return signing.keyring_bytes(paths)


def mirror_list(given: tuple[str, ...] | list[str] = ()) -> list[str]:
    """--from (repeatable, in order), else VZTT_TEMPLATE_MIRRORS (space-separated), else the
    list file; each one a mirror vztt can read (BadUsage for another scheme, before any is asked)."""
    if given:
        return _readable(list(given), "--from")
    env = os.environ.get("VZTT_TEMPLATE_MIRRORS", "").split()
    if env:
        return _readable(env, "VZTT_TEMPLATE_MIRRORS")
    try:
        lines = SYSTEM_MIRROR_LIST.read_text().splitlines()
    except OSError:
        lines = []
    found = [l.split("#", 1)[0].strip() for l in lines]
    found = [l for l in found if l]
    if not found:
        raise RecipeError(f"no template mirror: give --from URL, set VZTT_TEMPLATE_MIRRORS, or list mirrors in "
                          f"{SYSTEM_MIRROR_LIST}")
    return _readable(found, str(SYSTEM_MIRROR_LIST))


def _readable(locations: list[str], origin: str) -> list[str]:
    for location in locations:
        if not is_http(location):
            local_path(location, origin)
    return locations


def is_http(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def local_path(location: str, origin: str = "template mirror") -> Path:
    """A mirror that is a directory: the path, or file:///path."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise BadUsage(f"{origin} {location}: not a mirror vztt can read (a directory, file:///path or "
                       "http(s):// URL)")
    return Path(location).absolute()
