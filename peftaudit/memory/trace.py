"""The trace oracle: one real training step of the actual model on fake tensors.

:func:`trace` takes the model skeleton (built on the meta device), applies the
plan's method with peft itself (``get_peft_model``), gives every parameter a
fake storage, and runs forward, backward and the optimizer step twice under
``FakeTensorMode`` on the CPU: no GPU, no real memory, and the real code paths
of transformers, peft and torch's autograd. A ``TorchDispatchMode`` watches
every storage that appears and disappears and records the global peak with
what was alive at that moment, by category.

Where the CPU would behave differently from a GPU, the trace uses
memory-faithful stand-ins, each kept small and explicit:

* ``F.scaled_dot_product_attention`` -> a flash-attention stand-in that keeps
  exactly what the CUDA flash kernel keeps (q, k, v, output, fp32 log-sum-exp);
* dropout -> ``torch.native_dropout`` (a bool mask, as on CUDA, not the CPU's
  float mask);
* autocast -> CUDA's autocast policy, emulated with a ``TorchFunctionMode``
  (half-precision matmuls, fp32 norms/softmax/reductions, cached casts of
  trainable leaf weights), because CPU autocast has different op lists;
* bitsandbytes 4-bit / 8-bit layers -> subclasses of ``bnb.nn.Linear4bit`` /
  ``Linear8bitLt`` (so peft wraps them with its bnb LoRA layers) that hold a
  packed uint8 (or int8) weight and the quantization constants as fake tensors,
  and run bitsandbytes' matmul memory behaviour (4-bit: the dequantized weight
  is scratch and nothing of the input is kept; 8-bit: the input is kept);
* bitsandbytes 8-bit / paged optimizers -> their own ``init_state`` allocates
  the states; the CUDA update kernel is skipped;
* transformers' packed-sequence detection (it reads position-id values, which
  fake tensors lack) -> "not packed", what a real unpacked batch gives;
* autograd accumulates a tensor's second gradient out of place for tensor
  subclasses (fake tensors) and in place for real tensors: the extra buffer of
  such an accumulation is not allowed to set the peak.

Known gaps: kernel workspaces (cuBLAS, flash-attention's own scratch) are not
tensors and are not seen; the CUDA context and the allocator's slack are added
from the plan, as in the analytic estimate.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.quantized import WeightFormat, resolve
from peftaudit.memory.result import COMPONENTS, MemoryEstimate

if TYPE_CHECKING:  # pragma: no cover
    import torch

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TraceResult:
    """Raw numbers of a trace: the peak and what was alive then, plus timings."""

    peak_bytes: int
    components: dict[str, int]
    peak_phase: str
    phase_peaks: dict[str, int]
    activations_per_layer: tuple[int, ...]
    trainable_params: int
    seconds: float
    ops: int
    notes: list[str] = field(default_factory=list)


def trace(model: torch.nn.Module, plan: TrainingPlan | None = None, *, steps: int = 2) -> MemoryEstimate:
    """Run ``steps`` training steps of ``model`` under ``plan`` on fake tensors; return the peak.

    ``model`` is a transformers model on the meta device (``source.build(...)``);
    it is modified in place (peft wraps it), so pass a fresh skeleton.
    """
    plan = plan or TrainingPlan()
    plan.validate()
    if plan.sharding not in ("none", "ddp") or plan.gpus > 1:
        raise PlanError("the trace simulates one GPU; sharded plans are estimated analytically only")
    if plan.loss == "chunked":
        raise PlanError("the trace runs transformers' own loss; a chunked loss is estimated analytically only")
    result = run_trace(model, plan, steps=steps)
    components = dict(result.components)
    allocated = sum(components.values())
    components["cuda_context"] = int(plan.cuda_context_bytes)
    components["allocator_margin"] = round(allocated * plan.allocator_fraction)
    ordered = {k: int(components.get(k, 0)) for k in COMPONENTS}
    return MemoryEstimate(
        method=plan.method,
        total_bytes=sum(ordered.values()),
        components=ordered,
        peak_phase=result.peak_phase,
        activations_per_layer=result.activations_per_layer,
        phase_peaks=result.phase_peaks,
        trainable_params=result.trainable_params,
        total_params=sum(p.numel() for p in _unique_params(model)),
        plan=plan.to_dict(),
        warnings=tuple(PlanWarning("trace-note", n) for n in result.notes),
        source="trace",
    )


# --- storage tracking -------------------------------------------------------------------------------


class _Tracker:
    """Live bytes by category, the global peak and what was alive at it.

    Storages are watched through weak references (fake storages keep their
    Python object alive as long as any tensor uses them), so a free is seen the
    moment the last tensor goes.
    """

    def __init__(self) -> None:
        self.live: dict[int, tuple[Any, int, str, int | None]] = {}
        self.by_cat: Counter[str] = Counter()
        self.by_layer: Counter[int] = Counter()
        self.current = 0
        self.peak = 0
        self.peak_cats: dict[str, int] = {}
        self.peak_phase = "forward"
        self.phase = "setup"
        self.category = "activations"
        self.layer: int | None = None
        self.phase_peaks: dict[str, int] = {}
        self.ops = 0

    def track(self, storage: Any, category: str | None = None, layer: int | None = None, *, peak: bool = True) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = int(storage.nbytes())
        cat = category or self.category
        lay = layer if layer is not None else self.layer

        def gone(_ref: Any, key: int = key) -> None:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]
                self.by_cat[entry[2]] -= entry[1]
                if entry[3] is not None:
                    self.by_layer[entry[3]] -= entry[1]

        self.live[key] = (weakref.ref(storage, gone), nbytes, cat, lay)
        self.current += nbytes
        self.by_cat[cat] += nbytes
        if lay is not None:
            self.by_layer[lay] += nbytes
        if not peak:
            return
        if self.current >= self.peak:
            self.peak = self.current
            self.peak_cats = dict(self.by_cat)
            self.peak_phase = self.phase
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def retag(self, storage: Any, category: str) -> None:
        key = id(storage)
        entry = self.live.get(key)
        if entry is None or entry[2] == category:
            return
        self.by_cat[entry[2]] -= entry[1]
        self.by_cat[category] += entry[1]
        self.live[key] = (entry[0], entry[1], category, None)
        if entry[3] is not None:
            self.by_layer[entry[3]] -= entry[1]


def _dispatch_mode(tracker: _Tracker, param_storages: set[int]) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    to_copy = torch.ops.aten._to_copy.default
    add = torch.ops.aten.add.Tensor

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            tracker.ops += 1
            out = func(*args, **(kwargs or {}))
            category = None
            if (
                func is to_copy
                and args
                and isinstance(args[0], torch.Tensor)
                and id(args[0].untyped_storage()) in param_storages
            ):
                category = "weight_copies"
            # Autograd adds a second gradient into the first in place on real tensors, but out of
            # place on tensor subclasses such as fake tensors: that extra buffer is not a peak.
            accumulating = (
                func is add
                and tracker.phase == "backward"
                and len(args) == 2
                and not kwargs
                and all(isinstance(a, torch.Tensor) for a in args)
                and args[0].shape == args[1].shape
                and args[0].dtype == args[1].dtype
                and torch._C._current_autograd_node() is not None
            )
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    tracker.track(t.untyped_storage(), category, peak=not accumulating)
            return out

    return Watch()


# --- GPU-faithful stand-ins -------------------------------------------------------------------------------


def _flash_attention() -> Callable[..., Any]:
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
        q, k, v = (_emulated_cast(t, "lower") for t in (query, key, value))
        return Flash.apply(q, k, v)

    return sdpa


def _gpu_dropout(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return input
        return torch.native_dropout(input, p, True)[0]

    return dropout


# --- CUDA autocast emulation -------------------------------------------------------------------------------

_AUTOCAST: dict[str, Any] = {"enabled": False, "dtype": None, "cache": {}, "paused": 0}


def _emulated_cast(t: Any, policy: str) -> Any:
    import torch

    state = _AUTOCAST
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


def _autocast_mode() -> Any:
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
            if _AUTOCAST["enabled"] and not _AUTOCAST["paused"]:
                if func in lower:
                    args = tuple(_emulated_cast(a, "lower") for a in args)
                    kwargs = {
                        k: _emulated_cast(v, "lower") if k in ("bias", "weight") else v for k, v in kwargs.items()
                    }
                elif func in fp32 and not (func in explicit_dtype and kwargs.get("dtype") is not None):
                    args = tuple(_emulated_cast(a, "fp32") if i == 0 else a for i, a in enumerate(args))
                    if func in (F.layer_norm, F.group_norm):
                        args = tuple(_emulated_cast(a, "fp32") for a in args)
                        kwargs = {k: _emulated_cast(v, "fp32") for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return CudaAutocast()


def _emulate_autocast_in_recompute(model: Any) -> None:
    """Torch-function modes are not active while autograd recomputes a checkpointed layer,
    so the recompute enters the autocast emulation itself (as checkpoint re-enters autocast)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils.checkpoint import checkpoint

    def run(function: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if _get_current_function_mode_stack():
                return function(*args, **kwargs)
            with _autocast_mode():
                return function(*args, **kwargs)

        return inner

    def checkpoint_func(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return checkpoint(run(function), *args, use_reentrant=False, **kwargs)

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = checkpoint_func


@contextlib.contextmanager
def _patched(plan: TrainingPlan) -> Iterator[None]:
    """Install the stand-ins for the duration of a trace."""
    import torch
    import torch.nn.functional as F

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(F, "scaled_dot_product_attention", _flash_attention())
    patch(F, "dropout", _gpu_dropout(F.dropout))
    _AUTOCAST.update(enabled=False, dtype=getattr(torch, _TORCH_DTYPES[plan.compute_dtype]), cache={}, paused=0)

    class AutocastShim(contextlib.ContextDecorator):
        """``torch.autocast(..., enabled=False)`` inside models pauses the emulation."""

        def __init__(self, *args: Any, enabled: bool = True, **kwargs: Any) -> None:
            self.enabled = enabled

        def __enter__(self) -> AutocastShim:
            if not self.enabled:
                _AUTOCAST["paused"] += 1
            return self

        def __exit__(self, *exc: Any) -> None:
            if not self.enabled:
                _AUTOCAST["paused"] -= 1

    real_is_enabled = torch.is_autocast_enabled

    def is_enabled(device_type: str | None = None) -> bool:
        # The emulation is CUDA's autocast: answer for "cuda" (and the device-less legacy call);
        # a CPU query (checkpoint recompute asks for the tensors' device) gets the real answer.
        if device_type in (None, "cuda"):
            return bool(_AUTOCAST["enabled"] and not _AUTOCAST["paused"])
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
        _AUTOCAST.update(enabled=False, cache={}, paused=0)


# --- quantized stand-ins ---------------------------------------------------------------------------------


def _quant_layer_classes() -> tuple[type, type]:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PlanError("tracing a quantized base needs bitsandbytes (pip install bitsandbytes)") from exc
    import torch

    class MatMul4bit(torch.autograd.Function):
        """bitsandbytes' MatMul4Bit: dequantize, matmul; keep the packed weight only."""

        @staticmethod
        def forward(ctx: Any, a: Any, packed: Any, out_features: int, bias: Any) -> Any:
            w = torch.empty(out_features, a.shape[-1], dtype=a.dtype, device=a.device)
            ctx.save_for_backward(packed)
            ctx.shape = (out_features, a.shape[-1])
            return torch.nn.functional.linear(a, w, bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            return grad @ w, None, None, None

    class MatMul8bit(torch.autograd.Function):
        """bitsandbytes' MatMul8bitLt: fp16 and int8 copies of the input are scratch; the input is kept."""

        @staticmethod
        def forward(ctx: Any, a: Any, weight: Any, bias: Any) -> Any:
            a16 = a.to(torch.float16)
            ca = torch.empty(a16.shape, dtype=torch.int8, device=a.device)
            del a16
            acc = torch.empty((*a.shape[:-1], weight.shape[0]), dtype=torch.int32, device=a.device)
            del ca
            out = torch.empty((*a.shape[:-1], weight.shape[0]), dtype=a.dtype, device=a.device)
            del acc
            ctx.keep = a
            ctx.shape = tuple(weight.shape)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
            return grad @ w, None, None

    class FakeLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: Any) -> Any:
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype) if self.compute_dtype is not None else x
            return MatMul4bit.apply(x, self.weight, self.out_features, self.bias).to(inp_dtype)

    class FakeLinear8bit(bnb.nn.Linear8bitLt):
        def forward(self, x: Any) -> Any:
            return MatMul8bit.apply(x, self.weight, self.bias)

    return FakeLinear4bit, FakeLinear8bit


def _quantize_linears(
    model: Any, plan: TrainingPlan, kind: str, skip: set[str], formats: Mapping[str, WeightFormat] | None = None
) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """Replace frozen ``nn.Linear`` layers by quantized stand-ins; return their extra tensors' shapes.

    ``formats`` are a pre-quantized checkpoint's (:mod:`peftaudit.memory.quantized`): a module in
    it is stored as its format says; formats without a bitsandbytes layer of their own (fp8,
    GPTQ, AWQ, compressed-tensors) dequantize per matmul like the 4-bit stand-in, with their
    packed bytes and constants as fake tensors.
    """
    import torch

    from peftaudit.memory.dtypes import BNB_4BIT_BLOCK, BNB_NESTED_BLOCK

    lin4, lin8 = _quant_layer_classes()
    extras: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    compute = getattr(torch, _TORCH_DTYPES[plan.compute_dtype])
    for name, module in list(model.named_modules()):
        conv1d = type(module).__name__ == "Conv1D"
        if not (type(module) is torch.nn.Linear or conv1d) or name in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # transformers' Conv1D stores (in, out); bitsandbytes replaces it like a Linear.
        in_f, out_f = module.weight.shape if conv1d else (module.in_features, module.out_features)
        numel = out_f * in_f
        fmt = (formats or {}).get(name)
        layer_kind = fmt.kind if fmt is not None else kind
        double_quant = fmt.double_quant if fmt is not None else plan.double_quant
        with torch.device("meta"):
            if fmt is not None and fmt.layout not in ("bnb4", "bnb8"):
                new = lin4(
                    in_f,
                    out_f,
                    bias=module.bias is not None,
                    compute_dtype=compute,
                    quant_type="nf4",
                    compress_statistics=False,
                )
                packed, constants = fmt.storage(out_f, in_f)
                shapes: dict[str, tuple[tuple[int, ...], str]] = {
                    "weight": ((packed, 1), "uint8"),
                    "constants": ((constants,), "uint8"),
                }
            elif layer_kind in ("nf4", "fp4"):
                new = lin4(
                    in_f,
                    out_f,
                    bias=module.bias is not None,
                    compute_dtype=compute,
                    quant_type=layer_kind,
                    compress_statistics=double_quant,
                )
                blocks = math.ceil(numel / BNB_4BIT_BLOCK)
                shapes = {"weight": (((numel + 1) // 2, 1), "uint8")}
                if double_quant:
                    shapes.update(
                        absmax=((blocks,), "uint8"),
                        absmax2=((math.ceil(blocks / BNB_NESTED_BLOCK),), "float32"),
                        code2=((256,), "float32"),
                        offset=((1,), "float32"),
                    )
                else:
                    shapes.update(absmax=((blocks,), "float32"))
                shapes["code"] = ((16,), "float32")
            elif layer_kind == "int8":
                new = lin8(in_f, out_f, bias=module.bias is not None, has_fp16_weights=False)
                shapes = {"weight": ((out_f, in_f), "int8"), "SCB": ((out_f,), "float32")}
            else:  # fp8: block-scaled float8 weight, dequantized per matmul like the 4-bit path
                new = lin4(
                    in_f,
                    out_f,
                    bias=module.bias is not None,
                    compute_dtype=compute,
                    quant_type="nf4",
                    compress_statistics=False,
                )
                scales = math.ceil(out_f / 128) * math.ceil(in_f / 128)
                shapes = {"weight": ((out_f * in_f, 1), "uint8"), "scale_inv": ((scales,), "float32")}
        if module.bias is not None:
            new.bias = torch.nn.Parameter(
                torch.empty(out_f, dtype=module.bias.dtype, device="meta"), requires_grad=False
            )
        else:
            new.bias = None
        new._peftaudit_shapes = shapes
        setattr(parent, child, new)
        extras[name] = shapes
    return extras


# --- building the model ------------------------------------------------------------------------------


def _unique_params(model: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def _prepare_model(
    model: Any, plan: TrainingPlan
) -> tuple[Any, dict[str, dict[str, tuple[tuple[int, ...], str]]], list[str]]:
    """Apply precision, quantization and the method, all on the meta device."""
    import torch

    from peftaudit.inventory import take_inventory
    from peftaudit.plugins import memory_methods

    notes: list[str] = []
    inventory = take_inventory(model)
    # The same storage decision as the analytic estimate: a checkpoint's quantization_config wins.
    resolved = resolve(inventory, plan, memory_methods()[plan.method].adapt(inventory, plan))
    adaptation = resolved.adaptation
    dtype = getattr(torch, _TORCH_DTYPES[plan.weight_dtype])
    model.to(dtype)
    impl = "sdpa" if plan.attention in ("sdpa", "flash") else "eager"
    model.config._attn_implementation = impl
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None:
            cfg._attn_implementation = impl
            if (
                getattr(cfg, "_experts_implementation", None) is not None
                or hasattr(cfg, "num_local_experts")
                or hasattr(cfg, "num_experts")
            ):
                cfg._experts_implementation = "grouped_mm"
    extras: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    if adaptation.quantization is not None:
        from peftaudit.memory.targets import output_head_path

        formats = resolved.checkpoint.formats(inventory) if resolved.checkpoint is not None else {}
        if resolved.checkpoint is not None:
            skip = {m.path for m in inventory.modules if m.is_linear} - set(formats)
            if resolved.checkpoint.expert_formats(inventory):
                notes.append(
                    "fused expert weights stay 16-bit in the trace; the checkpoint stores them "
                    f"{resolved.checkpoint.label} (the analytic estimate counts that)"
                )
        else:
            head = output_head_path(inventory)
            tied = {p.module for p in inventory.parameters if p.tied_with} | {
                n.rpartition(".")[0] for p in inventory.parameters for n in p.tied_with
            }
            skip = {head or ""} | tied
        extras = _quantize_linears(model, plan, adaptation.quantization, skip, formats)
        # What transformers sets on a bitsandbytes-quantized model; peft dispatches on it.
        model.is_loaded_in_4bit = adaptation.quantization in ("nf4", "fp4", "fp8", "int")
        model.is_loaded_in_8bit = adaptation.quantization == "int8"
        if plan.kbit_upcast:
            # prepare_model_for_kbit_training: every non-quantized floating parameter to fp32.
            for name, p in model.named_parameters():
                if p.dtype in (torch.float16, torch.bfloat16) and not any(name.startswith(k + ".") for k in extras):
                    p.data = p.data.to(torch.float32)
    if plan.base_dtype in ("fp32", "bf16", "fp16"):
        base = getattr(torch, _TORCH_DTYPES[plan.base_dtype])
        for name, p in model.named_parameters():
            if name not in adaptation.trainable:
                p.data = p.data.to(base)
    if plan.gradient_checkpointing and plan.training:
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:  # diffusers models (non-reentrant by default)
            model.enable_gradient_checkpointing()
        _emulate_autocast_in_recompute(model)
    model = _apply_method(model, plan, adaptation)
    return model, extras, notes


def _apply_method(model: Any, plan: TrainingPlan, adaptation: Any) -> Any:
    if plan.method in ("full", "freeze"):
        for name, p in model.named_parameters():
            p.requires_grad_(name in adaptation.trainable)
        return model
    import peft

    autocast_adapter = plan.adapter_dtype != "auto"
    causal = hasattr(model, "prepare_inputs_for_generation")
    if plan.method == "ia3":
        ia3_targets = None if plan.targets in ("default", "all-linear") else list(plan.targets)
        config: Any = peft.IA3Config(
            target_modules=ia3_targets,
            feedforward_modules=[] if ia3_targets else None,
            task_type="CAUSAL_LM" if causal else None,
        )
    elif plan.method == "prompt-tuning":
        if not causal:
            raise PlanError("the trace runs prompt tuning on causal language models only")
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=plan.num_virtual_tokens)
    else:
        targets: Any = plan.targets
        if targets == "default":
            targets = None
        elif isinstance(targets, tuple):
            targets = list(targets)
        lora_kwargs: dict[str, Any] = {"lora_alpha": plan.lora_alpha, "bias": plan.lora_bias}
        config = peft.LoraConfig(
            r=plan.rank,
            lora_dropout=plan.dropout,
            target_modules=targets,
            exclude_modules=list(plan.exclude) or None,
            target_parameters=list(plan.target_parameters) or None,
            modules_to_save=list(plan.modules_to_save) or None,
            rank_pattern=dict(plan.rank_pattern),
            use_dora=plan.method == "dora",
            **lora_kwargs,
        )
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter)
    if plan.adapter_dtype in ("bf16", "fp16"):
        import torch

        target = getattr(torch, _TORCH_DTYPES[plan.adapter_dtype])
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(target)
    return model


def _materialize(model: Any, mode: Any, extras: dict[str, dict[str, tuple[tuple[int, ...], str]]]) -> dict[int, str]:
    """Give every parameter and buffer a fake storage; returns storage id -> category."""
    import torch

    categories: dict[int, str] = {}
    memo: dict[int, Any] = {}
    del extras
    with mode:
        for module in model.modules():
            shapes = getattr(module, "_peftaudit_shapes", None)
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in memo:
                    if shapes is not None and name == "weight":
                        shape, dt = shapes["weight"]
                        fake = torch.empty(shape, dtype=getattr(torch, dt))
                    else:
                        fake = torch.empty(p.shape, dtype=p.dtype)
                    new = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                    memo[id(p)] = new
                    cat = "trainable_weights" if p.requires_grad else "base_weights"
                    categories[id(new.untyped_storage())] = cat
                module._parameters[name] = memo[id(p)]
            for name, b in list(module._buffers.items()):
                if b is None:
                    continue
                fb = torch.empty(b.shape, dtype=b.dtype)
                module._buffers[name] = fb
                categories[id(fb.untyped_storage())] = "base_weights"
            if shapes is not None:
                for extra, (shape, dt) in shapes.items():
                    if extra == "weight":
                        continue
                    t = torch.empty(shape, dtype=getattr(torch, dt))
                    object.__setattr__(module, f"_peftaudit_const_{extra}", t)
                    categories[id(t.untyped_storage())] = "quantization_constants"
    return categories


def _decoder_layers(model: Any) -> list[Any]:
    import torch

    best: list[Any] = []
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if (
                children
                and all(type(c) is type(children[0]) for c in children)
                and sum(p.numel() for p in children[0].parameters()) > 0
            ):
                best = children
    return best


def _output_module(model: Any) -> Any:
    base = model
    for attr in ("get_base_model",):
        fn = getattr(base, attr, None)
        if callable(fn):
            base = fn()
    getter = getattr(base, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    if out is not None and hasattr(out, "base_layer"):
        out = out.base_layer
    return out


def _optimizer(plan: TrainingPlan, params: list[Any]) -> tuple[Any, Callable[[], None]]:
    """The plan's optimizer and a step function that runs under fake tensors."""
    import torch

    name = plan.optimizer
    impl: dict[str, Any] = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[
        plan.optimizer_impl
    ]
    if name == "adamw":
        opt: Any = torch.optim.AdamW(params, lr=1e-4, **impl)
    elif name in ("sgd", "sgd_momentum"):
        momentum = 0.9 if name == "sgd_momentum" else 0.0
        extra = impl if name == "sgd_momentum" else {}
        opt = torch.optim.SGD(params, lr=1e-3, momentum=momentum, **extra)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    else:
        return _bnb_optimizer(name, params)
    return opt, opt.step


def _bnb_optimizer(name: str, params: list[Any]) -> tuple[Any, Callable[[], None]]:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover
        raise PlanError(f"tracing {name} needs bitsandbytes") from exc
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "lion": bnb.optim.Lion32bit,
        "lion_8bit": bnb.optim.Lion8bit,
    }[name]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # The constructor computes the 8-bit quantization maps from values: real (tiny) tensors.
    with unset_fake_temporarily():
        opt = cls(params, lr=1e-4)

    def step() -> None:
        # bitsandbytes' own init_state allocates the states; the CUDA update kernel cannot run.
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and len(opt.state[p]) == 0:
                    opt.init_state(group, p, gindex, pindex)

    return opt, step


def run_trace(
    model: Any, plan: TrainingPlan, *, steps: int = 2, loss_fn: Callable[[Any], Any] | None = None
) -> TraceResult:
    """The trace itself (see :func:`trace`), returning the raw result.

    ``loss_fn(model)`` replaces the language-model step (token ids in, ``.loss`` out) for models
    that take other inputs: it builds its inputs (under fake tensors) and returns the loss.
    """

    started = time.perf_counter()
    with _quiet():
        return _run(model, plan, steps, started, loss_fn)


def _run(
    model: Any, plan: TrainingPlan, steps: int, started: float, loss_fn: Callable[[Any], Any] | None = None
) -> TraceResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, extras, notes = _prepare_model(model, plan)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    storage_cats = _materialize(model, mode, extras)
    tracker = _Tracker()
    param_storages = set(storage_cats)
    params = [p for p in _unique_params(model) if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    layers = _decoder_layers(model)
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: _enter_layer(tracker, i)))
        hooks.append(layer.register_forward_hook(lambda _m, _a, _o: _leave_layer(tracker)))
    head = _output_module(model)
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda _m, _a: _enter_head(tracker)))
    for p in params:
        hooks.append(
            p.register_post_accumulate_grad_hook(lambda q: tracker.retag(q.grad.untyped_storage(), "gradients"))
        )
    model.train(plan.training)
    vocab_inputs = _inputs_factory(model, plan) if loss_fn is None else dict
    per_layer: tuple[int, ...] = ()
    with mode, _patched(plan):
        for p in _unique_params(model):
            tracker.track(p.untyped_storage(), storage_cats.get(id(p.untyped_storage()), "base_weights"))
        for b in model.buffers():
            tracker.track(b.untyped_storage(), "base_weights")
        for m in model.modules():
            for attr, value in vars(m).items():
                if attr.startswith("_peftaudit_const_") and isinstance(value, torch.Tensor):
                    tracker.track(value.untyped_storage(), "quantization_constants")
        optimizer, step = (None, None) if not plan.training else _optimizer(plan, params)
        with _dispatch_mode(tracker, param_storages), _autocast_mode():
            for _ in range(steps if plan.training else 1):
                for _micro in range(plan.gradient_accumulation if plan.training else 1):
                    inputs = vocab_inputs()
                    tracker.phase, tracker.category = "forward", "activations"
                    _AUTOCAST["enabled"] = plan.autocast
                    if plan.training:
                        loss = loss_fn(model) if loss_fn is not None else model(**inputs).loss
                    else:
                        with torch.no_grad():
                            model(**inputs)
                        loss = None
                    _AUTOCAST["enabled"] = False
                    _AUTOCAST["cache"] = {}
                    tracker.layer = None
                    per_layer = tuple(tracker.by_layer[i] for i in range(len(layers)))
                    del inputs
                    if loss is None:
                        break
                    tracker.phase, tracker.category = "backward", "temporaries"
                    # Checkpointed layers recompute under autocast, as torch.utils.checkpoint restores it.
                    _AUTOCAST["enabled"] = plan.autocast and plan.gradient_checkpointing
                    loss.backward()
                    _AUTOCAST["enabled"] = False
                    _AUTOCAST["cache"] = {}
                    del loss
                if optimizer is None or step is None:
                    continue
                tracker.phase, tracker.category = "optimizer step", "temporaries"
                step()
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            tracker.retag(value.untyped_storage(), "optimizer_states")
                optimizer.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()
    seconds = time.perf_counter() - started
    comps = {k: max(0, int(v)) for k, v in tracker.peak_cats.items()}
    return TraceResult(
        peak_bytes=tracker.peak,
        components=comps,
        peak_phase=tracker.peak_phase,
        phase_peaks=dict(tracker.phase_peaks),
        activations_per_layer=per_layer,
        trainable_params=trainable,
        seconds=seconds,
        ops=tracker.ops,
        notes=notes,
    )


def _enter_layer(tracker: _Tracker, i: int) -> None:
    if tracker.phase == "forward":
        tracker.layer = i
        tracker.category = "activations"
    elif tracker.phase == "backward":
        # Gradient checkpointing recomputes the layer: those tensors are activations again.
        tracker.category = "activations"
        _AUTOCAST["cache"] = {}


def _leave_layer(tracker: _Tracker) -> None:
    if tracker.phase == "forward":
        tracker.layer = None
    elif tracker.phase == "backward":
        tracker.category = "temporaries"


def _enter_head(tracker: _Tracker) -> None:
    if tracker.phase == "forward":
        tracker.layer = None
        tracker.category = "logits_and_loss"


def _inputs_factory(model: Any, plan: TrainingPlan) -> Callable[[], dict[str, Any]]:
    import torch

    # Training scripts turn the KV cache off (it would keep a copy of every layer's keys and values
    # through the forward pass for nothing); models without the flag do not take it.
    takes_cache = "use_cache" in getattr(getattr(model, "config", None), "to_dict", lambda: {})()

    # Sequence classifiers take one label per sequence, language models one per token.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    per_sequence = type(base).__name__.endswith("ForSequenceClassification")

    def make() -> dict[str, Any]:
        ids = torch.zeros(plan.batch_size, plan.seq_len, dtype=torch.long)
        labels = torch.zeros(plan.batch_size, dtype=torch.long) if per_sequence else ids
        inputs: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if takes_cache:
            inputs["use_cache"] = False
        return inputs

    return make


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # peft's notes, and fake tensors' own log of a failing kernel (we raise the error anyway).
    loggers = [logging.getLogger(n) for n in ("peft", "torch._subclasses.fake_tensor", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
