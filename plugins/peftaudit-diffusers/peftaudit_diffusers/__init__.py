"""peftaudit plugin for diffusers models: UNets for SD 1.5/SDXL, the SD3 and Flux transformers.

Registers, through peftaudit's public hooks only (:mod:`peftaudit.plugin_api`),
a model source (``diffusers:sdxl/unet``, ``diffusers:PATH``), architecture
rules for diffusers' attention and feed-forward modules, and the
``peftaudit image-memory`` command (:mod:`peftaudit_diffusers.cli`).
:func:`lora_targets` gives the usual peft ``target_modules`` for each kind.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from peftaudit.plugin_api import ArchitectureRule, ModelSource, hookimpl
from peftaudit_diffusers.kinds import MODEL_TYPES
from peftaudit_diffusers.rules import rules
from peftaudit_diffusers.source import DiffusersSource
from peftaudit_diffusers.targets import lora_targets

__all__ = ["MODEL_TYPES", "DiffusersSource", "lora_targets", "rules"]


@hookimpl
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    register(DiffusersSource())


@hookimpl
def peftaudit_register_architecture_rules(register: Callable[[ArchitectureRule], None]) -> None:
    for rule in rules():
        register(rule)


@hookimpl
def peftaudit_register_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    from peftaudit_diffusers.cli import add_parser

    add_parser(subparsers)
