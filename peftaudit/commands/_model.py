"""The MODEL argument and its source flags, shared by every command that takes a model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.sources.base import ModelSource, ResolvedModel, SourceOptions
    from peftaudit.sources.load import LoadedModel

MODEL_HELP = (
    "a hub id (meta-llama/Llama-3.1-8B), a bundled catalog name, a directory with config.json, or a config.json file"
)


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """MODEL plus ``--online``, ``--revision``, ``--token``, ``--trust-remote-code``, ``--no-cache``."""
    parser.add_argument("model", metavar="MODEL", nargs=None if required else "?", help=MODEL_HELP)
    source = parser.add_argument_group("model source")
    source.add_argument("--online", action="store_true", help="fetch the hub's current config even for catalog models")
    source.add_argument("--revision", metavar="REV", help="hub revision: branch, tag or commit")
    source.add_argument("--token", metavar="TOKEN", help="hub token (default: HF_TOKEN or the saved login)")
    source.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running the model repository's own Python code (off by default)",
    )
    source.add_argument(
        "--no-cache",
        action="store_true",
        help="build the model afresh: neither read nor write the report and model caches (as PEFTAUDIT_NO_CACHE=1)",
    )


def source_options(args: argparse.Namespace) -> SourceOptions:
    from peftaudit.sources.base import SourceOptions

    return SourceOptions(
        online=args.online, revision=args.revision, trust_remote_code=args.trust_remote_code, token=args.token
    )


def resolve_model(args: argparse.Namespace) -> tuple[ResolvedModel, ModelSource, SourceOptions]:
    """Resolve MODEL; notes about where its config came from go to stderr."""
    from peftaudit.commands._output import warn
    from peftaudit.sources.base import resolve

    options = source_options(args)
    resolved, source = resolve(args.model, options)
    for note in resolved.notes:
        warn(note)
    return resolved, source, options


def load_model(args: argparse.Namespace, objective: str = "sft") -> LoadedModel:
    """Resolve MODEL, build it on the meta device and walk it (:func:`peftaudit.sources.load`),
    or read it from the model cache when it was built before (unless ``--no-cache``). ``objective``:
    the model that objective trains (a reward model is its sequence-classification class)."""
    from peftaudit.sources.load import load_resolved

    resolved, source, options = resolve_model(args)
    return load_resolved(model_for_objective(resolved, objective), source, options, use_cache=use_cache(args))


def model_for_objective(resolved: ResolvedModel, objective: str) -> ResolvedModel:
    """``resolved`` as ``objective`` trains it: ``reward`` trains the model's sequence-classification class
    with one label, as TRL's reward trainer loads it (a note on stderr says so)."""
    if objective != "reward":
        return resolved
    from dataclasses import replace

    from peftaudit.commands._output import warn
    from peftaudit.memory.objectives import reward_model_config

    config = reward_model_config(resolved.config)
    if config is None:
        return resolved
    warn(f"the reward objective trains {config['architectures'][0]} with one label (TRL's reward model)")
    return replace(resolved, config=config)


def use_cache(args: argparse.Namespace) -> bool:
    """Whether the command may read and write the caches (``--no-cache`` says not)."""
    return not getattr(args, "no_cache", False)
