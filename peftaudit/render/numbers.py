"""Number formatting shared by the renderers: exact counts, honest units."""

from __future__ import annotations

from peftaudit.units import GIB


def count(n: int) -> str:
    """An exact count with thousands separators: ``8,030,261,248``."""
    return f"{n:,}"


def short(n: int) -> str:
    """A short count in decimal units as model cards write them: ``8.03B``, ``124M``."""
    for factor, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= factor:
            value = n / factor
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{digits}f}{unit}"
    return str(n)


def gib(n_bytes: int) -> str:
    """Bytes in binary units, labelled as such: ``14.96 GiB``, ``0.31 MiB`` below 1 GiB."""
    if n_bytes < GIB:
        return f"{n_bytes / 1024**2:,.2f} MiB"
    return f"{n_bytes / GIB:,.2f} GiB"


def percent(part: int, whole: int) -> str:
    if whole == 0:
        return "0%"
    value = 100 * part / whole
    if 0 < value < 0.01:
        return "<0.01%"
    return f"{value:.2f}%"
