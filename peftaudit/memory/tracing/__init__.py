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

from typing import TYPE_CHECKING

from peftaudit.memory.checkpointing import check_checkpointing
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.result import COMPONENTS, MemoryEstimate
from peftaudit.memory.tracing.model import unique_params
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
        total_params=sum(p.numel() for p in unique_params(model)),
        plan=plan.to_dict(),
        warnings=tuple(PlanWarning("trace-note", n) for n in result.notes),
        source="trace",
        activations_source="trace",
    )


__all__ = ["TraceResult", "run_trace", "trace"]
