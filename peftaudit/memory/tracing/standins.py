"""GPU-faithful stand-ins installed for the duration of a trace.

Flash attention for SDPA (what CUDA's kernel keeps), CUDA's bool-mask dropout,
the autocast shim, bf16-only grouped matmuls and transformers' "not packed"
answer to packed-sequence detection (fake tensors have no values to read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.tracing.autocast import AUTOCAST, emulated_cast
from peftaudit.units import SHORT_DTYPES


def flash_attention() -> Callable[..., Any]:
    """``F.scaled_dot_product_attention`` keeping what CUDA's flash kernel keeps."""
    import torch

    class Flash(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, _out, _lse = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def sdpa(
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Any = None,
        enable_gqa: bool = False,
    ) -> Any:
        q, k, v = (emulated_cast(t, "lower") for t in (query, key, value))
        return Flash.apply(q, k, v)

    return sdpa


def gpu_dropout(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return input
        return torch.native_dropout(input, p, True)[0]

    return dropout


@contextlib.contextmanager
def stand_ins(plan: TrainingPlan) -> Iterator[None]:
    """Install the stand-ins for the duration of a trace."""
    import torch
    import torch.nn.functional as F

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(F, "scaled_dot_product_attention", flash_attention())
    patch(F, "dropout", gpu_dropout(F.dropout))
    AUTOCAST.update(enabled=False, dtype=getattr(torch, SHORT_DTYPES[plan.compute_dtype]), cache={}, paused=0)

    class AutocastShim(contextlib.ContextDecorator):
        """``torch.autocast(..., enabled=False)`` inside models pauses the emulation."""

        def __init__(self, *args: Any, enabled: bool = True, **kwargs: Any) -> None:
            self.enabled = enabled

        def __enter__(self) -> AutocastShim:
            if not self.enabled:
                AUTOCAST["paused"] += 1
            return self

        def __exit__(self, *exc: Any) -> None:
            if not self.enabled:
                AUTOCAST["paused"] -= 1

    real_is_enabled = torch.is_autocast_enabled

    def is_enabled(device_type: str | None = None) -> bool:
        # The emulation is CUDA's autocast: answer for "cuda" (and the device-less legacy call);
        # a CPU query (checkpoint recompute asks for the tensors' device) gets the real answer.
        if device_type in (None, "cuda"):
            return bool(AUTOCAST["enabled"] and not AUTOCAST["paused"])
        return bool(real_is_enabled(device_type))

    patch(torch, "autocast", AutocastShim)
    patch(torch, "is_autocast_enabled", is_enabled)
    # torch's grouped matmul takes bf16 only; transformers then uses its own fallback op.
    from transformers.integrations import moe as hf_moe

    real_can_use = hf_moe._can_use_grouped_mm
    patch(hf_moe, "_can_use_grouped_mm", lambda i, w, o: w.dtype == torch.bfloat16 and real_can_use(i, w, o))
    # transformers detects packed sequences from position ids by reading their values; fake
    # tensors have none, so it would assume packing and build a full mask. A real unpacked
    # batch gives None (and SDPA runs causal, with native GQA).
    from transformers import masking_utils

    patch(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        AUTOCAST.update(enabled=False, cache={}, paused=0)
