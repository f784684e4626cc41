"""GPU-faithful stand-ins installed for the duration of a trace.

Flash attention for SDPA (what CUDA's kernel keeps), CUDA's bool-mask dropout,
the autocast shim, bf16-only grouped matmuls and transformers' "not packed"
answer to packed-sequence detection (fake tensors have no values to read), and
Qwen-VL's image grid as a tensor whose values the trace knows (:func:`known_values`).
"""

from __future__ import annotations

import contextlib
import sys
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


def known_values(data: Any) -> Any:
    """A small index tensor whose values the trace knows (Qwen-VL's ``image_grid_thw``).

    Fake tensors have no values, but Qwen2/2.5-VL's vision tower reads the image grid's values
    (``.tolist()``) to lay out its patches and split its attention per image and window. Every
    op on this tensor alone runs on its real values, outside the fake and tracking modes (a few
    integers: the sizes the processor's grid would give; the patch indices computed from them, a
    few kilobytes per image, are not counted); an op that mixes it with fake tensors runs as
    usual, on fake tensors.
    """
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return torch.tensor(data, dtype=torch.long).as_subclass(_known_class())


_KNOWN: list[Any] = []


def _known_class() -> Any:
    if _KNOWN:
        return _KNOWN[0]
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import _disable_current_modes

    class KnownValues(torch.Tensor):
        """A real tensor among fake ones: see :func:`known_values`."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            with torch._C.DisableTorchFunctionSubclass():
                a, k = pytree.tree_map_only(cls, lambda t: t.as_subclass(torch.Tensor), (args, kwargs or {}))
                if any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((a, k))):
                    return func(*a, **k)
                with _disable_current_modes():
                    out = func(*a, **k)
                return pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(cls), out)

    _KNOWN.append(KnownValues)
    return KnownValues


def _on_known_values(original: Callable[..., Any], one_sequence: bool) -> Callable[..., Any]:
    """A vision helper run on a known grid's real values (outside fake mode): its indices and lengths.

    ``one_sequence``: the cumulative lengths it returns become one sequence of all patches. SDPA and
    flash attention keep per token what they keep (queries, keys, values, output, log-sum-exp), so
    one attention over every image's patches keeps what one per image or window keeps, and the
    step runs the same operations at every batch size (which the derivation's fit needs).
    """

    def helper(grid_thw: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(grid_thw, _known_class()):
            return original(grid_thw, *args, **kwargs)
        import torch
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import _disable_current_modes

        known = _known_class()
        with _disable_current_modes():
            out = original(grid_thw, *args, **kwargs)
            if one_sequence and isinstance(out, tuple):
                # The cumulative lengths are its only int32 outputs (indices and positions are int64).
                out = tuple(
                    _one_sequence(t) if isinstance(t, torch.Tensor) and t.dtype == torch.int32 else t for t in out
                )
            # Every output known too (window lengths are built from a list, not from the grid).
            with torch._C.DisableTorchFunctionSubclass():
                return pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(known), out)

    return helper


def _one_sequence(cu_seqlens: Any) -> Any:
    """Cumulative lengths ``[0, a, a + b, ...]`` as one sequence of them all: ``[0, total]``."""
    import torch

    return torch.tensor([0, int(cu_seqlens[-1])], dtype=torch.int32)


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
    # Qwen2/2.5-VL's vision helpers read the image grid's values: given a grid of known values
    # (known_values), they run on those, and what they return stays known (the attention's split
    # reads its lengths). Only where the model's module is loaded: the model is built before.
    for module_name in ("qwen2_vl.modeling_qwen2_vl", "qwen2_5_vl.modeling_qwen2_5_vl"):
        module = sys.modules.get(f"transformers.models.{module_name}")
        for helper in ("get_vision_attention_seqlens", "get_vision_position_ids", "get_vision_window_index"):
            if module is not None and hasattr(module, helper):
                patch(module, helper, _on_known_values(getattr(module, helper), plan.attention != "eager"))
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        AUTOCAST.update(enabled=False, cache={}, paused=0)
