"""peftaudit: audit, size and verify parameter-efficient fine-tuning.

The public API is imported lazily so that ``import peftaudit`` (and the CLI's
``--help``) does not import torch or transformers.

>>> import peftaudit
>>> peftaudit.__version__
'0.1.0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import pluggy

from peftaudit._version import __version__

#: Decorator marking a plugin's hook implementations, e.g. ``@peftaudit.hookimpl``.
hookimpl = pluggy.HookimplMarker("peftaudit")

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "audit": "peftaudit.report",
    "Report": "peftaudit.report",
    "Inventory": "peftaudit.inventory",
    "take_inventory": "peftaudit.inventory",
    "snapshot": "peftaudit.verify",
    "verify": "peftaudit.verify",
}

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory, take_inventory
    from peftaudit.report import Report, audit

__all__ = ["Inventory", "Report", "__version__", "audit", "hookimpl", "snapshot", "take_inventory", "verify"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peftaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
