"""A container's network and root's access, configured at creation in the files
its distribution reads itself: no agent of vztt's runs inside.

    settings = netconfig.check(RawSettings(ip=["192.0.2.10/24"], gateway=["192.0.2.1"]), BadUsage)
    written = netconfig.configure(root, "debian", settings)

FAMILIES is the one table of which distribution writes which files: a new
distribution is a row (a renderer of render.py for its network, its way with
/etc/resolv.conf, and the units to ask about when its network does not come
up). Every file goes into the tree through base/inroot.py: nothing is written
through a symlink of a tree vztt did not make.

Used by `vztt create` (create.py) and the boot test (boot/test.py: the
recipe's boot.ip... or --ip... of `vztt test` and `vztt run`).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vztt.base.errors import BuildError, RecipeError
from vztt.base.inroot import (make_dir_in_root, read_in_root, readlink_in_root, stat_in_root, symlink_in_root,
                              write_in_root)
from . import render
from .render import AccessProblem, FileOut, Tree
from .settings import DEFAULT_INTERFACE, NetSettings, RawSettings, check, option_label

__all__ = ["DEFAULT_INTERFACE", "FAMILIES", "Family", "NetSettings", "RawSettings", "check", "configure",
           "family_for", "option_label", "plan"]

Renderer = Callable[[NetSettings, Tree], list[FileOut]]


@dataclass(frozen=True)
class Family:
    """How one distribution comes up on the network."""

    method: str                     # in words, for docs and errors
    network: Renderer               # the interface's addresses and routes
    resolv: Renderer                # DNS: a plain resolv.conf, or systemd-resolved's way
    network_units: tuple[str, ...]  # what brings it up (its journal goes into a failed check's report)
    ssh_unit: str


DEBIAN = Family("ifupdown: /etc/network/interfaces.d/vztt", render.ifupdown, render.resolv_plain,
                ("networking.service",), "ssh.service")
UBUNTU = Family("netplan: /etc/netplan/60-vztt.yaml (systemd-networkd)", render.netplan, render.resolv_resolved,
                ("systemd-networkd.service", "systemd-resolved.service"), "ssh.service")
EL = Family("NetworkManager keyfile: /etc/NetworkManager/system-connections/vztt-IFACE.nmconnection",
            render.nm_keyfile, render.resolv_plain, ("NetworkManager.service",), "sshd.service")

# distro (the recipe's `distro`, the manifest's) -> its family
FAMILIES: dict[str, Family] = {
    "debian": DEBIAN,
    "ubuntu": UBUNTU,
    "centos-stream": EL,
    "almalinux": EL,
    "rockylinux": EL,
}


class ConfigureError(BuildError):
    """The tree cannot take the settings (exit 6): e.g. no root in /etc/shadow."""

    kind = "create"


def family_for(distro: str, what: str = "") -> Family:
    family = FAMILIES.get(distro)
    if family is None:
        raise RecipeError(f"{what or distro}: vztt does not know how {distro!r} configures its network "
                          f"(vztt/netconfig FAMILIES knows {', '.join(FAMILIES)})")
    return family


class _InRoot:
    """render.Tree over base/inroot: reads never follow a link of the tree."""

    def __init__(self, root: Path):
        self.root = root

    def read(self, rel: str) -> bytes | None:
        return read_in_root(self.root, rel)

    def link(self, rel: str) -> str | None:
        return readlink_in_root(self.root, rel)

    def exists(self, rel: str) -> bool:
        return stat_in_root(self.root, rel) is not None

    def owner(self, rel: str) -> tuple[int, int, int] | None:
        st = stat_in_root(self.root, rel)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def plan(tree: Tree, distro: str, settings: NetSettings) -> list[FileOut]:
    """The files `settings` take in a tree of `distro`, without writing anything."""
    family = family_for(distro)
    files: list[FileOut] = []
    if settings.has_network:
        files += family.network(settings, tree)
    if settings.has_dns:
        files += family.resolv(settings, tree)
    if settings.ssh_keys:
        files += render.authorized_keys(settings, tree)
    if settings.root_password_hash is not None:
        try:
            files += render.root_password(settings, tree)
        except AccessProblem as e:
            raise ConfigureError(f"--root-password-hash: {e}") from None
    return files


def configure(root: Path, distro: str, settings: NetSettings) -> list[str]:
    """Write the settings into the tree at `root`; returns the paths written (absolute, as inside)."""
    files = plan(_InRoot(root), distro, settings)
    for f in files:
        if f.private_dir:
            make_dir_in_root(root, f.path.rsplit("/", 1)[0], 0o700)
        if f.link is not None:
            symlink_in_root(root, f.path, f.link)
        else:
            write_in_root(root, f.path, f.data, f.mode, uid=f.uid, gid=f.gid)
    return ["/" + f.path for f in files]
