"""A mirror people can browse: static HTML pages beside index.json.

    index.html                         every template: its newest build, date, sizes per format,
                                       package count, boot test and its times, how to create a
                                       container from it
    templates/<name>/index.html        one template: every build the index keeps, the package
                                       changes between consecutive builds, charts of archive size,
                                       package count and boot time over the builds

Made from the index publish has just committed and the manifests it names
(each checked against the index's sha256 before it is believed). No
external asset and no script: the pages read the same in any browser, with
JavaScript or without. Each page is written like every other mirror file
(temporary name, then rename or MOVE): a reader never sees half a page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from typing import Any, Callable

from vztt import __version__
from vztt import formats as formats_registry
from vztt.base.progress import Progress
from vztt.mirror.charts import Point, line_chart
from vztt.mirror.index import (INDEX, MAX_MANIFEST, SIGNATURE, TEMPLATES, Build, Index, MirrorError, archive_files,
                               newest_first)
from vztt.mirror.targets import Target
from vztt.store.manifest import Manifest, ManifestError

FRONT = "index.html"
MAX_CHANGES = 300               # package changes listed per build; more are counted
EXAMPLE_DEST = "/vz/private/101"

STYLE = """
body{font:15px/1.45 "DejaVu Sans",sans-serif;margin:24px auto;max-width:1220px;padding:0 16px;color:#1d2329}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}
p.meta{color:#5b6670;margin:0 0 18px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #dde3e8;vertical-align:top}
th{background:#f1f4f6}
code{font:13px "DejaVu Sans Mono",monospace;background:#f1f4f6;padding:1px 4px;border-radius:3px}
.passed{color:#17702f;font-weight:bold}.failed{color:#b42318;font-weight:bold}.skipped{color:#8a5a00;font-weight:bold}
.num{text-align:right;white-space:nowrap}.times{color:#5b6670;font-size:13px}
td.name,td.build,td.date,td.sizes{white-space:nowrap}td.name small{color:#5b6670;display:block}
.charts{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #dde3e8;border-radius:4px;padding:6px 8px}
figcaption{font-weight:bold;font-size:13px}
svg .plot{fill:#fafbfc;stroke:#dde3e8}svg .line{fill:none;stroke:#1f6feb;stroke-width:2}
svg .dot{fill:#1f6feb}svg .axis{font:11px "DejaVu Sans",sans-serif;fill:#5b6670}
ul.changes{font:13px "DejaVu Sans Mono",monospace;margin:4px 0 12px;padding-left:20px}
"""


@dataclass
class BuildView:
    """A build of the index and its manifest, when the manifest could be read and matched the index."""

    build: Build
    manifest: Manifest | None
    problem: str = ""


def _read_manifest(target: Target, build: Build) -> BuildView:
    rec = build["manifest"]
    try:
        data = target.read(rec["path"], MAX_MANIFEST)
    except MirrorError as e:
        return BuildView(build, None, str(e))
    if data is None:
        return BuildView(build, None, "manifest missing")
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        return BuildView(build, None, "manifest does not match the index")
    try:
        return BuildView(build, Manifest.from_json(data, rec["path"]))
    except ManifestError as e:
        return BuildView(build, None, str(e))


def gather(target: Target, index: Index) -> dict[str, list[BuildView]]:
    """Every template's builds, newest first, with their manifests."""
    return {name: [_read_manifest(target, b) for b in newest_first(t["builds"])]
            for name, t in sorted(index["templates"].items()) if t["builds"]}


# -- what a page says about a build -------------------------------------------------------

def _size(n: float) -> str:
    """Bytes for people: three significant digits or so."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def _archives(build: Build) -> list[tuple[str, dict[str, Any]]]:
    """The build's archives, in the registry's order of formats."""
    order = formats_registry.names()
    return sorted(build["archives"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _sizes(build: Build, link: Callable[[str], str] | None = None) -> str:
    out = []
    for fmt, rec in _archives(build):
        text = f"{escape(fmt)} {_size(sum(f['size'] for f in archive_files(rec)))}"     # every part (lxc: rootfs, meta)
        out.append(f'<a href="{escape(link(rec["path"]))}">{text}</a>' if link else text)
    return "<br>".join(out)


def _boot(view: BuildView) -> str:
    result = str(view.build.get("boot_test") or "skipped")
    cls = result if result in ("passed", "failed", "skipped") else "skipped"
    times = []
    record = view.manifest.boot_test if view.manifest else {}
    for key, label in (("boot_seconds", "boot"), ("ready_seconds", "checks done"), ("seconds", "test")):
        if isinstance(record.get(key), (int, float)):
            times.append(f"{label} {record[key]:.2f} s")
    return (f'<span class="{cls}">{escape(result)}</span>'
            + (f' <div class="times">{escape(", ".join(times))}</div>' if times else ""))


def _distro(build: Build) -> str:
    return escape(" ".join(str(build.get(k) or "") for k in ("distro", "version", "arch")).strip())


def _create_command(name: str, url: str) -> str:
    source = url or "MIRROR-URL"
    return f"vztt create {name} {EXAMPLE_DEST} --from {source}"


def _page(title: str, body: str, css_root: str = "") -> bytes:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            f'<p class="meta">Made by vztt {escape(__version__)} from the signed '
            f'<a href="{css_root}{INDEX}">{INDEX}</a> (<a href="{css_root}{SIGNATURE}">{SIGNATURE}</a>).</p>'
            f"\n</body></html>\n").encode()


# -- the front page ------------------------------------------------------------------------

def front_page(index: Index, views: dict[str, list[BuildView]], url: str) -> bytes:
    rows = []
    for name, builds in views.items():
        newest = builds[0]
        b = newest.build
        count = b.get("package_count")
        rows.append(
            f'<tr data-template="{escape(name)}">'
            f'<td class="name"><a href="{TEMPLATES}/{escape(name)}/">{escape(name)}</a> <small>{_distro(b)}</small></td>'
            f'<td class="build"><code>{escape(b["id"])}</code></td>'
            f'<td class="date">{_when(b.get("created"))}</td>'
            f'<td class="sizes">{_sizes(b, lambda p: p)}</td>'
            f'<td class="packages num">{count if count is not None else "-"}</td>'
            f'<td class="boot">{_boot(newest)}</td>'
            f'<td class="command"><code>{escape(_create_command(name, url))}</code></td></tr>')
    body = (f"<h1>Templates</h1>\n"
            f'<p class="meta">{len(views)} templates, index serial {index.get("serial", 0)}, '
            f'published {_when(index.get("generated"))}.</p>\n'
            '<table id="templates"><thead><tr><th>template</th><th>newest build</th><th>date</th>'
            '<th>sizes</th><th class="num">packages</th><th>boot test</th><th>create a container</th></tr>'
            f"</thead><tbody>\n{chr(10).join(rows)}\n</tbody></table>\n"
            "<p>Pull with <code>vztt pull NAME --from " + escape(url or "MIRROR-URL") + "</code>; vztt checks "
            f"<code>{INDEX}</code> against its signature with the keys the host trusts before it reads it.</p>")
    return _page("vztt template mirror", body)


# -- a template's page ----------------------------------------------------------------------

def _changes(old: Manifest, new: Manifest) -> list[str]:
    before = {(p.name, p.arch): p.version for p in old.packages}
    after = {(p.name, p.arch): p.version for p in new.packages}
    marks = {(False, True): "+ {0} {2}", (True, False): "- {0} {1}", (True, True): "~ {0} {1} &#8594; {2}"}
    return [marks[(k in before, k in after)].format(escape(k[0]), escape(before.get(k, "")), escape(after.get(k, "")))
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]


def _changes_section(builds: list[BuildView]) -> str:
    out = []
    for newer, older in zip(builds, builds[1:]):
        head = f'<h3 id="changes-{escape(newer.build["id"])}"><code>{escape(older.build["id"])}</code> &#8594; ' \
               f'<code>{escape(newer.build["id"])}</code></h3>'
        if newer.manifest is None or older.manifest is None:
            out.append(f"{head}<p>not known: {escape(newer.problem or older.problem)}</p>")
            continue
        lines = _changes(older.manifest, newer.manifest)
        if not lines:
            out.append(f'{head}<p class="changes-none">no package changes</p>')
            continue
        shown = "".join(f"<li>{line}</li>" for line in lines[:MAX_CHANGES])
        more = f"<li>... and {len(lines) - MAX_CHANGES} more</li>" if len(lines) > MAX_CHANGES else ""
        out.append(f'{head}<ul class="changes">{shown}{more}</ul>')
    return "\n".join(out) or "<p>One build: nothing to compare yet.</p>"


def _charts(builds: list[BuildView]) -> str:
    oldest_first = list(reversed(builds))

    def boot_time(v: BuildView) -> float | None:
        record = v.manifest.boot_test if v.manifest else {}
        value = record.get("ready_seconds") or record.get("boot_seconds")
        return float(value) if isinstance(value, (int, float)) else None

    def primary_size(v: BuildView) -> float | None:
        first = _archives(v.build)[:1]
        return float(first[0][1]["size"]) if first else None

    def count(v: BuildView) -> float | None:
        return float(v.build["package_count"]) if isinstance(v.build.get("package_count"), int) else None

    def points(value: Callable[[BuildView], float | None]) -> list[Point]:
        return [Point(v.build["id"], value(v), _when(v.build.get("created"))[:10]) for v in oldest_first]

    primary = (_archives(builds[0].build)[:1] or [("plain", {})])[0][0]
    charts = [line_chart(f"archive size ({primary})", points(primary_size), _size, "size"),
              line_chart("package count", points(count), lambda x: f"{x:.0f}", "packages"),
              line_chart("boot to checks done", points(boot_time), lambda x: f"{x:.2f} s", "boot")]
    return f'<div class="charts">{"".join(charts)}</div>'


def template_page(name: str, builds: list[BuildView], url: str) -> bytes:
    up = "../../"

    def link(path: str) -> str:
        return up + path

    rows = []
    for v in builds:
        b = v.build
        files = [f'<a href="{escape(link(b["manifest"]["path"]))}">manifest</a>']
        sboms = b.get("sbom", {})
        files += [f'<a href="{escape(link(sboms[kind]["path"]))}">{kind}</a>' for kind in ("spdx", "cyclonedx")
                  if kind in sboms]
        rows.append(f'<tr data-build="{escape(b["id"])}"><td><code>{escape(b["id"])}</code></td>'
                    f'<td class="date">{_when(b.get("created"))}</td><td class="sizes">{_sizes(b, link)}</td>'
                    f'<td class="packages num">{b.get("package_count", "-")}</td><td class="boot">{_boot(v)}</td>'
                    f'<td class="files">{" ".join(files)}</td></tr>')
    newest = builds[0].build
    body = (f'<p><a href="{up}{FRONT}">&#8592; all templates</a></p>\n<h1>{escape(name)}</h1>\n'
            f'<p class="meta">{escape(str(newest.get("distro", "")))} {escape(str(newest.get("version", "")))} '
            f'({escape(str(newest.get("release", "")))}) {escape(str(newest.get("arch", "")))}, '
            f"{len(builds)} builds on this mirror.</p>\n"
            f"<p>Create a container: <code>{escape(_create_command(name, url))}</code></p>\n"
            f"<h2>Over the builds</h2>\n{_charts(builds)}\n"
            '<h2>Builds</h2>\n<table id="builds"><thead><tr><th>build</th><th>date</th><th>archives</th>'
            '<th class="num">packages</th><th>boot test</th><th>files</th></tr></thead><tbody>\n'
            f"{chr(10).join(rows)}\n</tbody></table>\n"
            f'<h2>Package changes</h2>\n<div id="changes">{_changes_section(builds)}</div>')
    return _page(f"{name}: vztt template mirror", body, up)


def _current(target: Target, rel: str) -> bytes | None:
    try:
        return target.read(rel, MAX_MANIFEST)
    except MirrorError:
        return None            # unreadable or too big: written again


def write_pages(target: Target, index: Index, url: str, progress: Progress) -> list[str]:
    """The front page and one page per template, from the committed index; returns the
    paths written. A page is a function of the index: one already as it would be is left
    alone (a publish that changes nothing writes nothing)."""
    with progress.step("pages") as st:
        views = gather(target, index)
        pages = {f"{TEMPLATES}/{name}/{FRONT}": template_page(name, builds, url) for name, builds in views.items()}
        pages[FRONT] = front_page(index, views, url)        # last: it links to the others
        written = []
        for rel, data in pages.items():
            if _current(target, rel) != data:
                target.put_bytes(rel, data)
                written.append(rel)
        st.note(f"{len(written)} of {len(pages)} pages written" if written else f"{len(pages)} pages unchanged")
    return written
