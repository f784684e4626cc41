"""GPU-faithful stand-ins installed for the duration of a trace.

Flash attention for SDPA (what CUDA's kernel keeps), CUDA's bool-mask dropout,
the autocast shim, bf16-only grouped matmuls and transformers' "not packed"
answer to packed-sequence detection (fake tensors have no values to read),
Qwen-VL's image grid as a tensor whose values the trace knows (:func:`known_values`), and
Idefics3/SmolVLM told that their images are real ones (:func:`_idefics3_stand_ins`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.tracing.autocast import AUTOCAST, emulated_cast
from peftaudit.memory.tracing.compat import balanced_topk, transformers_module
from peftaudit.units import SHORT_DTYPES


def flash_attention(masked: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """``F.scaled_dot_product_attention`` keeping what CUDA's flash kernel keeps.

    ``masked``: what a call with an ``attn_mask`` runs instead (:func:`memory_efficient_attention`);
    without it the mask is ignored.
    """
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
        if attn_mask is not None and masked is not None:
            return masked(query, key, value, attn_mask)
        q, k, v = (emulated_cast(t, "lower") for t in (query, key, value))
        return Flash.apply(q, k, v)

    return sdpa


#: The memory-efficient kernel's log-sum-exp is padded to a multiple of 32 queries (``kAlignLSE``;
#: torch/_meta_registrations.py ``meta__scaled_dot_product_efficient_attention``).
_LSE_ALIGN = 32
#: ``preprocess_mask`` pads a mask whose strides are not multiples of 8 elements (``mem_eff_alignment``).
_MASK_ALIGN = 8


def memory_efficient_attention() -> Callable[..., Any]:
    """SDPA with an ``attn_mask`` as CUDA runs it: the memory-efficient kernel (flash takes no mask).

    What torch's ``scaled_dot_product_attention`` (aten/src/ATen/native/transformers/attention.cpp)
    does on that path, by its allocations: ``convert_boolean_attn_mask`` turns a boolean mask into a
    new additive one in the query's dtype (0 where it attends, -inf elsewhere; a floating mask passes
    as is); ``preprocess_mask`` pads its last dimension to a multiple of 8 when its strides are not
    (a copy) and expands it to ``[batch, heads, L, S]`` (a view); ``_scaled_dot_product_efficient_attention``
    returns the output and an fp32 log-sum-exp of ``ceil(L / 32) * 32`` per head (when a gradient is
    needed), and its autograd node saves q, k, v, the mask (``attn_bias``), the output and the
    log-sum-exp. No ``L x S`` scores exist outside the kernel. The backward returns the three
    gradients (the mask needs none).
    """
    import torch

    class MemoryEfficient(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, lse_length: int) -> Any:
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            lse = torch.empty((*q.shape[:-2], lse_length), dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, bias, out, lse)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, *_ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None

    def sdpa(query: Any, key: Any, value: Any, attn_mask: Any) -> Any:
        q, k, v = (emulated_cast(t, "lower") for t in (query, key, value))
        bias = additive_mask(emulated_cast(attn_mask, "lower"), q.dtype)
        if not _aligned(bias):
            pad = _MASK_ALIGN - bias.shape[-1] % _MASK_ALIGN
            bias = torch.nn.functional.pad(bias, (0, pad))[..., : bias.shape[-1]]
        bias = bias.expand(*q.shape[:-1], k.shape[-2])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        lse_length = -(-q.shape[-2] // _LSE_ALIGN) * _LSE_ALIGN if grad else 0
        return MemoryEfficient.apply(q, k, v, bias, lse_length)

    return sdpa


def additive_mask(mask: Any, dtype: Any) -> Any:
    """torch's ``convert_boolean_attn_mask``: a boolean mask as a new additive mask in ``dtype``."""
    import torch

    if mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.scalar_tensor(float("-inf"), dtype=dtype, device=mask.device))


def _aligned(mask: Any) -> bool:
    """``aligned_tensor<8>``: every stride but the last a multiple of 8 elements, the last 1."""
    return all(stride % _MASK_ALIGN == 0 for stride in mask.stride()[:-1]) and mask.stride()[-1] == 1


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
                    if func in _indexing() and len(args) > 1:
                        a = (a[0], _positions(args[1], cls), *a[2:])
                    return func(*a, **k)
                with _disable_current_modes():
                    out = func(*a, **k)
                return pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(cls), out)

    _KNOWN.append(KnownValues)
    return KnownValues


def _indexing() -> tuple[Any, ...]:
    import torch

    return (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put)


def _positions(index: Any, known: Any) -> Any:
    """An index into a fake tensor with its known boolean masks as the positions they select.

    A boolean mask selects as many rows as it has true values, which fake tensors cannot count;
    a known mask's true positions (``nonzero``, on its values) select the same rows, with the
    same operations and sizes after them (Qwen3-VL adds its deepstack features at the image
    tokens' positions: ``hidden_states[visual_pos_masks, :]``).
    """
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    items = index if isinstance(index, tuple | list) else (index,)
    # A known integer index (a balanced MoE routing's token indices, tracing/compat.py) is made plain below.
    if not any(isinstance(i, known) for i in items):
        return index
    out: list[Any] = []
    for item in items:
        if isinstance(item, known) and item.dtype == torch.bool:
            with _disable_current_modes(), torch._C.DisableTorchFunctionSubclass():
                out.extend(item.as_subclass(torch.Tensor).nonzero(as_tuple=True))
        elif isinstance(item, known):
            out.append(item.as_subclass(torch.Tensor))
        else:
            out.append(item)
    return tuple(out)


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


#: Qwen2/2.5-VL's modules: their vision helpers read the image grid's values.
_QWEN_VL_MODULES = ("qwen2_vl.modeling_qwen2_vl", "qwen2_5_vl.modeling_qwen2_5_vl")
#: Qwen3-VL's modules: the same helpers, and one more (:func:`_qwen_vl_stand_ins`).
_QWEN3_VL_MODULES = ("qwen3_vl.modeling_qwen3_vl", "qwen3_vl_moe.modeling_qwen3_vl_moe")
#: Idefics3's and SmolVLM's modules, and their models that take the images (:func:`_idefics3_stand_ins`).
_IDEFICS3_MODULES = {"idefics3.modeling_idefics3": "Idefics3Model", "smolvlm.modeling_smolvlm": "SmolVLMModel"}


def _qwen_vl_stand_ins(patch: Callable[[Any, str, Any], None]) -> None:
    """Qwen-VL's other readers of values: its token types', and Qwen3-VL's grid in one more helper.

    ``get_rope_index`` lays out the text's 3-D positions from the token types
    (``mm_token_type_ids``, which the processor returns; Qwen2-VL and Qwen3-VL require them with
    images) and the grid (``.tolist()``, ``.item()``). Qwen3-VL's vision tower resamples its learned
    position embeddings to each image's grid (``get_vision_interpolation_indices_and_weights``:
    indices and weights, a few kilobytes per image). Given known values (the step's inputs,
    tracing/inputs.py), both run on them: the positions, 24 bytes per token, are not counted.
    """
    for module_name in (*_QWEN_VL_MODULES, *_QWEN3_VL_MODULES):
        module = sys.modules.get(f"transformers.models.{module_name}")
        if module is None:
            continue
        helper = "get_vision_interpolation_indices_and_weights"
        if hasattr(module, helper):
            patch(module, helper, _on_known_values(getattr(module, helper), False))
        for cls in list(vars(module).values()):
            if isinstance(cls, type) and "get_rope_index" in vars(cls):
                patch(cls, "get_rope_index", _method_on_known_values(vars(cls)["get_rope_index"]))


def _method_on_known_values(original: Callable[..., Any]) -> Callable[..., Any]:
    """A method run on its arguments' real values (outside fake mode) when every tensor among them is known."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import _disable_current_modes

        known = _known_class()
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors or not all(isinstance(t, known) for t in tensors):
            return original(self, *args, **kwargs)
        with _disable_current_modes():
            out = original(self, *args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return pytree.tree_map_only(torch.Tensor, lambda t: t.as_subclass(known), out)

    return method


def _idefics3_stand_ins(patch: Callable[[Any, str, Any], None]) -> None:
    """Idefics3 and SmolVLM read their images' pixel values and their patch masks' values.

    ``get_image_features`` drops the all-zero images a batch pads its samples with
    (``pixel_values == 0``), which fake pixels cannot tell; the step's images are all real
    (tracing/inputs.py pads none), so the comparison answers that (:func:`_real_images`) and the
    images and masks it keeps are selected by known positions (:func:`_positions`): the same
    copies as on a GPU. Its vision tower then makes the attention mask from the patch mask, all
    true for images without padding, which transformers drops under SDPA and flash attention after
    reading its values (``_ignore_bidirectional_mask_sdpa``): a fake patch mask is passed as no
    padding mask, what an all-true one is (:func:`_unpadded`).
    """
    for module_name, model_class in _IDEFICS3_MODULES.items():
        module = sys.modules.get(f"transformers.models.{module_name}")
        if module is None:
            continue
        cls = getattr(module, model_class, None)
        if cls is not None and "get_image_features" in vars(cls):
            patch(cls, "get_image_features", _real_images(vars(cls)["get_image_features"]))
        if hasattr(module, "create_bidirectional_mask"):
            patch(module, "create_bidirectional_mask", _unpadded(module.create_bidirectional_mask))


def _real_images(original: Callable[..., Any]) -> Callable[..., Any]:
    """``get_image_features`` told that no image is padding: its ``pixel_values == 0`` test answers no pixel is.

    The comparison still runs on the fake pixels (its mask, one byte per value, is allocated and
    freed as on a GPU); what it returns is a known all-false mask of that shape (one real byte,
    broadcast), so the counts and selections after it are known.
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import _disable_current_modes

    class NoZeroPixels(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.answered = False

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if not self.answered and func in (torch.Tensor.__eq__, torch.Tensor.eq, torch.eq) and _zero_test(args):
                self.answered = True  # the padding test only: the vision tower runs after it
                with _disable_current_modes():
                    answer = torch.zeros((), dtype=torch.bool).expand(out.shape)
                return answer.as_subclass(_known_class())
            return out

    def get_image_features(self: Any, *args: Any, **kwargs: Any) -> Any:
        with NoZeroPixels():
            return original(self, *args, **kwargs)

    return get_image_features


def _zero_test(args: Any) -> bool:
    """Whether ``args`` compare fake floating-point values with the number 0 (``pixel_values == 0.0``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if len(args) != 2 or isinstance(args[1], bool) or not isinstance(args[1], int | float) or args[1] != 0:
        return False
    return isinstance(args[0], FakeTensor) and args[0].is_floating_point()


def _unpadded(original: Callable[..., Any]) -> Callable[..., Any]:
    """``create_bidirectional_mask`` given a fake (all-true) padding mask as none: see :func:`_idefics3_stand_ins`."""

    def create_bidirectional_mask(*args: Any, **kwargs: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(kwargs.get("attention_mask"), FakeTensor):
            kwargs["attention_mask"] = None
        return original(*args, **kwargs)

    return create_bidirectional_mask


class _BlockDiagonalStandIn:
    """peft BOFT's CUDA extension ``fbd_cuda`` (``tuners/boft/fbd/fbd_cuda_kernel.cu``) as allocations:
    ``forward`` makes ``at::zeros({z, N*b, N*b}, input.options())``, ``backward`` ``at::zeros_like(input)``."""

    @staticmethod
    def forward(input: Any) -> list[Any]:
        z, n, b, _ = input.shape
        return [input.new_empty((z, n * b, n * b))]

    @staticmethod
    def backward(grad_output: Any, input: Any) -> list[Any]:
        import torch

        return [torch.empty_like(input)]


@contextlib.contextmanager
def peft_adapter_building(method: str) -> Iterator[None]:
    """While ``get_peft_model`` builds ``method``: BOFT sees its CUDA extension (:func:`peft_adapter_stand_ins`)."""
    if method != "boft":
        yield
        return
    from peft.tuners.boft import layer

    saved = layer._FBD_CUDA
    layer._FBD_CUDA = _BlockDiagonalStandIn()  # type: ignore[assignment]
    try:
        yield
    finally:
        layer._FBD_CUDA = saved


def peft_adapter_stand_ins(patch: Callable[[Any, str, Any], None]) -> None:
    """What peft's LyCORIS and BOFT layers need to run on fake tensors, as on a GPU.

    LoHa and LoKr decide their module dropout with ``torch.rand(1) > module_dropout`` in their
    forward (``tuners/loha/layer.py``, ``tuners/lokr/layer.py``): a data-dependent branch fake
    tensors cannot take. Inside those forwards ``torch.rand(1)`` draws one real number (no GPU
    memory worth counting). BOFT's butterfly factor needs the ``fbd_cuda`` extension, which peft
    JIT-builds on GPUs (``get_fbd_cuda``; without it peft falls back to factor 1): a stand-in that
    allocates what its kernels allocate. Only where peft's modules are loaded.
    """
    import torch

    for module_name in ("peft.tuners.loha.layer", "peft.tuners.lokr.layer"):
        module = sys.modules.get(module_name)
        cls = None if module is None else getattr(module, "LoHaLayer" if "loha" in module_name else "LoKrLayer", None)
        if cls is not None and "forward" in vars(cls):
            patch(cls, "forward", _real_rand_one(vars(cls)["forward"], torch))
    boft = sys.modules.get("peft.tuners.boft.layer")
    if boft is not None:
        patch(boft, "_FBD_CUDA", _BlockDiagonalStandIn())


def _real_rand_one(original: Callable[..., Any], torch: Any) -> Callable[..., Any]:
    """``original`` (a LyCORIS forward) with ``torch.rand(1)`` drawn for real (:func:`peft_adapter_stand_ins`)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        real = torch.rand

        def rand(*size: Any, **options: Any) -> Any:
            if size in ((1,), ((1,),)) and not options:
                with unset_fake_temporarily():
                    return float(real(1))
            return real(*size, **options)

        torch.rand = rand
        try:
            return original(self, x, *args, **kwargs)
        finally:
            torch.rand = real

    return forward


@contextlib.contextmanager
def stand_ins(plan: TrainingPlan) -> Iterator[None]:
    """Install the stand-ins for the duration of a trace."""
    import torch
    import torch.nn.functional as F

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    # TRL's trainers pass their padded batches' attention_mask: SDPA then runs with a mask
    # (memory_efficient_attention). SFT's traces keep ignoring masks (see docs/memory.md).
    masked = memory_efficient_attention() if plan.objective != "sft" and plan.attention == "sdpa" else None
    patch(F, "scaled_dot_product_attention", flash_attention(masked))
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
    # (Older transformers lack both modules patched below: tracing/compat.py.)
    hf_moe = transformers_module("integrations.moe")
    if hf_moe is not None:
        real_can_use = hf_moe._can_use_grouped_mm
        patch(hf_moe, "_can_use_grouped_mm", lambda i, w, o: w.dtype == torch.bfloat16 and real_can_use(i, w, o))
    else:  # per-expert loops pick tokens by the router's values: a known balanced routing
        patch(torch, "topk", balanced_topk(torch.topk))
    # transformers detects packed sequences from position ids by reading their values; fake
    # tensors have none, so it would assume packing and build a full mask. A real unpacked
    # batch gives None (and SDPA runs causal, with native GQA).
    masking_utils = transformers_module("masking_utils")
    if masking_utils is not None:
        patch(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    # Qwen2/2.5-VL's vision helpers read the image grid's values: given a grid of known values
    # (known_values), they run on those, and what they return stays known (the attention's split
    # reads its lengths). Only where the model's module is loaded: the model is built before.
    for module_name in (*_QWEN_VL_MODULES, *_QWEN3_VL_MODULES):
        module = sys.modules.get(f"transformers.models.{module_name}")
        for helper in ("get_vision_attention_seqlens", "get_vision_position_ids", "get_vision_window_index"):
            if module is not None and hasattr(module, helper):
                patch(module, helper, _on_known_values(getattr(module, helper), plan.attention != "eager"))
    _qwen_vl_stand_ins(patch)
    _idefics3_stand_ins(patch)
    peft_adapter_stand_ins(patch)
    # LLaVA-NeXT packs its images' tiles one image at a time: at once here (tracing/anyres.py).
    from peftaudit.memory.tracing import anyres

    anyres.install(patch)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        AUTOCAST.update(enabled=False, cache={}, paused=0)
