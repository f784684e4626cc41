"""GPU-faithful stand-ins for TRL 1.16's loss kernels, active only while an objective is traced.

TRL's fused log-prob head (``trl/kernels/chunked_logprob.py``, patched in by ``add_fused_lm_head``,
``trl/trainer/utils.py:1548``) and ORPO/SimPO's ``selective_log_softmax`` (``utils.py:538``) take a
Triton path on CUDA and a torch path elsewhere; the two allocate differently. The trace runs on the
CPU, so these stand-ins give it the CUDA path's allocations (:func:`trl_stand_ins`):

* :func:`fused_head_cuda_path`: ``_use_triton`` answers True, so the head scores only the valid
  positions (``hidden_states[mask]``, ``labels[mask]``, ``masked_scatter``; utils.py:1642-1660) and
  folds its tiles with Triton kernels, which write in place and allocate nothing
  (``_forward_kernel``/``_backward_kernel`` become no-ops); ``_addmm_fp32`` accumulates straight into
  its fp32 buffer (CUDA's ``torch.addmm(out_dtype=float32, out=acc)``, no fp32 copies of its inputs).
  The masked gathers have a data-dependent size under fake tensors: :class:`MaskedRows` answers with
  the count the step knows (GRPO: every completion token; DPO, KTO: every position, the upper bound).
* :func:`kernel_sees_autocast`: the head picks its compute dtype from ``torch.is_autocast_enabled`` /
  ``get_autocast_dtype`` (chunked_logprob.py:329-331) for the tensors' device, which is the CPU here;
  it is told the state of the trace's CUDA autocast emulation instead. Without it a bf16-mixed trace
  fails (``torch.mm(..., out=tile)`` with a bf16 product into an fp32 tile).
* :func:`selective_log_softmax_cuda_path`: ``selective_log_softmax`` takes its Triton branch
  (utils.py:572-574); ``trl/kernels/logprob_entropy.py`` imports triton when it loads, so its
  ``_LogProbEntropyFunction`` (146-245) is re-stated by its allocations.
* :func:`keep_recompute_autocast`: TRL's ``disable_gradient_checkpointing`` (trl/models/utils.py:397-414)
  re-enables checkpointing with transformers' default checkpoint function, which drops the trace's
  autocast emulation for recomputed layers (:func:`~peftaudit.memory.tracing.autocast.emulate_autocast_in_recompute`);
  without this the next checkpointed forward fails (``CheckpointError``: recomputed values differ).
* :class:`KnownLabels`: KTO's ``torch.nonzero`` on the batch's labels (kto_trainer.py:1411-1412) has a
  data-dependent size; the labels are the trace's own, so their counts are known.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from peftaudit.memory.tracing.autocast import AUTOCAST


class MaskedRows:
    """How many positions of each row the fused head scores (``labels != -100``), when the step knows it.

    ``per_row=None`` scores every position of the mask (the upper bound: DPO and KTO score their
    completion tokens, which are data); GRPO sets its completion length.
    """

    def __init__(self) -> None:
        self.per_row: int | None = None

    def count(self, mask_shape: tuple[int, ...]) -> int:
        total = 1
        for n in mask_shape:
            total *= int(n)
        if self.per_row is None or len(mask_shape) < 2:
            return total
        return int(mask_shape[0]) * min(self.per_row, int(mask_shape[-1]))


def _masked_functions() -> tuple[Any, Any]:
    import torch

    class Gather(torch.autograd.Function):
        """``x[mask]`` on CUDA: ``mask.nonzero()`` (kept for backward as the index) and one ``[n, ...]``
        output; the backward scatters into zeros shaped like ``x`` (``index_put`` of a zero tensor)."""

        @staticmethod
        def forward(ctx: Any, x: Any, n: int, mask_dims: int) -> Any:
            index = torch.empty((n, mask_dims), dtype=torch.long, device=x.device)
            out = x.new_empty((n, *x.shape[mask_dims:]))
            ctx.save_for_backward(index)
            ctx.input_shape = x.shape
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad.new_zeros(ctx.input_shape), None, None

    class Scatter(torch.autograd.Function):
        """``x.masked_scatter(mask, src)``: one output shaped like the mask; the backward gives ``src``
        ``grad.masked_select(mask)`` (``[n]``) and ``x`` a masked copy of the gradient."""

        @staticmethod
        def forward(ctx: Any, x: Any, src: Any, mask_shape: tuple[int, ...]) -> Any:
            ctx.n = src.numel()
            return torch.empty(mask_shape, dtype=x.dtype, device=x.device)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            grad_x = grad.new_empty(grad.shape) if ctx.needs_input_grad[0] else None
            grad_src = grad.new_empty((ctx.n,)) if ctx.needs_input_grad[1] else None
            return grad_x, grad_src, None

    return Gather, Scatter


def _masked_indexing(rows: MaskedRows) -> Any:
    import torch
    from torch.overrides import TorchFunctionMode

    gather, scatter = _masked_functions()

    class KnownMaskCount(TorchFunctionMode):
        """``x[bool_mask]`` (mask over ``x``'s leading dims) and ``masked_scatter`` with a known count."""

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func is torch.Tensor.__getitem__ and len(args) == 2:
                x, mask = args
                if (
                    isinstance(mask, torch.Tensor)
                    and mask.dtype == torch.bool
                    and tuple(mask.shape) == tuple(x.shape[: mask.dim()])
                ):
                    return gather.apply(x, rows.count(tuple(mask.shape)), mask.dim())
            if func is torch.Tensor.masked_scatter and len(args) == 3:
                x, mask, src = args
                return scatter.apply(x, src, tuple(mask.shape))
            return func(*args, **kwargs)

    return KnownMaskCount()


class _NoKernel:
    """A Triton kernel launch ``kernel[grid](...)``: the folds write in place and allocate nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def _addmm_in_place(acc: Any, a: Any, b: Any) -> None:
    # CUDA: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) writes the product into the fp32
    # accumulator (chunked_logprob.py:51-61); nothing is allocated.
    return None


@contextlib.contextmanager
def fused_head_cuda_path(rows: MaskedRows) -> Iterator[None]:
    """The CUDA (Triton) path of TRL's fused log-prob head (see the module docstring)."""
    from trl.kernels import chunked_logprob as ck
    from trl.trainer import utils as tu

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    patch(ck, "_use_triton", lambda device: True)
    patch(tu, "_use_triton", lambda device: True)
    patch(ck, "_forward_kernel", _NoKernel())
    patch(ck, "_backward_kernel", _NoKernel())
    patch(ck, "_addmm_fp32", _addmm_in_place)
    if not hasattr(getattr(ck, "triton", None), "cdiv"):  # triton is not imported without a GPU build
        patch(ck, "triton", types.SimpleNamespace(cdiv=lambda a, b: (a + b - 1) // b))
    try:
        with _masked_indexing(rows):
            yield
    finally:
        for obj, name, value in reversed(saved):
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


class _TorchSeeingAutocast:
    """``torch`` as ``chunked_logprob.py`` sees it: autocast state from the trace's CUDA emulation."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def is_autocast_enabled(self, *_args: Any) -> bool:
        return bool(AUTOCAST["enabled"] and not AUTOCAST["paused"] and AUTOCAST["dtype"] is not None)

    def get_autocast_dtype(self, *_args: Any) -> Any:
        return AUTOCAST["dtype"]


@contextlib.contextmanager
def kernel_sees_autocast() -> Iterator[None]:
    """The fused head's compute dtype follows the trace's autocast emulation (module docstring)."""
    import torch
    from trl.kernels import chunked_logprob as ck

    saved = ck.torch
    ck.torch = _TorchSeeingAutocast(torch)  # type: ignore[assignment]
    try:
        yield
    finally:
        ck.torch = saved


def _log_prob_entropy_function() -> Any:
    import torch

    class LogProbEntropy(torch.autograd.Function):
        """The allocations of ``_LogProbEntropyFunction`` (trl/kernels/logprob_entropy.py:146-245): four fp32
        per-row tensors, the logits kept without a copy; the backward one contiguous logits-shaped gradient."""

        @staticmethod
        def forward(ctx: Any, logits: Any, index: Any, temperature: float, row_mask: Any) -> Any:
            logprobs = torch.empty(logits.shape[:-1], device=logits.device, dtype=torch.float32)
            entropy = torch.empty_like(logprobs)
            log_z = torch.empty_like(logprobs)
            expected_logit = torch.empty_like(logprobs)
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(logits, index, log_z, expected_logit, row_mask)
            return logprobs, entropy

        @staticmethod
        def backward(ctx: Any, grad_logprobs: Any, grad_entropy: Any) -> Any:
            logits = ctx.saved_tensors[0]
            grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
            return grad_logits, None, None, None

    return LogProbEntropy


@contextlib.contextmanager
def selective_log_softmax_cuda_path() -> Iterator[None]:
    """``selective_log_softmax`` (trl/trainer/utils.py:538) takes its Triton branch, as on a GPU."""
    import torch
    from trl.trainer import utils as tu

    function = _log_prob_entropy_function()
    real_supports = tu._supports_trl_loss_kernel

    def supports(logits: Any, index: Any = None, row_mask: Any = None) -> bool:
        # utils.py:510-535 with the device check answered for CUDA: the other conditions read shapes only.
        if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not 1 <= logits.ndim <= 3:
            return False
        if logits.stride(-1) != 1 or logits.shape[-1] == 0:
            return False
        if index is not None and (index.shape != logits.shape[:-1] or index.dtype not in (torch.int32, torch.int64)):
            return False
        return row_mask is None or (index is not None and row_mask.shape == index.shape)

    saved = (tu.is_triton_available, real_supports, getattr(tu, "_fused_logprob_entropy", None))
    tu.is_triton_available = lambda: True
    tu._supports_trl_loss_kernel = supports
    tu._fused_logprob_entropy = lambda logits, index, temperature=1.0, row_mask=None: function.apply(
        logits, index, temperature, row_mask
    )
    try:
        yield
    finally:
        tu.is_triton_available, tu._supports_trl_loss_kernel, fused = saved
        if fused is None:
            del tu._fused_logprob_entropy
        else:
            tu._fused_logprob_entropy = fused


@contextlib.contextmanager
def keep_recompute_autocast() -> Iterator[None]:
    """After TRL's ``disable_gradient_checkpointing`` re-enables checkpointing, put the trace's recompute
    autocast back (module docstring). Patched where the trainers imported it by name."""
    from trl.models import utils as model_utils
    from trl.trainer import dpo_trainer, grpo_trainer, kto_trainer

    from peftaudit.memory.tracing.autocast import emulate_autocast_in_recompute

    original = model_utils.disable_gradient_checkpointing

    @contextlib.contextmanager
    def disable(model: Any, gradient_checkpointing_kwargs: Any = None) -> Iterator[None]:
        with original(model, gradient_checkpointing_kwargs):
            yield
        emulate_autocast_in_recompute(model)

    modules = (dpo_trainer, kto_trainer, grpo_trainer)
    for module in modules:
        module.disable_gradient_checkpointing = disable  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.disable_gradient_checkpointing = original  # type: ignore[attr-defined]


def known_labels(chosen: int, total: int) -> Any:
    """KTO's ``torch.nonzero`` on its bool labels (kto_trainer.py:1411-1412): the first call finds the
    ``chosen`` desirable examples, the second (``~labels``) the rest."""
    import torch
    from torch.overrides import TorchFunctionMode

    class KnownLabels(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.sizes = [chosen, total - chosen]

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.nonzero and self.sizes and args[0].dim() == 1 and args[0].dtype == torch.bool:
                return torch.zeros(self.sizes.pop(0), 1, dtype=torch.long, device=args[0].device)
            return func(*args, **(kwargs or {}))

    return KnownLabels()


@contextlib.contextmanager
def trl_stand_ins(rows: MaskedRows) -> Iterator[None]:
    """Every stand-in above but :func:`known_labels` (entered by KTO's step around its loss)."""
    with (
        fused_head_cuda_path(rows),
        kernel_sees_autocast(),
        selective_log_softmax_cuda_path(),
        keep_recompute_autocast(),
    ):
        yield


__all__ = [
    "MaskedRows",
    "fused_head_cuda_path",
    "keep_recompute_autocast",
    "kernel_sees_autocast",
    "known_labels",
    "selective_log_softmax_cuda_path",
    "trl_stand_ins",
]
