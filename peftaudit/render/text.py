"""Text every renderer shares."""

from __future__ import annotations


def sentence(line: str) -> str:
    """A terminal line (``reserved memory ...``) as a sentence of its own: capital first letter, full stop."""
    return f"{line[0].upper()}{line[1:]}."
