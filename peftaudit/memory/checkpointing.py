"""Whether a plan may checkpoint: one rule for the estimate, the trace and the sizing searches.

transformers refuses ``gradient_checkpointing_enable()`` on a model class whose
``supports_gradient_checkpointing`` is false (ConvNeXt), with a ``ValueError``;
peft refuses some methods with checkpointing on (prefix tuning: a ``ValueError`` in
``peft_model.py:_setup_prompt_encoder``), which a method declares with a
``checkpointing_refusal`` attribute (the reason, in words). A plan asking for
checkpointing on such a model or method is refused up front, as one
:class:`CheckpointingRefused` (a :class:`~peftaudit.memory.plan.PlanError`), by
:func:`~peftaudit.memory.estimate` (which knows the model by its class name) and
:func:`~peftaudit.memory.trace` (which has the model itself) alike; the sizing
searches ask :func:`checkpointing_refused` and skip the checkpointing setups it refuses.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from peftaudit.memory.plan import PlanError, TrainingPlan

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory


class CheckpointingRefused(PlanError):
    """A plan checkpoints a model transformers cannot checkpoint, or under a method peft refuses it for."""


def checkpointing_refused(inventory: Inventory, plan: TrainingPlan) -> str | None:
    """Why ``plan``'s gradient checkpointing cannot run on ``inventory``, or ``None`` where it can (or is off).

    The method's ``checkpointing_refusal`` (peft's prefix tuning) comes first, then the model's class
    (as :func:`check_checkpointing` judges it from the inventory).
    """
    if not (plan.gradient_checkpointing and plan.training):
        return None
    from peftaudit.plugins import memory_methods

    refusal = getattr(memory_methods().get(plan.method), "checkpointing_refusal", None)
    if refusal:
        return str(refusal)
    return _model_refusal(inventory.architecture, inventory.supports_gradient_checkpointing)


def check_inventory_checkpointing(inventory: Inventory, plan: TrainingPlan) -> None:
    """Raise :class:`CheckpointingRefused` with :func:`checkpointing_refused`'s reason, if it gives one."""
    refusal = checkpointing_refused(inventory, plan)
    if refusal is not None:
        raise CheckpointingRefused(refusal)


def check_checkpointing(model: type | str, plan: TrainingPlan, *, supported: bool | None = None) -> None:
    """Raise :class:`CheckpointingRefused` when ``plan`` checkpoints a model transformers cannot checkpoint.

    ``model``: the model's class, or its class name (looked up in transformers only when the plan
    checkpoints; a name transformers does not have, such as remote code, is not refused here).
    ``supported``: the answer already known (:func:`supports_checkpointing` at build time, kept on the
    inventory), so a model read from the model cache is judged without importing transformers.
    """
    if not (plan.gradient_checkpointing and plan.training):
        return
    refusal = _model_refusal(model, supported)
    if refusal is not None:
        raise CheckpointingRefused(refusal)


def _model_refusal(model: type | str, supported: bool | None) -> str | None:
    """:func:`check_checkpointing`'s reason for refusing a checkpointing plan on ``model``, else ``None``."""
    if supported is not None:
        return None if supported else _refusal(model if isinstance(model, str) else model.__name__)
    cls = _transformers_class(model) if isinstance(model, str) else model
    return _refusal(cls.__name__) if cls is not None and not _class_supports(cls) else None


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
