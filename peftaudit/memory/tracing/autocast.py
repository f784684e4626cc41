"""CUDA's autocast policy, emulated on the CPU with a ``TorchFunctionMode``.

CPU autocast has different op lists; the trace needs CUDA's: half-precision
matmuls, fp32 norms/softmax/reductions, and cached casts of trainable leaf
weights. Models that call ``torch.autocast(..., enabled=False)`` pause it
(:func:`peftaudit.memory.tracing.standins.stand_ins` installs the shim), and a
checkpointed layer's recompute re-enters it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

# --- CUDA autocast emulation -------------------------------------------------------------------------------

AUTOCAST: dict[str, Any] = {"enabled": False, "dtype": None, "cache": {}, "paused": 0}


def emulated_cast(t: Any, policy: str) -> Any:
    import torch

    state = AUTOCAST
    if not state["enabled"] or state["paused"] or not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    target = state["dtype"] if policy == "lower" else torch.float32
    if t.dtype == target or t.dtype == torch.float64:
        return t
    if policy == "lower" and t.dtype == torch.float32 and t.is_leaf and t.requires_grad:
        # Autocast caches casts of trainable leaf weights. Weak values: a cast that autograd no longer
        # holds is gone, which is what CUDA's per-region cache gives across checkpoint recomputes.
        cache = state["cache"]
        hit = cache.get(id(t))
        if hit is not None and hit[0]() is t:
            cached = hit[1]()
            if cached is not None:
                return cached
        cast = t.to(target)
        cache[id(t)] = (weakref.ref(t), weakref.ref(cast))
        return cast
    return t.to(target)


def autocast_mode() -> Any:
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    lower = {
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.baddbmm,
        torch.addmm,
        torch.Tensor.addmm,
        torch.addbmm,
        # A composite op: on CUDA its bmm runs under autocast (BD-LoRA's BlockDiagonalLinear, OFT's rotation).
        torch.einsum,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose2d,
    }
    for name in ("grouped_mm",):
        if hasattr(F, name):
            lower.add(getattr(F, name))
    if hasattr(torch, "_grouped_mm"):
        lower.add(torch._grouped_mm)
    fp32 = {
        F.layer_norm,
        F.group_norm,
        F.softmax,
        F.log_softmax,
        F.cross_entropy,
        F.nll_loss,
        F.mse_loss,
        torch.softmax,
        torch.Tensor.softmax,
        torch.log_softmax,
        torch.Tensor.log_softmax,
        torch.pow,
        torch.Tensor.pow,
        torch.Tensor.__pow__,
        torch.rsqrt,
        torch.Tensor.rsqrt,
        torch.exp,
        torch.Tensor.exp,
        torch.log,
        torch.Tensor.log,
        torch.sum,
        torch.Tensor.sum,
        torch.cumsum,
        torch.Tensor.cumsum,
        torch.prod,
        torch.Tensor.prod,
        torch.norm,
        torch.Tensor.norm,
        F.normalize,
        torch.nn.functional.softplus,
    }
    explicit_dtype = {
        F.softmax,
        F.log_softmax,
        torch.softmax,
        torch.log_softmax,
        torch.Tensor.softmax,
        torch.Tensor.log_softmax,
        torch.sum,
        torch.Tensor.sum,
    }

    class CudaAutocast(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if AUTOCAST["enabled"] and not AUTOCAST["paused"]:
                if func in lower:
                    args = tuple(emulated_cast(a, "lower") for a in args)
                    kwargs = {k: emulated_cast(v, "lower") if k in ("bias", "weight") else v for k, v in kwargs.items()}
                elif func in fp32 and not (func in explicit_dtype and kwargs.get("dtype") is not None):
                    args = tuple(emulated_cast(a, "fp32") if i == 0 else a for i, a in enumerate(args))
                    if func in (F.layer_norm, F.group_norm):
                        args = tuple(emulated_cast(a, "fp32") for a in args)
                        kwargs = {k: emulated_cast(v, "fp32") for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return CudaAutocast()


def emulate_autocast_in_recompute(model: Any) -> None:
    """Torch-function modes are not active while autograd recomputes a checkpointed layer,
    so the recompute enters the autocast emulation itself (as checkpoint re-enters autocast)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils.checkpoint import checkpoint

    def run(function: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if _get_current_function_mode_stack():
                return function(*args, **kwargs)
            with autocast_mode():
                return function(*args, **kwargs)

        return inner

    def checkpoint_func(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return checkpoint(run(function), *args, use_reentrant=False, **kwargs)

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = checkpoint_func
