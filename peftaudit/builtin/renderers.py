"""Built-in output formats: table (terminal), json, markdown."""

from __future__ import annotations

from collections.abc import Callable

from peftaudit import hookimpl
from peftaudit.render import Renderer
from peftaudit.render.json import JsonRenderer
from peftaudit.render.markdown import MarkdownRenderer
from peftaudit.render.terminal import TerminalRenderer


@hookimpl
def peftaudit_register_renderers(register: Callable[[Renderer], None]) -> None:
    register(TerminalRenderer())
    register(JsonRenderer())
    register(MarkdownRenderer())
