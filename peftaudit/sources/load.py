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

import contextlib
import gc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
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


def load_resolved(
    resolved: ResolvedModel, source: ModelSource, options: SourceOptions, *, use_cache: bool = False
) -> LoadedModel:
    """Build a resolved model on the meta device and walk it.

    ``use_cache``: answer from the model cache (:func:`peftaudit.cache.load_model`) when this exact
    config, source, library versions and plugins were built before, without importing torch or
    transformers, and store what a build finds for the next time. Off by default; the commands turn it
    on unless ``--no-cache`` or ``PEFTAUDIT_NO_CACHE`` says otherwise.
    """
    from peftaudit import cache

    key = cache.model_key(resolved, options) if use_cache else None
    if key is not None:
        found = cache.load_model(key)
        if found is not None:
            inventory, facts = found
            return LoadedModel(resolved=resolved, inventory=inventory, facts=facts, source=source, options=options)

    from peftaudit.inventory import take_inventory
    from peftaudit.memory.checkpointing import supports_checkpointing
    from peftaudit.recommend.facts import model_facts

    with _collector_paused():
        module = source.build(resolved, options)
        inventory = take_inventory(module)
        # Asked of transformers now, while it is imported for the build: the estimate then needs neither.
        inventory = replace(inventory, supports_gradient_checkpointing=supports_checkpointing(inventory.architecture))
        facts = model_facts(module, model_id=resolved.id)
    if key is not None:
        cache.store_model(key, inventory, facts)
    return LoadedModel(resolved=resolved, inventory=inventory, facts=facts, source=source, options=options)


#: Set by the console script (:func:`peftaudit.cli.console_main`): this process is one short command.
_ONE_SHOT_PROCESS = False


def one_shot_process() -> None:
    """Tell the loader this process runs one command and exits (the console script does).

    Then what a build leaves alive (torch, transformers, the model's records) is moved out of the
    cyclic collector's sight for good (:func:`gc.freeze`) instead of being scanned by every later
    collection. A library user's long process keeps Python's defaults: it may drop those objects.
    """
    global _ONE_SHOT_PROCESS
    _ONE_SHOT_PROCESS = True


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a model is built and walked.

    Importing torch and transformers and building a skeleton make a few million objects and almost
    no garbage, and the collector scanned them again and again: 0.6 to 0.8 s of a first 405B report
    (benchmarks/bench_startup.py). Reference counting still frees memory meanwhile.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if _ONE_SHOT_PROCESS:
                gc.freeze()
            gc.enable()


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
