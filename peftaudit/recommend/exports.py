"""Exporters: a recipe written as a config file another tool reads.

An exporter is any object with a ``name``, a ``description``, a default
``filename`` and ``export(recipe) -> Export``; built-ins live in
:mod:`peftaudit.builtin.exporters` and are registered through the
``peftaudit_register_exporters`` hook. Formats differ in what they can say
(LLaMA-Factory has no ``target_parameters``, TRL no ``rank_pattern``), so an
:class:`Export` carries the recipe its consumer will really build
(``effective``) and a warning for each thing the format dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from peftaudit.errors import PeftauditError
from peftaudit.recommend.recipe import LoraRecipe


class ExportError(PeftauditError):
    """A recipe this format cannot express at all."""


@dataclass(frozen=True)
class Export:
    """A written config: its text, and what its consumer will build from it."""

    format: str
    text: str
    filename: str
    effective: LoraRecipe
    """The recipe the consumer builds from ``text`` (what the format could say)."""
    warnings: tuple[str, ...] = ()


@runtime_checkable
class Exporter(Protocol):
    """A config format, registered through ``peftaudit_register_exporters``."""

    name: str
    description: str
    filename: str

    def export(self, recipe: LoraRecipe) -> Export:
        """Write ``recipe`` in this format."""
        ...


def export(recipe: LoraRecipe, fmt: str) -> Export:
    """Write ``recipe`` with the registered exporter ``fmt``."""
    from peftaudit.plugins import exporters

    available = exporters()
    exporter = available.get(fmt)
    if exporter is None:
        raise PeftauditError(f"unknown export format '{fmt}'; choose one of: {', '.join(sorted(available))}")
    return exporter.export(recipe)


def names_regex(names: tuple[str, ...]) -> str:
    """peft's list matching as one regular expression over whole paths (``re.fullmatch``)."""
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + ")"


def to_yaml(data: dict[str, Any], header: list[str]) -> str:
    """YAML in the given key order, with ``#`` comment lines on top."""
    import yaml

    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body
