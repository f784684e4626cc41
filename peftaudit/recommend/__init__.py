"""Recommendations and readiness: what to target, which rank, what will break, and configs to paste.

>>> from peftaudit.recommend import RecommendRequest, recommend   # doctest: +SKIP
>>> rec = recommend(inventory, facts, RecommendRequest(task="instruct", tokens=20_000_000))  # doctest: +SKIP
>>> export(rec.recipe, "axolotl").text                               # doctest: +SKIP

Nothing here imports torch at module level: the inventory and the model facts
come in built (``peftaudit.sources.load``), and plugins that add
checks or exporters can import this package cheaply.
"""

from __future__ import annotations

from peftaudit.recommend.checks import Check, CheckContext, check, run_checks
from peftaudit.recommend.exports import Export, Exporter, ExportError, export
from peftaudit.recommend.facts import ModelFacts, model_facts
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.rank import TASKS, LoraHyperparameters, Reason
from peftaudit.recommend.recipe import LoraRecipe
from peftaudit.recommend.recommendation import Recommendation, RecommendRequest, recommend
from peftaudit.recommend.targets import PRESETS, TargetSelection, TargetSpec, count_adapters, resolve_preset
from peftaudit.severity import Severity

__all__ = [
    "PRESETS",
    "TASKS",
    "Check",
    "CheckContext",
    "Export",
    "ExportError",
    "Exporter",
    "Finding",
    "LoraHyperparameters",
    "LoraRecipe",
    "ModelFacts",
    "Reason",
    "RecommendRequest",
    "Recommendation",
    "Severity",
    "TargetSelection",
    "TargetSpec",
    "check",
    "count_adapters",
    "export",
    "model_facts",
    "recommend",
    "resolve_preset",
    "run_checks",
]
