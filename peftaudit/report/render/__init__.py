"""The report's renderers (``--format``): turn a finished report into text. They read, never compute.

Plugins add formats through ``peftaudit_register_renderers``; the built-in
ones are :mod:`.terminal` (``table``), :mod:`.json`, :mod:`.markdown` and
:mod:`.html` (one self-contained page, its chart from :mod:`.svg`). What the
terminal and HTML tables say, cell by cell, is decided once in :mod:`.rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report.model import Report


@dataclass(frozen=True)
class RenderOptions:
    """How the user wants the report shown."""

    width: int = 100
    color: bool = False
    tree: bool = False
    """Include the module tree (terminal, Markdown and HTML)."""


@runtime_checkable
class Renderer(Protocol):
    """An output format for ``--format NAME``."""

    name: str
    description: str

    def render(self, report: Report, options: RenderOptions) -> str: ...
