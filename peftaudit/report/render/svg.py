"""A horizontal bar chart as inline SVG, for the HTML report: bars of bytes against dashed vertical lines.

Text in, text out: no script, no font, picture or stylesheet from elsewhere.
Colours come from the page's CSS classes (each segment names one), so the
chart follows the page's light or dark scheme. The ``viewBox`` is about a
phone's width in CSS pixels, so its text reads at its size there; the page
scales it with its column (``width="100%"``). It is one picture to a screen
reader: ``role="img"`` with a ``<title>`` and a ``<desc>`` that says every
figure the bars show.

Where a bar is more than twice the largest line (a 70B model's full
fine-tuning against 80 GB cards), the axis stops at twice that line and the
bar is drawn broken at the edge, its figure written inside: the lines stay
readable, and the figure says how far beyond them it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

#: The drawing's width in its own units (about CSS pixels on a phone).
WIDTH = 320
_PAD = 4
_TOP = 18
"""Room above the bars for one row of the lines' labels."""
_MARK_FONT = 11
_MARK_ROW = 13
"""Each further row of the lines' labels (where they would overlap in one)."""
_ROW = 38
"""Each bar: its label above it, then the bar."""
_BAR = 14
_FONT = 12
#: Room at the right of the axis for the figure of the longest bar.
_FIGURE_ROOM = 72
#: The axis stops at this many times the largest line (see the module docstring).
_CLIP = 2.0


@dataclass(frozen=True)
class Segment:
    """A part of a bar (one component of a stacked bar, or the whole bar)."""

    value: int
    css: str
    """The class that colours it (the page's CSS)."""
    name: str = ""
    """What it is, shown on hover."""


@dataclass(frozen=True)
class Bar:
    label: str
    segments: tuple[Segment, ...]
    figure: str
    """The bar's value as text (``62.32 GiB``), written at its end."""

    @property
    def total(self) -> int:
        return sum(s.value for s in self.segments)


@dataclass(frozen=True)
class Line:
    """A dashed vertical line across the bars (a GPU class's usable memory)."""

    value: int
    label: str
    """Written above it: ``24 GB``."""


def bar_chart(bars: Sequence[Bar], lines: Sequence[Line], *, title: str, desc: str, ident: str) -> str:
    """The chart as an ``<svg>`` element; ``ident`` names its title and description (unique in the page)."""
    largest = max((line.value for line in lines), default=0)
    longest = max((bar.total for bar in bars), default=0)
    top = max(longest, largest, 1)
    if largest and longest > _CLIP * largest:
        top = int(_CLIP * largest)
    right = WIDTH - _PAD
    axis = right - _PAD - _FIGURE_ROOM

    def x(value: int) -> float:
        return _PAD + axis * min(value, top) / top

    marks = [(x(line.value), line.label) for line in lines]
    rows = _label_rows(marks)
    head = _TOP + _MARK_ROW * max(rows, default=0)  # where the bars start, below the lines' labels
    bottom = head + _ROW * len(bars)
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {bottom + _PAD}" width="100%" '
        f'role="img" aria-labelledby="{ident}-title {ident}-desc" font-size="{_FONT}">',
        f'<title id="{ident}-title">{escape(title)}</title>',
        f'<desc id="{ident}-desc">{escape(desc)}</desc>',
    ]
    for (at, label), row in zip(marks, rows, strict=True):
        baseline = _TOP - 7 + _MARK_ROW * row
        out.append(f'<line class="mark" x1="{_n(at)}" y1="{baseline + 3}" x2="{_n(at)}" y2="{bottom}"/>')
        out.append(
            f'<text class="mark-label" x="{_n(at)}" y="{baseline}" font-size="{_MARK_FONT}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    for i, bar in enumerate(bars):
        base = head + _ROW * i
        out.append(f'<text class="bar-label" x="{_PAD}" y="{base + _FONT + 2}">{escape(bar.label)}</text>')
        out += _bar(bar, base + _FONT + 7, x, clipped=bar.total > top, right=right)
    out.append("</svg>")
    return "\n".join(out)


def _bar(bar: Bar, y: int, x: Callable[[int], float], *, clipped: bool, right: float) -> list[str]:
    """One bar's segments, its break where it goes beyond the axis, and its figure."""
    out = []
    start = 0
    for segment in bar.segments:
        if segment.value > 0:
            x0, x1 = x(start), x(start + segment.value)
            hover = f"<title>{escape(segment.name)}</title>" if segment.name else ""
            out.append(
                f'<rect class="{escape(segment.css)}" x="{_n(x0)}" y="{y}" width="{_n(max(x1 - x0, 0.5))}" '
                f'height="{_BAR}">{hover}</rect>'
            )
        start += max(segment.value, 0)
    end = x(bar.total)
    if clipped:  # the break: two slanted strokes across the bar near its end
        for dx in (-14, -9):
            low, high = _n(end + dx), _n(end + dx + 4)
            out.append(f'<line class="break" x1="{low}" y1="{y + _BAR + 2}" x2="{high}" y2="{y - 2}"/>')
    figure = escape(bar.figure)
    if not clipped and right - end - 4 >= _width(bar.figure):
        out.append(f'<text class="figure" x="{_n(end + 4)}" y="{y + _BAR - 3}">{figure}</text>')
    else:  # inside the bar's end (left of the break, if any)
        inside = end - (20 if clipped else 4)
        out.append(f'<text class="figure inside" x="{_n(inside)}" y="{y + _BAR - 3}" text-anchor="end">{figure}</text>')
    return out


def _label_rows(marks: Sequence[tuple[float, str]]) -> list[int]:
    """The row of each line's label above the chart: the first row where it clears the label before it."""
    ends: list[float] = []  # per row, where its last label ends
    rows = []
    for at, label in marks:
        half = _width(label, _MARK_FONT) / 2
        row = next((r for r, end in enumerate(ends) if at - half > end + 3), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = at + half
        rows.append(row)
    return rows


def _width(text: str, size: int = _FONT) -> float:
    """About how wide ``text`` is at font ``size`` (digits and lower case in a proportional font)."""
    return len(text) * size * 0.6


def _n(value: float) -> str:
    """A coordinate, short: ``12.5``, ``40``."""
    return f"{value:.1f}".removesuffix(".0")


__all__ = ["WIDTH", "Bar", "Line", "Segment", "bar_chart"]
