"""Built-in readiness checks (:mod:`peftaudit.recommend.checks`), registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.recommend.checks import Check


@hookimpl
def peftaudit_register_checks(register: Callable[[Check], None]) -> None:
    from peftaudit.recommend.checks import experts, lora, model_class, target_names, tokens, vocabulary

    # The order findings of equal severity are listed in.
    for item in (
        target_names.target_matching,
        lora.fan_in_fan_out,
        experts.moe,
        tokens.tokens,
        model_class.model,
        vocabulary.vocabulary,
        lora.dropout,
    ):
        register(item)
