"""Whether transformers can checkpoint a model's layers: one rule for the estimate and the trace.

transformers refuses ``gradient_checkpointing_enable()`` on a model class whose
``supports_gradient_checkpointing`` is false (ConvNeXt), with a ``ValueError``.
A plan asking for checkpointing on such a model is refused up front, as one
:class:`~peftaudit.memory.plan.PlanError`, by :func:`~peftaudit.memory.estimate`
(which knows the model by its class name) and :func:`~peftaudit.memory.trace`
(which has the model itself) alike.
"""

from __future__ import annotations

import functools
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan


def check_checkpointing(model: type | str, plan: TrainingPlan) -> None:
    """Raise :class:`PlanError` when ``plan`` checkpoints a model transformers cannot checkpoint.

    ``model``: the model's class, or its class name (looked up in transformers only when the plan
    checkpoints; a name transformers does not have, such as remote code, is not refused here).
    """
    if not (plan.gradient_checkpointing and plan.training):
        return
    cls = _transformers_class(model) if isinstance(model, str) else model
    # transformers' own test (PreTrainedModel._activation_checkpointing_enable); classes that are not
    # transformers models (a peft wrapper) have no such attribute and are not refused.
    if cls is not None and getattr(cls, "supports_gradient_checkpointing", True) is False:
        raise PlanError(
            f"{cls.__name__} does not support activation checkpointing in transformers: "
            "train it without gradient checkpointing"
        )


@functools.cache
def _transformers_class(name: str) -> type | None:
    """transformers' model class named ``name`` (``None`` where it has none: remote code)."""
    import transformers

    try:
        found: Any = getattr(transformers, name, None)
    except Exception:  # a lazy import that fails (a missing optional dependency) is "no such class"
        return None
    return found if isinstance(found, type) else None
