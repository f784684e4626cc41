"""Built-in fine-tuning methods for the memory estimator: full, freeze, LoRA, QLoRA,
8-bit LoRA, DoRA, IA3 and prompt tuning (see :mod:`peftaudit.memory.methods`)."""

from __future__ import annotations

from collections.abc import Callable

from peftaudit import hookimpl
from peftaudit.memory.methods import BUILTIN_METHODS, Method


@hookimpl
def peftaudit_register_methods(register: Callable[[Method], None]) -> None:
    for method in BUILTIN_METHODS:
        register(method)
