"""Built-in model sources: local paths, the bundled catalog, the hub."""

from __future__ import annotations

from collections.abc import Callable

from peftaudit import hookimpl
from peftaudit.sources.base import ModelSource
from peftaudit.sources.catalog import CatalogSource
from peftaudit.sources.hub import HubSource
from peftaudit.sources.local import LocalSource


@hookimpl
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    register(LocalSource())
    register(CatalogSource())
    register(HubSource())
