"""Package attributes imported on first use, so importing a package stays light.

``import peftaudit`` and the CLI's ``--help`` must not import torch or
transformers; the public names that need them are resolved when first read.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str | tuple[str, str]]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``table`` maps a public name to the module
    that defines it (or to ``(module, name there)``); the value is cached on the package once read."""

    def __getattr__(name: str) -> Any:
        where = table.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = (where, name) if isinstance(where, str) else where
        value = getattr(importlib.import_module(module), attribute)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
