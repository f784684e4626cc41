"""Memory against sequence length as a picture: SVG written directly, PNG through matplotlib."""

from __future__ import annotations

import os
from collections.abc import Sequence
from html import escape

from peftaudit.errors import PeftauditError
from peftaudit.units import GIB

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def write_plot(
    path: str, curve: dict[str, list[tuple[int, int]]], limits: Sequence[tuple[str, int]], title: str
) -> None:
    """Write the chart to ``path`` (``.svg``, or ``.png`` when matplotlib is installed), atomically."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".svg":
        data = svg(curve, limits, title).encode()
    elif ext == ".png":
        data = _png(curve, limits, title)
    else:
        raise PeftauditError(f"--plot writes .svg or .png, not '{ext or path}'")
    from peftaudit.files import write_atomic

    write_atomic(path, data)


def svg(curve: dict[str, list[tuple[int, int]]], limits: Sequence[tuple[str, int]], title: str) -> str:
    """The chart as an SVG document: log2 sequence length across, GiB up, GPU limits dashed."""
    import math

    width, height, left, right, top, bottom = 720, 420, 60, 150, 40, 50
    seqs = sorted({s for points in curve.values() for s, _ in points})
    if not seqs:
        raise PeftauditError("nothing to plot")
    top_bytes = max([b for points in curve.values() for _, b in points] + [b for _, b in limits]) * 1.08
    lo, hi = math.log2(seqs[0]), math.log2(seqs[-1]) if len(seqs) > 1 else math.log2(seqs[0]) + 1

    def x(seq: int) -> float:
        return left + (math.log2(seq) - lo) / (hi - lo) * (width - left - right)

    def y(b: float) -> float:
        return top + (1 - b / top_bytes) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
    ]
    for seq in seqs:
        out.append(f'<text x="{x(seq):.1f}" y="{height - bottom + 16}" text-anchor="middle">{seq:,}</text>')
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">sequence length (tokens)</text>'
    )
    steps = 5
    for i in range(steps + 1):
        b = top_bytes * i / steps
        out.append(f'<text x="{left - 6}" y="{y(b) + 4:.1f}" text-anchor="end">{b / GIB:.0f}</text>')
    out.append(f'<text x="16" y="{top - 10}">GiB</text>')
    for name, b in limits:
        out.append(
            f'<line x1="{left}" y1="{y(b):.1f}" x2="{width - right}" y2="{y(b):.1f}" stroke="gray" '
            'stroke-dasharray="4 3"/>'
        )
        out.append(f'<text x="{width - right + 4}" y="{y(b) + 4:.1f}" fill="gray">{escape(name)}</text>')
    for i, (method, points) in enumerate(curve.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{x(s):.1f},{y(b):.1f}" for s, b in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        last_s, last_b = points[-1]
        out.append(f'<text x="{x(last_s) + 4:.1f}" y="{y(last_b) - 4:.1f}" fill="{color}">{escape(method)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(curve: dict[str, list[tuple[int, int]]], limits: Sequence[tuple[str, int]], title: str) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PeftauditError("--plot FILE.png needs matplotlib (pip install matplotlib); .svg needs nothing") from None
    import io

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, points in curve.items():
        ax.plot([s for s, _ in points], [b / GIB for _, b in points], marker="o", label=method)
    for name, b in limits:
        ax.axhline(b / GIB, linestyle="--", color="gray")
        ax.annotate(name, (1.0, b / GIB), xycoords=("axes fraction", "data"), fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak per GPU (GiB)")
    ax.set_title(title)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
