"""The network a booted template gets in a boot test (and in `vztt run` when
asked): the settings, the host side, a throwaway SSH key.

The settings are the recipe's test defaults (boot.ip, boot.gateway,
boot.nameserver, boot.search_domain, boot.interface: one row each in
recipe/settings.py), each replaced by the same option of `vztt test` / `vztt
run` when given. They are written into the booted tree by netconfig, in the
distribution's own files, exactly as `vztt create` writes them. The host side
is a network namespace of the test's own (runtime/hostnet.py) holding the
other end of the link, with the gateway's address (or, without a gateway, the
first free address of the container's subnet): nothing leaves the namespaces
the test made. For a test, root's authorized_keys also gets a fresh ed25519
key, made in the scratch directory and gone with it.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

from vztt import netconfig
from vztt.base.errors import RecipeError
from vztt.base.proc import run
from vztt.boot.runtime import RuntimeUnavailable
from vztt.boot.runtime.host import require
from vztt.boot.runtime.hostnet import HostNet
from vztt.netconfig import Family, NetSettings, RawSettings
from vztt.netconfig.settings import RECIPE_FIELDS
from vztt.recipe.recipe import Recipe
from vztt.store.templates import TemplateCache

@dataclass(frozen=True)
class BootNet:
    """What a booted template is given, and what the checks need to reach it."""

    settings: NetSettings              # written into the tree (the throwaway key included, for a test)
    family: Family
    host_addresses: tuple[str, ...]    # the host side's end of the link, ADDR/PREFIX
    key: Path | None = None            # the throwaway private key (a test), once the host side is up

    @property
    def ping_targets(self) -> list[str]:
        """The host side's addresses the container pings (link-local ones need a scope: left out)."""
        return [a.split("/")[0] for a in self.host_addresses
                if not ipaddress.ip_interface(a).ip.is_link_local]

    @property
    def ssh_target(self) -> str:
        """The container's address the host side logs in to: its first, IPv4 first."""
        return str(sorted(self.settings.addresses, key=lambda a: a.version)[0].ip)


def network_check_enabled(recipe: Recipe) -> bool:
    return bool(recipe.merged.get("boot.network", True))


def recipe_defaults(recipe: Recipe) -> RawSettings:
    raw = RawSettings()
    for name in RECIPE_FIELDS:
        if (value := recipe.merged.get(f"boot.{name}")) is not None:
            setattr(raw, name, list(value) if isinstance(value, list) else value)
    return raw


def combined(recipe_raw: RawSettings, given: RawSettings | None) -> RawSettings:
    """The recipe's values, each field replaced by the command line's when given there;
    --ip replaces the recipe's gateway too (it belongs to the recipe's subnet)."""
    if given is None:
        return recipe_raw
    out = RawSettings()
    for f in fields(RawSettings):
        mine = getattr(given, f.name)
        setattr(out, f.name, mine if mine not in (None, []) else getattr(recipe_raw, f.name))
    if given.ip:
        out.gateway = list(given.gateway)
    return out


def test_network(recipe: Recipe, given: RawSettings | None, given_error: type) -> BootNet | None:
    """The network of a boot test: the recipe's defaults (checked when it was loaded) and
    the command line's values (a bad one: `given_error`, naming the option). None if the
    recipe turns the check off."""
    if not network_check_enabled(recipe):
        if given is not None:
            where = recipe.origins.get("boot.network", recipe.path)
            raise given_error(f"the network options need the network check, which {where} turns off "
                              "(boot.network = false)")
        return None
    settings = netconfig.check(combined(recipe_defaults(recipe), given), given_error)
    if not settings.addresses:
        where = recipe.origins.get("boot.ip", recipe.path)
        raise RecipeError(f"{where}: boot.ip: the network check needs an address for the template "
                          "(or boot.network = false)")
    return plan(recipe, settings)


def run_network(recipe: Recipe, given: RawSettings, given_error: type) -> BootNet | None:
    """`vztt run`'s network: only what the command line gives (None without --ip)."""
    settings = netconfig.check(given, given_error)
    if settings.empty:
        return None
    if not settings.addresses:
        raise given_error("--ip: the network options of `vztt run` need an address for the container")
    return plan(recipe, settings)


def plan(recipe: Recipe, settings: NetSettings) -> BootNet:
    family = netconfig.family_for(recipe.distro, str(recipe.path))
    return BootNet(settings=settings, family=family, host_addresses=tuple(host_side_addresses(settings)))


def host_side_addresses(s: NetSettings) -> list[str]:
    """Per IP version the container has: the gateway (with its subnet's prefix), else
    the first address of the container's first subnet that the container does not hold."""
    out = []
    for version in (4, 6):
        own = s.of_version(version)
        if not own:
            continue
        gateway = s.gateway(version)
        link_local = gateway is not None and gateway.version == 6 and gateway.is_link_local
        if gateway is not None and not link_local:
            net = next(a.network for a in own if gateway in a.network)
            out.append(f"{gateway}/{net.prefixlen}")
            continue
        if link_local:                                  # on the link whatever the subnets: a global one too
            out.append(f"{gateway}/64")
        taken = {a.ip for a in own}
        net = own[0].network
        free = next((h for h in _hosts(net) if h not in taken), None)
        if free is None:
            raise RecipeError(f"{own[0].with_prefixlen}: no address is left in {net} for the host side of the link")
        out.append(f"{free}/{net.prefixlen}")
    return out


def _hosts(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The first few host addresses of a network (never the whole of a /64)."""
    for n, host in enumerate(net.hosts()):
        if n >= 16:
            return
        yield host


@contextlib.contextmanager
def host_side(cache: TemplateCache, name: str, net: BootNet, throwaway_key: bool) -> Iterator[tuple[HostNet, BootNet]]:
    """The host side's namespace with its addresses (and, for a test, the throwaway key
    added to the settings); all of it in a scratch directory, gone on the way out."""
    with cache.scratch(f"{name}.net") as scratch:
        if throwaway_key:
            require("ssh", "openssh-client")
            key = scratch / "id_ed25519"
            run([require("ssh-keygen", "openssh-client"), "-q", "-t", "ed25519", "-N", "", "-C",
                 "vztt-boot-test", "-f", key], what="ssh-keygen (the boot test's throwaway key)",
                error=RuntimeUnavailable, timeout=60)
            pub = key.with_name(key.name + ".pub").read_text().strip()
            net = replace(net, settings=net.settings.with_ssh_keys([pub]), key=key)
        with HostNet(scratch, net.host_addresses) as link:
            yield link, net
