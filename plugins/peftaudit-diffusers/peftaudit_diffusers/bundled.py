"""The bundled diffusers configs: ``configs/NAME__COMPONENT.json`` is ``diffusers:NAME/COMPONENT``.

Each file holds the hub ``id``, the ``component`` folder, where the config was
copied from (``config_source``), the published parameter count with its
source (``published_params``), and the ``config`` itself.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def names() -> tuple[str, ...]:
    """Every bundled spec name (``sdxl/unet``, ...), sorted."""
    files = resources.files("peftaudit_diffusers").joinpath("configs").iterdir()
    return tuple(sorted(f.name.removesuffix(".json").replace("__", "/") for f in files if f.name.endswith(".json")))


def entry(name: str) -> dict[str, Any] | None:
    """The bundled entry for ``name`` (case-insensitive), or ``None``."""
    for known in names():
        if known.lower() == name.strip().lower():
            path = resources.files("peftaudit_diffusers").joinpath("configs", known.replace("/", "__") + ".json")
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return data
    return None
