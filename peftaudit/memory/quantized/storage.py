"""What the estimate stores frozen base weights as: the checkpoint's format, the plan's, or ``--base-dtype``.

:func:`resolve` applies a checkpoint's quantization to the method's adaptation;
:func:`base_storage` writes the estimate's line that says what was decided and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from peftaudit.memory.plan import PlanWarning, TrainingPlan
from peftaudit.memory.quantized.config import checkpoint_quantization
from peftaudit.memory.quantized.formats import FP8_NOTE, CheckpointQuantization
from peftaudit.memory.result import BaseStorage

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.memory.methods import Adaptation


@dataclass(frozen=True)
class ResolvedBase:
    """What the estimate stores frozen base weights as, and the line that says why."""

    adaptation: Adaptation
    """The method's adaptation, its ``quantization`` replaced by the checkpoint's kind."""
    checkpoint: CheckpointQuantization | None
    """The checkpoint's format when frozen weights follow it, else ``None`` (plan rules)."""
    quantization: CheckpointQuantization | None
    """The checkpoint's quantization as read, whatever the estimate does with it."""
    source: str | None
    """``checkpoint``, ``dequantized``, ``override`` or ``None`` (no quantization_config)."""
    warnings: tuple[PlanWarning, ...] = ()


def resolve(inventory: Inventory, plan: TrainingPlan, adaptation: Adaptation) -> ResolvedBase:
    """Apply the checkpoint's quantization to the method's adaptation (``--base-dtype`` wins)."""
    raw = inventory.quantization_config
    quant = checkpoint_quantization(raw, inventory.model_type)
    if quant is None:
        if isinstance(raw, Mapping):
            method = raw.get("quant_method")
            warning = PlanWarning(
                "checkpoint-quantization-not-modelled",
                f"the checkpoint's quantization_config (quant_method {method!r}) is not modelled: its frozen "
                "weights are estimated at the plan's dtype; give --base-dtype for the storage it uses",
            )
            return ResolvedBase(adaptation, None, None, None, (warning,))
        return ResolvedBase(adaptation, None, None, None)
    if not quant.groups and quant.dequantized is None:
        return ResolvedBase(adaptation, None, None, None)  # nothing stored quantized (activation-only schemes)
    if plan.base_dtype is not None:
        return ResolvedBase(adaptation, None, quant, "override")
    if quant.kind is None:
        return ResolvedBase(adaptation, None, quant, "dequantized")
    return ResolvedBase(replace(adaptation, quantization=quant.kind), quant, quant, "checkpoint")


def base_storage(
    resolved: ResolvedBase,
    plan: TrainingPlan,
    method_quantization: str | None,
    *,
    total_params: int,
    quantized_params: int,
    packed_bytes: int,
    constant_bytes: int,
    dequantized_trained: int,
    dense_dtype: str,
) -> BaseStorage | None:
    """The estimate's line about a checkpoint's quantization; ``None`` for a checkpoint without one."""
    quant = resolved.quantization
    if quant is None or resolved.source is None:
        return None
    where = f"the checkpoint's quantization_config ({quant.label})"
    if resolved.source == "override":
        note = f"--base-dtype {plan.base_dtype} overrides {where}: frozen weights are estimated as {plan.base_dtype}"
    elif resolved.source == "dequantized":
        note = (
            f"{where} is not kept for training: {quant.dequantized}; this estimate assumes the weights "
            f"dequantized to {dense_dtype}"
        )
    elif quantized_params == 0:
        note = f"{where} packs weights that all train here: this estimate assumes them dequantized to {dense_dtype}"
    else:
        note = (
            f"base weights follow {where}: {_count(quantized_params)} of {_count(total_params)} parameters "
            f"stored packed ({_gib(packed_bytes)} GiB + {_gib(constant_bytes)} GiB of constants), the rest "
            f"(embeddings, output head, norms, skipped modules) at {dense_dtype}"
        )
        if method_quantization not in (None, quant.kind):
            note += f"; {plan.method} cannot quantize a pre-quantized checkpoint again"
        if dequantized_trained and quantized_params:
            note += (
                f"; the {_count(dequantized_trained)} parameters that train are estimated dequantized to "
                f"{dense_dtype} (packed weights cannot train)"
            )
        if quant.kind == "fp8":
            note += f"; {FP8_NOTE} (--base-dtype bf16 estimates that)"
    return BaseStorage(
        source=resolved.source,
        quant_method=quant.quant_method,
        format=quant.label,
        quantized_params=quantized_params,
        packed_bytes=packed_bytes,
        constant_bytes=constant_bytes,
        note=note,
        reference=quant.reference,
    )


def _count(n: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
