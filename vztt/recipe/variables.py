"""Mirror variables, as vztt's url.map: recipes say `$DEBIAN_MIRROR`, the host
says where that is.

Sources, later ones winning:
  1. defaults read from the host's own apt sources (DEBIAN_MIRROR,
     DEBIAN_SECURITY_MIRROR, UBUNTU_MIRROR), so a Debian host needs no set-up;
  2. /etc/vztt/mirrors.toml;
  3. ~/.config/vztt/mirrors.toml;
  4. VZTT_MIRROR_<NAME> environment variables;
  5. --mirror NAME=URL on the command line.
A mirrors file is flat TOML: `DEBIAN_MIRROR = "http://..."`.

In a recipe, `$NAME` and `${NAME}` are a variable's value (unset: an error),
and `${NAME:-FALLBACK}` is NAME's value if it is set, else FALLBACK, itself
expanded (`${DEBIAN_MIRROR_PUBLIC:-$DEBIAN_MIRROR}`: a repository's image_url).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from vztt.base.errors import RecipeError

VAR_RE = re.compile(r"\$(?:\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}|([A-Z][A-Z0-9_]*))")
NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")

SYSTEM_FILE = Path("/etc/vztt/mirrors.toml")
APT_SOURCES = Path("/etc/apt")


@dataclass
class Mirrors:
    values: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)   # name -> where the value came from

    def set(self, name: str, url: str, origin: str) -> None:
        check_url(url, f"{origin}: {name}")
        self.values[name] = url.rstrip("/")
        self.origin[name] = origin

    def expand(self, text: str, where: str) -> str:
        """Replace every $NAME in `text`; an unset variable is a one-line error (MirrorNotSet)."""
        def sub(m: re.Match[str]) -> str:
            name, fallback = m.group(1) or m.group(3), m.group(2)
            if name in self.values:
                return self.values[name]
            if fallback is not None:
                return self.expand(fallback, where)
            raise MirrorNotSet(
                f"{where}: mirror variable ${name} is not set (set it in {SYSTEM_FILE}, "
                f"~/.config/vztt/mirrors.toml, VZTT_MIRROR_{name} or --mirror {name}=URL)")
        return VAR_RE.sub(sub, text)


class MirrorNotSet(RecipeError):
    """A recipe names a mirror variable this host has no value for (exit 3, as any recipe
    error): the template is not configured here."""


def check_url(url: str, where: str) -> None:
    parsed = urlparse(url)
    remote_ok = parsed.scheme in ("http", "https") and parsed.netloc
    file_ok = parsed.scheme == "file" and parsed.path.startswith("/")
    if not (remote_ok or file_ok):
        raise RecipeError(f"{where}: {url!r} is not an http(s):// or file:/// URL")


def _read_file(path: Path, mirrors: Mirrors) -> None:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        return
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror}") from None
    for name, url in doc.items():
        if not NAME_RE.match(name):
            raise RecipeError(f"{path}: {name}: mirror names are upper case (DEBIAN_MIRROR)")
        if not isinstance(url, str):
            raise RecipeError(f"{path}: {name}: expected a URL string, got {type(url).__name__}")
        mirrors.set(name, url, str(path))


# --------------------------------------------------------------------------
# Defaults from the host's apt sources
# --------------------------------------------------------------------------

def _apt_source_uris(etc: Path) -> list[str]:
    """URIs of `deb` entries, in apt's order: sources.list, then sources.list.d."""
    uris: list[str] = []
    for f in [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*")):
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            # deb822 stanzas: Types/URIs fields, stanzas separated by blank lines.
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    uris += fields.get("URIs", "").split()
        elif f.suffix == ".list" or f.name == "sources.list":
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("deb "):
                    words = re.sub(r"\[[^]]*\]", "", line).split()
                    if len(words) >= 2:
                        uris.append(words[1])
    return uris


# URI path ending -> the variable it is the default for.
_HOST_DEFAULTS = (("/debian-security", "DEBIAN_SECURITY_MIRROR"), ("/debian", "DEBIAN_MIRROR"), ("/ubuntu", "UBUNTU_MIRROR"))


def host_defaults(etc: Path = APT_SOURCES) -> dict[str, str]:
    found: dict[str, str] = {}
    for uri in _apt_source_uris(etc):
        path = urlparse(uri).path.rstrip("/")
        for suffix, name in _HOST_DEFAULTS:
            if path.endswith(suffix) and name not in found:
                found[name] = uri.rstrip("/")
                break
    return found


def load(cli: list[str] | tuple[str, ...] = (), environ: dict[str, str] | None = None,
         system_file: Path = SYSTEM_FILE, user_file: Path | None = None, apt_etc: Path = APT_SOURCES) -> Mirrors:
    environ = os.environ if environ is None else environ
    mirrors = Mirrors()
    for name, url in host_defaults(apt_etc).items():
        mirrors.set(name, url, f"host apt sources ({apt_etc})")
    _read_file(system_file, mirrors)
    if user_file is None:
        user_file = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "vztt" / "mirrors.toml"
    _read_file(user_file, mirrors)
    for key, value in sorted(environ.items()):
        if key.startswith("VZTT_MIRROR_"):
            name = key[len("VZTT_MIRROR_"):]
            if NAME_RE.match(name):
                mirrors.set(name, value, f"environment {key}")
    for item in cli:
        name, sep, url = item.partition("=")
        if not sep or not NAME_RE.match(name):
            raise RecipeError(f"--mirror {item}: expected NAME=URL with an upper-case NAME")
        mirrors.set(name, url, "--mirror")
    return mirrors
