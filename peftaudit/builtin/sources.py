"""Built-in model sources: local paths, the bundled catalog, the hub."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.sources.base import ModelSource


@hookimpl
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    # Imported here, not above: every command line loads the built-in plugins (for plugins'
    # commands), and only the commands that resolve a model need the sources.
    from peftaudit.sources.catalog import CatalogSource
    from peftaudit.sources.hub import HubSource
    from peftaudit.sources.local import LocalSource

    register(LocalSource())
    register(CatalogSource())
    register(HubSource())
