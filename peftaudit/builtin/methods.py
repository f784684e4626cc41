"""Built-in fine-tuning methods for the memory estimator: full, freeze, LoRA, QLoRA,
8-bit LoRA, DoRA, IA3 and prompt tuning (see :mod:`peftaudit.memory.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.methods import Method


@hookimpl
def peftaudit_register_methods(register: Callable[[Method], None]) -> None:
    from peftaudit.memory.adapters import ADAPTER_METHODS
    from peftaudit.memory.galore import GALORE_METHODS
    from peftaudit.memory.methods import BUILTIN_METHODS
    from peftaudit.memory.prompts import PROMPT_METHODS
    from peftaudit.memory.trainable_tokens import TrainableTokensMethod

    for method in BUILTIN_METHODS:
        register(method)
    for method in ADAPTER_METHODS:
        register(method)
    for method in PROMPT_METHODS:
        register(method)
    register(TrainableTokensMethod())
    for method in GALORE_METHODS:
        register(method)
