"""vztt's url.map variables and the mirror variables of ours that stand for them.

vztt replaces the url.map names (`/vz/template/conf/vztt/url.map`, OpenVZ/vztt
etc/url.map) as text at the start of a repository URL: `$DEB_SERVER` is a
host, and the archive is a path below it (`$DEB_SERVER/debian`). Our mirror
variables name the archive itself (`$DEBIAN_MIRROR` is the `.../debian`
directory), so a url.map name and the path after it become one of ours.
The table is also in docs/ez-import.md; no host is named here: the hosts
are vztt's (and the user's url.map), ours come from the mirror settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# url.map name -> (path below it, our variable), longest path first.
URL_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    "$DEB_SERVER": (("/debian-security", "$DEBIAN_SECURITY_MIRROR"), ("/debian", "$DEBIAN_MIRROR")),
    "$UBU_SERVER": (("/ubuntu", "$UBUNTU_MIRROR"),),
    "$CE_SERVER": (("/centos-stream", "$CENTOS_MIRROR"), ("/centos", "$CENTOS_MIRROR")),
}
# Names vztt's url.map has, for archives we have no backend or mirror variable for.
WITHOUT_COUNTERPART = {
    "$SW_SERVER": "Virtuozzo's own download server",
    "$SUSE_SERVER": "openSUSE (no zypper backend)",
    "$SUSE2_SERVER": "SUSE (no zypper backend)",
    "$RH_SERVER": "Red Hat (no mirror variable)",
    "$SLES_SERVER": "SLES (no zypper backend)",
}
_NAME = re.compile(r"^\$[A-Z][A-Z0-9_]*")
# yum's own variables in a baseurl, and what our recipes call them (jinja2).
YUM_VARS = {"$releasever": "{{ release }}", "$basearch": "{{ arch }}", "$arch": "{{ arch }}"}


@dataclass(frozen=True)
class Mapped:
    url: str          # with our mirror variable, or the URL as written
    literal: bool     # a host without a url.map variable: kept as written


class UrlMapError(ValueError):
    """A url.map name we cannot map (unknown, or without a counterpart): the message says why."""


def translate(url: str) -> Mapped:
    m = _NAME.match(url)
    if m is None:
        return Mapped(url=url, literal=True)
    name, rest = m.group(0), url[m.end():]
    if name in WITHOUT_COUNTERPART:
        raise UrlMapError(f"url.map variable {name} ({WITHOUT_COUNTERPART[name]}) has no mirror variable in vztt")
    if name not in URL_MAP:
        known = ", ".join(sorted([*URL_MAP, *WITHOUT_COUNTERPART]))
        raise UrlMapError(f"unknown url.map variable {name} (vztt's url.map has {known})")
    for path, ours in URL_MAP[name]:
        if rest == path or rest.startswith(path + "/"):
            return Mapped(url=ours + rest[len(path):], literal=False)
    paths = ", ".join(f"{name}{p}" for p, _ in URL_MAP[name])
    raise UrlMapError(f"{name}{rest}: no mirror variable of ours for this path (known: {paths})")


def yum_vars(url: str) -> str:
    """yum's $releasever, $basearch in a baseurl, as our recipes write them."""
    for var, ours in YUM_VARS.items():
        url = url.replace(var, ours)
    return url
