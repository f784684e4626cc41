"""Loading a model: resolve what the user named, build it on the meta device, walk it.

The one path from a model to what the commands read (the report, the
recommender, the estimator, GPU sizing, the pytest plugin's ``fits`` marker):
its :class:`~peftaudit.inventory.Inventory` and the
:class:`~peftaudit.recommend.facts.ModelFacts` the readiness checks read. No
weights are read or allocated.

>>> model = load("meta-llama/Llama-3.1-8B")   # doctest: +SKIP
>>> model.inventory.params.total               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftaudit.sources.base import ModelSource, ResolvedModel, SourceOptions, resolve

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftaudit.inventory import Inventory
    from peftaudit.recommend.facts import ModelFacts


@dataclass(frozen=True)
class LoadedModel:
    """A model built on the meta device, with what the commands read from it."""

    resolved: ResolvedModel
    inventory: Inventory
    facts: ModelFacts
    """Config values and class capabilities, for the readiness checks."""
    source: ModelSource
    options: SourceOptions

    def skeleton(self) -> torch.nn.Module:
        """A fresh meta-device build: the trace adapts the module it is given, so each trace gets its own."""
        return self.source.build(self.resolved, self.options)


def load(spec: str, options: SourceOptions | None = None) -> LoadedModel:
    """Resolve ``spec`` (hub id, catalog name, path) with the registered sources and load it.

    Notes about where the config came from are on ``resolved.notes`` (the CLI
    shows them on stderr).
    """
    options = options or SourceOptions()
    resolved, source = resolve(spec, options)
    return load_resolved(resolved, source, options)


def load_resolved(resolved: ResolvedModel, source: ModelSource, options: SourceOptions) -> LoadedModel:
    """Build a resolved model on the meta device and walk it."""
    from peftaudit.inventory import take_inventory
    from peftaudit.recommend.facts import model_facts

    module = source.build(resolved, options)
    return LoadedModel(
        resolved=resolved,
        inventory=take_inventory(module),
        facts=model_facts(module, model_id=resolved.id),
        source=source,
        options=options,
    )


def load_config(config: Mapping[str, Any], *, model_id: str, origin: str) -> LoadedModel:
    """Load the model a config describes, e.g. a live model's ``config.to_dict()``: its weights are never touched."""
    resolved = ResolvedModel(id=model_id, source="config", config=dict(config), origin=origin)
    return load_resolved(resolved, _GivenConfig(), SourceOptions())


class _GivenConfig:
    """Builds the config a :class:`ResolvedModel` carries; never registered, so it resolves nothing."""

    name = "config"
    priority = 0

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
        return None

    def build(self, resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
        from peftaudit.sources.build import build_from_config

        return build_from_config(resolved.config, model_id=resolved.id)
