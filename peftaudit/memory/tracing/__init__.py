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
  such an accumulation is not allowed to set the peak;
* TRL's loss kernels, in the steps of an objective other than ``sft`` (TRL's own
  trainer code, :mod:`peftaudit.memory.tracing.objectives`) -> their CUDA (Triton)
  paths' allocations (:mod:`peftaudit.memory.tracing.trl_standins`).

Every allocation and free is logged and replayed through a model of PyTorch's CUDA
caching allocator (:mod:`peftaudit.memory.allocator`): the allocator margin is the least
device memory the steps run in above the allocated peak, and ``reserved_bytes`` what
``max_memory_reserved`` would show with memory to spare (``--lengths varied``: over a long
run of batches of varying length, made from four traced steps of growing length). Known
gaps: kernel workspaces (cuBLAS, flash-attention's own scratch) are not tensors and are not
seen; the CUDA context is added from the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from peftaudit.memory.allocator import allocation_events, reserve, smallest_capacity
from peftaudit.memory.allocator.lengths import reserved_over_run
from peftaudit.memory.allocator.reserve import Overheads, step_lengths
from peftaudit.memory.checkpointing import check_checkpointing
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.result import COMPONENTS, MemoryEstimate
from peftaudit.memory.tracing.model import decoder_layers, unique_params
from peftaudit.memory.tracing.run import TraceResult, run_trace

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftaudit.progress import Progress


def trace(
    model: torch.nn.Module,
    plan: TrainingPlan | None = None,
    *,
    steps: int = 2,
    progress: Progress | None = None,
) -> MemoryEstimate:
    """Run ``steps`` training steps of ``model`` under ``plan`` on fake tensors; return the peak.

    ``model`` is a transformers model on the meta device (``source.build(...)``);
    it is modified in place (peft wraps it), so pass a fresh skeleton.
    ``progress(done, total)`` is told how many of the traced micro-batches are done
    (steps x gradient accumulation; one without training), from ``0`` to ``total``.
    """
    plan = plan or TrainingPlan()
    plan.validate()
    if plan.sharding not in ("none", "ddp") or plan.gpus > 1:
        raise PlanError("the trace simulates one GPU; sharded plans are estimated analytically only")
    if plan.loss == "chunked":
        raise PlanError("the trace runs transformers' own loss; a chunked loss is estimated analytically only")
    if plan.objective == "reward":  # TRL's reward trainer loads the model's sequence-classification class
        from peftaudit.memory.tracing.objectives import reward_model

        model = reward_model(model)
    if plan.objective != "sft" and plan.lengths == "varied":
        raise PlanError(f"--lengths varied is not traced for the {plan.objective} objective: its steps run at seq-len")
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
    # The skeleton's preparation (peft, fake storages) comes before the first micro-batch: shown as 0 done.
    total = len(lengths) * plan.gradient_accumulation if plan.training else 1
    if progress is not None:
        progress(0, total)
    result = run_trace(model, plan, layers=watched, lengths=lengths, on_step=_steps_done(progress, total))
    if progress is not None:
        progress(total, total)
    components = dict(result.components)
    allocated = sum(components.values())
    overheads, note = _replayed(result, plan, allocated, lengths)
    if note is not None:
        notes.append(note)
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


def _steps_done(progress: Progress | None, total: int) -> Callable[[], None] | None:
    """``run_trace``'s ``on_step``, as ``progress``: when a micro-batch begins, those before it are done."""
    if progress is None:
        return None
    begun = 0

    def began() -> None:
        nonlocal begun
        if begun:
            progress(begun, total)
        begun += 1

    return began


def _replayed(
    result: TraceResult, plan: TrainingPlan, allocated: int, lengths: tuple[int, ...]
) -> tuple[Overheads, PlanWarning | None]:
    """The traced step's allocations replayed through the caching-allocator model (a flat
    ``plan.allocator_fraction`` instead, when the plan gives one), and a note when the replay
    is not the one the plan asks for.

    With ``--lengths varied`` the reserve is that of a long run made from the traced steps
    (:func:`~peftaudit.memory.allocator.lengths.reserved_over_run`); the least capacity stays
    the traced steps' own, as under a limit the allocator frees what it cached before it fails
    (``benchmarks/results/allocator_factors.md`` compares the two). With expandable segments a
    long run reserves what the four steps do, so it is not made.
    """
    given = reserve.flat(plan, allocated)
    if given is not None:
        return given, None
    assert result.events is not None  # trace() always watches the layers, which logs the events
    found = smallest_capacity(allocation_events(result.events), expandable_segments=plan.expandable_segments)
    peak, note = found.plentiful.peak_reserved, None
    if plan.lengths == "varied" and not plan.expandable_segments:
        run = reserved_over_run(result.events, lengths, plan.seq_len, accumulation=plan.gradient_accumulation)
        if run is None:
            note = PlanWarning(
                "lengths-not-extended",
                "the traced steps do not run the same program at every length (a mask made only past a "
                "sliding window, say): reserved memory is that of the four traced steps, less than a "
                "long run of varying lengths holds",
            )
        peak = run or peak
    # Block rounding makes the replay's allocated peak a little above the tensors' own.
    reserved = max(0, peak - allocated)
    return Overheads(reserved, min(reserved, max(0, found.bytes - allocated)), "replay"), note


__all__ = ["TraceResult", "run_trace", "trace"]
