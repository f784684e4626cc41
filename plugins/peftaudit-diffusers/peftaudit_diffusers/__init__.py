"""peftaudit plugin for diffusers models: UNets for SD 1.5/SDXL, the SD3 and Flux transformers.

Registers, through peftaudit's public hooks only, a model source
(``diffusers:sdxl/unet``, ``diffusers:PATH``) and architecture rules for
diffusers' attention and feed-forward modules. :func:`lora_targets` gives
the usual peft ``target_modules`` for each kind.
"""

from __future__ import annotations

from collections.abc import Callable

import peftaudit
from peftaudit.architecture import ArchitectureRule
from peftaudit.sources.base import ModelSource
from peftaudit_diffusers.kinds import MODEL_TYPES
from peftaudit_diffusers.rules import rules
from peftaudit_diffusers.source import DiffusersSource
from peftaudit_diffusers.targets import lora_targets

__all__ = ["MODEL_TYPES", "DiffusersSource", "lora_targets", "rules"]


@peftaudit.hookimpl
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    register(DiffusersSource())


@peftaudit.hookimpl
def peftaudit_register_architecture_rules(register: Callable[[ArchitectureRule], None]) -> None:
    for rule in rules():
        register(rule)
