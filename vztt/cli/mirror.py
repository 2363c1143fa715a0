"""Template mirrors: `vztt publish`, `pull`, and `create` (which pulls what it lacks)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from vztt import formats
from vztt.base.progress import Progress
from vztt.cli.main import Context, FormatList, emit, from_option, guarded, json_option, keyring_option, main


def _parse_duration_option(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    from vztt.mirror.freshness import parse_duration
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from vztt.recipe.recipe import parse_size
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 10G, 512M)") from None
    if size <= 0:
        raise click.BadParameter("must be more than 0")
    return size


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--to", "dest", required=True, metavar="DIR|URL",
              help="The mirror: a directory (or file:///path) a web server serves, or a WebDAV http(s):// URL.")
@click.option("--sign-key", "--key", "sign_key", required=True, envvar="VZTT_SIGN_KEY", metavar="KEY",
              help="gpg key (fingerprint, id or user id) that signs index.json. [env: VZTT_SIGN_KEY]")
@click.option("--keep", type=click.IntRange(0), default=3, show_default=True, envvar="VZTT_PUBLISH_KEEP",
              help="Newest builds kept per published template; older ones are deleted after the new index "
                   "is in place (0: keep all). [env: VZTT_PUBLISH_KEEP]")
@click.option("--allow-untested", is_flag=True,
              help="Also publish templates whose boot test was skipped (the index says so). "
                   "A failed boot test is always refused.")
@click.option("--expires", "validity", default="30d", show_default=True, envvar="VZTT_PUBLISH_EXPIRES",
              metavar="DURATION", callback=_parse_duration_option,
              help="How long hosts believe the index signed now (30d, 12h, 90m, 2w): past it, pulls refuse "
                   "the mirror as frozen. A publish signs the index again when less than half is left, even "
                   "if nothing else changed: publish at least that often. [env: VZTT_PUBLISH_EXPIRES]")
@keyring_option
@json_option
@click.pass_obj
@guarded
def publish(obj: Context, names: tuple[str, ...], dest: str, sign_key: str, keep: int, allow_untested: bool,
            validity: timedelta, keyrings: tuple[Path, ...], as_json: bool) -> None:
    """Publish cached templates (NAME..., default: all) to a mirror, with a signed index.

    \b
    Uploads only what the mirror lacks (by sha256): archives, then manifests,
    then index.json.asc and index.json, each under a temporary name renamed
    (directory) or MOVEd (WebDAV) into place. WebDAV credentials:
    VZTT_PUBLISH_USER / VZTT_PUBLISH_PASSWORD, else netrc.
    The mirror's current index must verify against the signing key (or a
    --keyring key) before it is re-signed. The index carries a serial (one
    more each time) and an expiry (--expires): hosts refuse an older serial
    than they saw, and an expired index. Exit 11: a template failed its boot
    test, or skipped it without --allow-untested; nothing was uploaded.
    """
    from vztt.mirror import publish as publishing
    progress = Progress(quiet=as_json)
    result = publishing.publish(obj.cache, list(names), dest, publishing.PublishOptions(
        sign_key=sign_key, keep=keep, allow_untested=allow_untested, keyrings=keyrings, validity=validity), progress)
    if as_json:
        emit(result.as_dict())
        return
    # PublishResult.published and CreateResult.pulled are still dicts (vztt/mirror): read by key.
    for p in result.published:
        click.echo(f"{p['name']} {p['id']}: {len(p['uploaded'])} files uploaded ({p['bytes'] / 1e6:.1f} MB), "
                   f"boot test {p['boot_test']}")
    for name in result.unchanged:
        click.echo(f"{name}: already on the mirror")
    for removed in result.removed:
        click.echo(f"removed {removed}")
    click.echo(f"{result.target}: index serial {result.serial}"
               + (f", signed by {result.signer}" if result.index_written else " (unchanged)")
               + (f", expires {result.expires}" if result.expires else ""))


@main.command()
@click.argument("name")
@from_option
@click.option("--build", "build_id", metavar="ID", help="This build (see the mirror's index.json), not the newest.")
@click.option("--format", "fmt", type=FormatList(),
              help="Which archives to pull [default: every format the build has].")
@click.option("--offline", is_flag=True, help="Use the cache only: succeed if NAME is cached, ask no mirror.")
@keyring_option
@json_option
@click.pass_obj
@guarded
def pull(obj: Context, name: str, mirror_urls: tuple[str, ...], build_id: str | None, fmt: str | None,
         offline: bool, keyrings: tuple[Path, ...], as_json: bool) -> None:
    """Pull template NAME from a mirror into the cache.

    \b
    The index and its signature are fetched and verified with gpgv against the
    trusted keys, and the index is refused if it is older than one this cache
    saw from the mirror (a rollback) or past its expiry (a frozen mirror). The
    newest build (or --build) is downloaded with resume and retries, its size
    and sha256 checked, read through the guard `vztt create` unpacks with
    (exit 6 for an archive it refuses), and installed atomically (the previous
    template is kept as -old until the new one is in place). A tampered,
    rolled-back or expired index, a bad signature, a wrong sha256 or a
    truncated download leaves the cache as it was (exit 5); with several
    mirrors the next one is tried. Exit 7: no room for it, or a cache this
    user cannot write.
    """
    from vztt.mirror import config, pull as pulling
    cache = obj.cache
    if offline:
        entry = pulling.offline_entry(cache, name, build_id)
        doc = {"name": name, "build": entry.manifest.local_build, "offline": True,
               "manifest": str(entry.manifest_path),
               "archives": {f: str(cache.path(a)) for f, a in entry.manifest.archives.items()}}
        if as_json:
            emit(doc)
        else:
            click.echo(f"{name} {doc['build']}: in the cache ({entry.manifest_path})")
        return
    progress = Progress(quiet=as_json)
    result = pulling.pull(cache, name, config.mirror_list(mirror_urls), keyrings, build_id,
                         formats.parse(fmt) if fmt else None, progress)
    if as_json:
        emit(result.as_dict())
        return
    state = "already in the cache" if result.up_to_date else f"pulled {result.bytes_downloaded / 1e6:.1f} MB"
    click.echo(f"{name} {result.build}: {state} from {result.mirror} in {result.seconds:.1f} s")
    click.echo(f"  signed by {result.signer}, boot test {result.boot_test}")
    for f, path in result.as_dict().get("archives", {}).items():
        click.echo(f"  {f:<6} {path}")


@main.command()
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["dir", "ext4", "ploop"]),
              help="dir: DEST is the root tree; ext4: DEST/root.img; ploop: DEST/root.hdd/{root.hds,"
                   "DiskDescriptor.xml}. [default: ploop for a ploop cache, else ext4]")
@click.option("--size", callback=_parse_size_option, metavar="SIZE",
              help="Disk size for ext4 and ploop (e.g. 10G). [default: the template's disk size, else 10G]")
@click.option("--hostname", help="Written to /etc/hostname and /etc/hosts (127.0.1.1).")
@from_option
@click.option("--build", "build_id", metavar="ID", help="This build of the template.")
@click.option("--offline", is_flag=True, help="Never pull: the template must be in the cache.")
@keyring_option
@json_option
@click.pass_obj
@guarded
def create(obj: Context, name: str, dest: Path, layout: str | None, size: int | None, hostname: str | None,
           mirror_urls: tuple[str, ...], build_id: str | None, offline: bool, keyrings: tuple[Path, ...],
           as_json: bool) -> None:
    """Create a container at DEST from template NAME (pulled first if it is not cached).

    \b
    The archive is unpacked safely (no absolute paths, no '..', nothing
    through links, no device nodes but the harmless ones, bounded sizes) and
    its sha256 checked; the container gets a fresh filesystem UUID, an empty
    machine-id (first boot makes one) and --hostname. It is made beside DEST
    and renamed into place when complete; a failure leaves nothing.
    """
    from vztt import create as create_mod
    progress = Progress(quiet=as_json)
    result = create_mod.create(obj.cache, name, dest, create_mod.CreateOptions(
        layout=layout, size=size, hostname=hostname, mirrors=mirror_urls, keyrings=keyrings, offline=offline,
        build=build_id), progress)
    if as_json:
        emit(result.as_dict())
        return
    click.echo(f"{result.dest}: {result.layout} container of {name} {result.build}"
               + (f", {result.size >> 20} MiB disk" if result.size else "")
               + (f", filesystem {result.fs_uuid}" if result.fs_uuid else "")
               + (f", pulled from {result.pulled['mirror']}" if result.pulled else "")
               + f" ({result.seconds:.1f} s)")
