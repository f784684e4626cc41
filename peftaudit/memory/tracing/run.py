"""One traced run: training steps under fake tensors, watched storage by storage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from peftaudit.memory.allocator.lengths import STEP_MARK
from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.tracing.autocast import AUTOCAST, autocast_mode
from peftaudit.memory.tracing.inputs import placeholder_checks_off, step_inputs
from peftaudit.memory.tracing.model import decoder_layers, materialize, output_module, prepare_model, unique_params
from peftaudit.memory.tracing.optimizer import optimizer_for
from peftaudit.memory.tracing.standins import stand_ins
from peftaudit.memory.tracing.tracker import EventLog, Tracker, dispatch_mode


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
    events: EventLog | None = None
    """Every allocation and free in order, when the trace was asked to watch layers (``layers=``)."""


def run_trace(
    model: Any,
    plan: TrainingPlan,
    *,
    steps: int = 2,
    loss_fn: Callable[[Any], Any] | None = None,
    layers: Sequence[tuple[str, Any]] | None = None,
    lengths: Sequence[int] | None = None,
    on_step: Callable[[], None] | None = None,
) -> TraceResult:
    """The trace itself (see :func:`trace`), returning the raw result.

    ``loss_fn(model)`` replaces the language-model step (token ids in, ``.loss`` out) for models
    that take other inputs: it builds its inputs (under fake tensors) and returns the loss.

    ``layers``: ``(label, module)`` for every repeated layer to watch, in any order; the result
    then carries the step's :class:`~peftaudit.memory.tracing.tracker.EventLog` with marks where
    each layer's forward starts (``L:label``) and ends (``E:label``), where its backward starts
    (``G:label``, the gradient of its output is ready) and where the gradient of its input is
    ready (``I:label``). By default the longest stack of identical layers is watched, unlogged.

    ``lengths``: the sequence length of each step, for batches of varying length (one step per
    entry, ``steps`` is then ignored); by default every step is ``plan.seq_len`` long.

    ``on_step()`` is called as each micro-batch's forward pass begins (progress, :mod:`peftaudit.progress`).

    A plan with an objective other than ``sft`` runs TRL's own loss for it
    (:mod:`peftaudit.memory.tracing.objectives`) unless ``loss_fn`` is given; its passes tag the
    ``generation`` and ``reference forward`` phases and the ``logits_and_loss``, ``kv_cache`` and
    ``reference_weights`` components.
    """

    started = time.perf_counter()
    with _quiet():
        return _run(model, plan, steps, started, loss_fn, layers, tuple(lengths or ()), on_step)


def _run(
    model: Any,
    plan: TrainingPlan,
    steps: int,
    started: float,
    loss_fn: Callable[[Any], Any] | None = None,
    watched: Sequence[tuple[str, Any]] | None = None,
    lengths: tuple[int, ...] = (),
    on_step: Callable[[], None] | None = None,
) -> TraceResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    if plan.objective == "reward":  # TRL's reward trainer loads the model's sequence-classification class
        from peftaudit.memory.tracing.objectives import reward_model

        model = reward_model(model)
    model, extras, notes = prepare_model(model, plan)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    storage_cats = materialize(model, mode, extras)
    tracker = Tracker(log=watched is not None)
    param_storages = set(storage_cats)
    params = [p for p in unique_params(model) if p.requires_grad]
    objective_hooks: list[Any] = []
    objective_context: Any = contextlib.nullcontext()
    if loss_fn is None and plan.objective != "sft":
        from peftaudit.memory.tracing.objectives import trl_step

        objective = trl_step(model, plan, tracker, param_storages)
        loss_fn, objective_hooks, objective_context = objective, objective.handles, objective.traced()
    trainable = sum(p.numel() for p in params)
    layers = decoder_layers(model) if watched is None else [m for _, m in watched]
    labels = [str(i) for i in range(len(layers))] if watched is None else [label for label, _ in watched]
    hooks = []
    for i, (label, layer) in enumerate(zip(labels, layers, strict=True)):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda _m, a, k, i=i, label=label: _enter_layer(tracker, i, label, a, k), with_kwargs=True
            )
        )
        hooks.append(layer.register_forward_hook(lambda _m, _a, o, label=label: _leave_layer(tracker, label, o)))
    head = output_module(model)
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda _m, _a: _enter_head(tracker)))
    for p in params:
        hooks.append(
            p.register_post_accumulate_grad_hook(lambda q: tracker.retag(q.grad.untyped_storage(), "gradients"))
        )
    model.train(plan.training)
    # Token ids for language models; images for vision and multimodal models (tracing/inputs.py).
    step_in = step_inputs(model, plan)
    lengths = lengths or (plan.seq_len,) * (steps if plan.training else 1)
    # Batches of another length: their own token ids (built under the fake mode, as the plan's are).
    makers = {n: step_in.make if n == plan.seq_len else step_inputs(model, plan.with_(seq_len=n)).make for n in lengths}
    per_layer: tuple[int, ...] = ()
    with mode, stand_ins(plan), placeholder_checks_off(), objective_context:
        for p in unique_params(model):
            tracker.track(p.untyped_storage(), storage_cats.get(id(p.untyped_storage()), "base_weights"))
        for b in model.buffers():
            tracker.track(b.untyped_storage(), "base_weights")
        for m in model.modules():
            for attr, value in vars(m).items():
                if attr.startswith("_peftaudit_const_") and isinstance(value, torch.Tensor):
                    tracker.track(value.untyped_storage(), "quantization_constants")
        optimizer, step = (None, None) if not plan.training else optimizer_for(plan, params, model)
        with dispatch_mode(tracker, param_storages), autocast_mode():
            for length in lengths if plan.training else lengths[:1]:
                # Where each optimizer step begins, its batches' token ids included: what
                # allocator/lengths.py cuts the log at to repeat steps at other lengths.
                tracker.mark(STEP_MARK)
                for _micro in range(plan.gradient_accumulation if plan.training else 1):
                    if on_step is not None:
                        on_step()
                    inputs = makers[length]() if loss_fn is None else {}
                    tracker.phase, tracker.category = "forward", "activations"
                    tracker.mark("forward")
                    if loss_fn is None:
                        inputs.update(step_in.images())
                    AUTOCAST["enabled"] = plan.autocast
                    if plan.training:
                        loss = loss_fn(model) if loss_fn is not None else step_in.loss(model(**inputs))
                    else:
                        with torch.no_grad():
                            model(**inputs)
                        loss = None
                    AUTOCAST["enabled"] = False
                    AUTOCAST["cache"] = {}
                    tracker.layer = None
                    per_layer = tuple(tracker.by_layer[i] for i in range(len(layers)))
                    del inputs
                    if loss is None:
                        tracker.mark("end")
                        break
                    tracker.phase, tracker.category = "backward", "temporaries"
                    # Checkpointed layers recompute under autocast, as torch.utils.checkpoint restores it.
                    AUTOCAST["enabled"] = plan.autocast and plan.gradient_checkpointing
                    tracker.mark("backward")
                    loss.backward()
                    tracker.mark("end")
                    AUTOCAST["enabled"] = False
                    AUTOCAST["cache"] = {}
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
    for h in (*hooks, *objective_hooks):
        h.remove()
    seconds = time.perf_counter() - started
    comps = {k: max(0, int(v)) for k, v in tracker.peak_cats.items()}
    return TraceResult(
        events=tracker.log,
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


def _enter_layer(tracker: Tracker, i: int, label: str, args: Any, kwargs: Any) -> None:
    if tracker.phase == "forward":
        tracker.layer = i
        tracker.category = "activations"
        if tracker.log is not None:
            tracker.mark(f"L:{label}")
            _mark_gradient(tracker, f"I:{label}", (*args, kwargs.get("hidden_states"), *kwargs.values()))
    elif tracker.phase == "backward":
        # Gradient checkpointing recomputes the layer: those tensors are activations again.
        tracker.category = "activations"
        AUTOCAST["cache"] = {}


def _leave_layer(tracker: Tracker, label: str, output: Any) -> None:
    if tracker.phase == "forward":
        tracker.layer = None
        if tracker.log is not None:
            tracker.mark(f"E:{label}")
            _mark_gradient(tracker, f"G:{label}", output if isinstance(output, tuple) else (output,))
    elif tracker.phase == "backward":
        tracker.category = "temporaries"


def _mark_gradient(tracker: Tracker, label: str, candidates: Sequence[Any]) -> None:
    """Mark the event log when the gradient of the first tensor in ``candidates`` that needs one is ready."""
    import torch

    for t in candidates:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            # A hook on a non-leaf tensor runs when its gradient is complete, just before its
            # grad_fn: where the backward of the layer that made it begins.
            t.register_hook(lambda _g: tracker.mark(label))
            return


def _enter_head(tracker: Tracker) -> None:
    if tracker.phase == "forward":
        tracker.layer = None
        tracker.category = "logits_and_loss"


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
