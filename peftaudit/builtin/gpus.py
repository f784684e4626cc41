"""Built-in GPUs: the bundled catalog (``peftaudit/gpus/gpus.json``), registered like a plugin's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.gpus.catalog import GPU


@hookimpl
def peftaudit_register_gpus(register: Callable[[GPU], None]) -> None:
    from peftaudit.gpus.catalog import bundled_gpus

    for gpu in bundled_gpus():
        register(gpu)
