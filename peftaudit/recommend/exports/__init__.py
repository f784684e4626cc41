"""Exporters: a recipe written as a config file another tool reads.

An exporter is any object with a ``name``, a ``description``, a default
``filename`` and ``export(recipe) -> Export``, registered through the
``peftaudit_register_exporters`` hook. This package holds the protocol, the
pieces every format shares, and the built-in formats, one module per tool
(:mod:`.peft`, :mod:`.axolotl`, :mod:`.llama_factory`, :mod:`.trl`);
:mod:`peftaudit.builtin.exporters` registers them like any plugin's.

Formats differ in what they can say (LLaMA-Factory has no
``target_parameters``, TRL no ``rank_pattern``), so an :class:`Export`
carries the recipe its consumer will really build (``effective``) and a
warning for each thing the format dropped. Rank and alpha are always written:
their defaults differ (peft r=8 alpha=8, TRL 16/32, LLaMA-Factory 8/16,
axolotl none). Keys are the ones each project documents (checked in tests
against peft 0.21, axolotl 0.21, LLaMA-Factory 0.9.5 and TRL 1.16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from peftaudit._version import __version__
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
    """A config format, registered through ``peftaudit_register_exporters``.

    The attributes are read-only here, so a frozen dataclass or plain class
    attributes satisfy the protocol.
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def filename(self) -> str:
        """The file name ``--export`` writes by default."""
        ...

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


# --- what the built-in formats share --------------------------------------------------------------


def header(recipe: LoraRecipe, tool: str) -> list[str]:
    """The comment lines every written config starts with."""
    return [
        f"{tool} LoRA config for {recipe.model_id}, written by peftaudit {__version__}",
        f"task: {recipe.task}; method: {recipe.method}; rank and alpha are explicit on purpose",
    ]


def model_keys(recipe: LoraRecipe, key: str) -> dict[str, Any]:
    """The model to load under the tool's ``key``, and ``trust_remote_code`` when it needs it."""
    data: dict[str, Any] = {key: recipe.model_id}
    if recipe.trust_remote_code:
        data["trust_remote_code"] = True
    return data


def lora_keys(recipe: LoraRecipe, rank_key: str) -> dict[str, Any]:
    """Rank (under the tool's ``rank_key``), alpha and dropout: always written."""
    h = recipe.hyper
    return {rank_key: h.rank, "lora_alpha": h.alpha, "lora_dropout": h.dropout}


def without_patterns_or_fan_in(recipe: LoraRecipe, tool: str) -> tuple[LoraRecipe, list[str]]:
    """What a format with no ``rank_pattern`` and no ``fan_in_fan_out`` key builds, and a warning for each."""
    warnings: list[str] = []
    h = recipe.hyper
    if h.rank_pattern:
        ranks = ", ".join(f"{k}: {v}" for k, v in h.rank_pattern)
        warnings.append(
            f"{tool} has no rank_pattern: the per-expert ranks ({ranks}) are dropped and the experts train at "
            f"rank {h.rank} (more parameters than recommended); use --export peft to keep them"
        )
        recipe = recipe.with_hyper(replace(h, rank_pattern=(), alpha_pattern=()))
    if recipe.targets.fan_in_fan_out:
        warnings.append(f"{tool} has no fan_in_fan_out key: peft sets it for the Conv1D layers itself")
    return recipe, warnings
