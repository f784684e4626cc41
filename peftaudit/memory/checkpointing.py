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


def check_checkpointing(model: type | str, plan: TrainingPlan, *, supported: bool | None = None) -> None:
    """Raise :class:`PlanError` when ``plan`` checkpoints a model transformers cannot checkpoint.

    ``model``: the model's class, or its class name (looked up in transformers only when the plan
    checkpoints; a name transformers does not have, such as remote code, is not refused here).
    ``supported``: the answer already known (:func:`supports_checkpointing` at build time, kept on the
    inventory), so a model read from the model cache is judged without importing transformers.
    """
    if not (plan.gradient_checkpointing and plan.training):
        return
    if supported is not None:
        if not supported:
            raise PlanError(_refusal(model if isinstance(model, str) else model.__name__))
        return
    cls = _transformers_class(model) if isinstance(model, str) else model
    if cls is not None and not _class_supports(cls):
        raise PlanError(_refusal(cls.__name__))


def supports_checkpointing(name: str) -> bool:
    """Whether :func:`check_checkpointing` lets a checkpointing plan through for the class named ``name``.

    Imports transformers: called where the model was just built, which imported it already.
    """
    cls = _transformers_class(name)
    return cls is None or _class_supports(cls)


def _class_supports(cls: type) -> bool:
    # transformers' own test (PreTrainedModel._activation_checkpointing_enable); classes that are not
    # transformers models (a peft wrapper) have no such attribute and are not refused.
    return getattr(cls, "supports_gradient_checkpointing", True) is not False


def _refusal(name: str) -> str:
    return f"{name} does not support activation checkpointing in transformers: train it without gradient checkpointing"


@functools.cache
def _transformers_class(name: str) -> type | None:
    """transformers' model class named ``name`` (``None`` where it has none: remote code)."""
    import transformers

    try:
        found: Any = getattr(transformers, name, None)
    except Exception:  # a lazy import that fails (a missing optional dependency) is "no such class"
        return None
    return found if isinstance(found, type) else None
