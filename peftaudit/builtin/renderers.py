"""Built-in output formats: table (terminal), json, markdown, html."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report.render import Renderer


@hookimpl
def peftaudit_register_renderers(register: Callable[[Renderer], None]) -> None:
    from peftaudit.report.render.html import HtmlRenderer
    from peftaudit.report.render.json import JsonRenderer
    from peftaudit.report.render.markdown import MarkdownRenderer
    from peftaudit.report.render.terminal import TerminalRenderer

    register(TerminalRenderer())
    register(JsonRenderer())
    register(MarkdownRenderer())
    register(HtmlRenderer())
