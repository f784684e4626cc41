"""What the commands that estimate training plans share (``gpus``, ``fit``, ``plan``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit.commands._model import load_model
from peftaudit.commands._output import add_output_arguments

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.sources.load import LoadedModel


def add_plan_arguments(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int]) -> None:
    """The estimator's flags, then the output flags (last in the help), and the command's ``run``."""
    from peftaudit.memory import cli as memory_cli

    memory_cli.add_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def model_and_plans(args: argparse.Namespace, default_methods: str) -> tuple[LoadedModel, list[TrainingPlan]]:
    """MODEL, loaded; then the plans the flags ask for, methods defaulting to ``default_methods``."""
    from peftaudit.memory import cli as memory_cli

    plans = memory_cli.plans_from_args(args, default_methods=default_methods)  # bad flags: refused before loading
    objective = plans[0].objective if plans else "sft"  # one objective for every plan (one flag sets it)
    return load_model(args, objective), plans
