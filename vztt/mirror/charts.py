"""Small inline SVG line charts for the mirror's pages: one value per build,
oldest on the left. Plain SVG markup (no script, no external font or style),
readable as text too: every point carries a <title> with its build and value,
and the axis says the lowest and highest value.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Callable

WIDTH, HEIGHT = 340, 140
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 14, 28        # room for the axis labels


@dataclass
class Point:
    label: str                  # the build (its id), in the point's tooltip
    value: float | None         # None: not known for this build (left out of the line)
    tick: str = ""              # under the axis, for the first and last point (the build's date)


def line_chart(title: str, points: list[Point], show: Callable[[float], str], css_class: str) -> str:
    """A <figure> with the chart and its caption; an empty note when no build has a value."""
    known = [(i, p) for i, p in enumerate(points) if p.value is not None]
    caption = f"<figcaption>{escape(title)}</figcaption>"
    if not known:
        return f'<figure class="chart {css_class}">{caption}<p class="none">not recorded</p></figure>'
    values = [p.value for _, p in known if p.value is not None]
    low, high = min(values), max(values)
    if high == low:                                   # a flat line sits in the middle
        low, high = low - (abs(low) * 0.1 or 1), high + (abs(high) * 0.1 or 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(points) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = LEFT + (i * step if len(points) > 1 else plot_w / 2)
        return round(x, 1), round(TOP + plot_h * (1 - (v - low) / (high - low)), 1)

    coords = [xy(i, p.value) for i, p in known if p.value is not None]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>',
             f'<text x="{LEFT - 6}" y="{TOP + 4}" class="axis" text-anchor="end">{escape(show(max(values)))}</text>']
    if min(values) != max(values):
        parts.append(f'<text x="{LEFT - 6}" y="{TOP + plot_h}" class="axis" text-anchor="end">'
                     f'{escape(show(min(values)))}</text>')
    parts.append(f'<text x="{LEFT}" y="{HEIGHT - 8}" class="axis">{escape(points[0].tick)}</text>')
    if len(points) > 1:
        parts.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" class="axis" text-anchor="end">'
                     f'{escape(points[-1].tick)}</text>')
    if len(coords) > 1:
        parts.append(f'<polyline points="{" ".join(f"{x},{y}" for x, y in coords)}" class="line"/>')
    for (x, y), (_, p) in zip(coords, known):
        assert p.value is not None
        parts.append(f'<circle cx="{x}" cy="{y}" r="3.5" class="dot"><title>{escape(p.label)}: '
                     f'{escape(show(p.value))}</title></circle>')
    parts.append("</svg>")
    return f'<figure class="chart {css_class}">{caption}{"".join(parts)}</figure>'
