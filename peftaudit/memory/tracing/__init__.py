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

Every allocation and free is logged and replayed through a model of PyTorch's CUDA
caching allocator (:mod:`peftaudit.memory.allocator`): the allocator margin is the least
device memory the steps run in above the allocated peak, and ``reserved_bytes`` what
``max_memory_reserved`` would show with memory to spare (``--lengths varied``: four
steps of growing length). Known gaps: kernel workspaces (cuBLAS, flash-attention's own
scratch) are not tensors and are not seen; the CUDA context is added from the plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.memory.allocator import allocation_events, reserve, smallest_capacity
from peftaudit.memory.allocator.reserve import Overheads, step_lengths
from peftaudit.memory.checkpointing import check_checkpointing
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.result import COMPONENTS, MemoryEstimate
from peftaudit.memory.tracing.model import decoder_layers, unique_params
from peftaudit.memory.tracing.run import TraceResult, run_trace

if TYPE_CHECKING:  # pragma: no cover
    import torch


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
    check_checkpointing(type(model), plan)
    if plan.lengths == "varied" and plan.images:
        raise PlanError("--lengths varied is for text batches; a multimodal plan's images fix its token layout")
    lengths = step_lengths(plan) if plan.lengths == "varied" else (plan.seq_len,) * steps
    notes: list[PlanWarning] = []
    if plan.attention != "eager" and getattr(model, "_supports_sdpa", True) is False:
        # transformers refuses SDPA for some models (Gemma 2's logit soft-capping): they train eager,
        # as the analytic estimate's derived profile says too.
        notes.append(
            PlanWarning(
                "attention-unsupported",
                f"transformers does not run {type(model).__name__} with {plan.attention} attention: "
                "traced with eager attention, which it trains with",
            )
        )
        plan = plan.with_(attention="eager")
    watched = [(str(i), layer) for i, layer in enumerate(decoder_layers(model))]
    result = run_trace(model, plan, layers=watched, lengths=lengths)
    components = dict(result.components)
    allocated = sum(components.values())
    overheads = _replayed(result, plan, allocated)
    components["cuda_context"] = int(plan.cuda_context_bytes)
    components["allocator_margin"] = overheads.capacity
    ordered = {k: int(components.get(k, 0)) for k in COMPONENTS}
    return MemoryEstimate(
        method=plan.method,
        total_bytes=sum(ordered.values()),
        components=ordered,
        peak_phase=result.peak_phase,
        activations_per_layer=result.activations_per_layer,
        phase_peaks=result.phase_peaks,
        trainable_params=result.trainable_params,
        total_params=sum(p.numel() for p in unique_params(model)),
        plan=plan.to_dict(),
        warnings=tuple(notes) + tuple(PlanWarning("trace-note", n) for n in result.notes),
        source="trace",
        activations_source="trace",
        reserved_bytes=allocated + overheads.reserved,
        allocator_source=overheads.source,
    )


def _replayed(result: TraceResult, plan: TrainingPlan, allocated: int) -> Overheads:
    """The traced step's allocations replayed through the caching-allocator model (a flat
    ``plan.allocator_fraction`` instead, when the plan gives one)."""
    given = reserve.flat(plan, allocated)
    if given is not None:
        return given
    assert result.events is not None  # trace() always watches the layers, which logs the events
    found = smallest_capacity(allocation_events(result.events), expandable_segments=plan.expandable_segments)
    # Block rounding makes the replay's allocated peak a little above the tensors' own.
    reserved = max(0, found.plentiful.peak_reserved - allocated)
    return Overheads(reserved, min(reserved, max(0, found.bytes - allocated)), "replay")


__all__ = ["TraceResult", "run_trace", "trace"]
