"""The memory estimator: peak GPU memory of full and PEFT fine-tuning, by component.

>>> from peftaudit.memory import TrainingPlan, estimate        # doctest: +SKIP
>>> estimate(inventory, TrainingPlan(method="qlora", rank=16))  # doctest: +SKIP

``estimate`` is analytic and fast (a recorded step re-evaluated per plan;
:mod:`peftaudit.memory.analytic`); ``trace`` runs one real training step of the
actual model on fake tensors and is the oracle the analytic estimate is tested
against (:mod:`peftaudit.memory.tracing`). Shared by both: the plan
(:mod:`.plan`), the methods' adaptations (:mod:`.methods`), the optimizers'
states (:mod:`.optimizers`), a checkpoint's own quantization (:mod:`.quantized`)
and the result (:mod:`.result`). Names are imported lazily so that plugin
loading does not import numpy or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftaudit._lazy import lazy_attributes
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.analytic.estimate import estimate
    from peftaudit.memory.result import COMPONENTS, MemoryEstimate
    from peftaudit.memory.tracing import trace

_LAZY = {
    "estimate": "peftaudit.memory.analytic.estimate",
    "MemoryEstimate": "peftaudit.memory.result",
    "COMPONENTS": "peftaudit.memory.result",
    "trace": "peftaudit.memory.tracing",
}

__all__ = [
    "COMPONENTS",
    "MemoryEstimate",
    "PlanError",
    "PlanWarning",
    "TrainingPlan",
    "available_methods",
    "estimate",
    "trace",
]


def available_methods() -> dict[str, Any]:
    """Registered fine-tuning methods by name (built-ins and plugins)."""
    from peftaudit.plugins import memory_methods

    return memory_methods()


__getattr__ = lazy_attributes(__name__, _LAZY)
