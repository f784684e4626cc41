"""One training step replayed on tapes: per-segment footprints, composed over the model.

A step is: embedding -> layers -> head (+ loss) forward, then the same segments
backward in reverse, then the optimizer step. Each distinct layer (layers
differ only when a method treats them differently, or in whether their input
needs a gradient) is recorded once on a :class:`~peftaudit.memory.analytic.tape.Tape`;
the recorded events are kept as linear forms, so evaluating a step for another
batch size or sequence length is arithmetic only (:meth:`StepProfile.walk`).

Gradient checkpointing (transformers' non-reentrant default) keeps only each
layer's input through the forward; in backward the layer's forward is replayed
(recomputed) right before its backward.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from peftaudit.memory.analytic import ops
from peftaudit.memory.analytic.layout import Layout
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs import LayerProgram
from peftaudit.memory.analytic.programs.registry import LayerFn
from peftaudit.memory.analytic.shape import ModelShape
from peftaudit.memory.analytic.tape import (
    ACT,
    CATEGORIES,
    LOGITS,
    TERMS,
    ZERO,
    CompiledEvents,
    Events,
    Footprint,
    Lin,
    Tape,
    Tensor,
    add,
    basis,
    per_token,
    scale,
)
from peftaudit.memory.dtypes import nbytes

N = len(CATEGORIES)


@dataclass(frozen=True)
class Segment:
    """One recorded stretch: its forward and backward events, and the bytes it keeps."""

    forward: CompiledEvents
    backward: CompiledEvents
    saved: CompiledEvents
    """Just the allocations alive at the end of the forward (activations kept for backward)."""


@dataclass(frozen=True)
class StepProfile:
    """Recorded segments of one step, in forward order (``layers`` maps index -> segment)."""

    embed: Segment
    layers: tuple[Segment, ...]
    head: Segment


@dataclass
class Walk:
    """The evaluated step: peak per phase with its breakdown, saved bytes per layer."""

    phases: dict[str, tuple[float, tuple[float, ...]]] = field(default_factory=dict)
    """phase -> (peak bytes above the static base, per-category bytes at that peak)."""
    per_layer: list[float] = field(default_factory=list)
    grads_end: float = 0.0
    """Parameter gradients alive after backward, as the tapes produced them."""
    forward_end: tuple[float, ...] = ()
    """Per category, what is alive when the forward pass ends (what it keeps for backward)."""


def record_step(
    program: LayerProgram,
    shape: ModelShape,
    layout: Layout,
    make_ctx: Callable[[], Context],
    *,
    layer_ids: list[int],
    layer_key: Callable[[int], Hashable],
    attention: str,
    checkpointing: bool,
    input_grad: bool,
    loss: str,
    virtual: int,
    accumulate: bool,
    training: bool = True,
) -> StepProfile:
    """Record the tapes for one step of ``program`` (see the module docstring).

    ``layer_key(i)`` says which layers are alike: layers with equal keys (and
    equal input-needs-grad) share one recording.
    """
    tp = Tape(ACT, grad=training)
    ctx = make_ctx()
    out = program.embed(tp, ctx, shape, layout, input_grad or checkpointing, virtual)
    # A padding mask (ops.Context.padding_mask): the model builds it once, before its layers. It lives
    # until the model's forward returns, or, checkpointed, in each layer's checkpoint (its arguments)
    # until the last recomputed layer is done: the start of the embedding's backward.
    mask = ops.padding_mask(tp).nbytes if ctx.padding_mask and attention != "eager" else ZERO
    ctx.end_forward(tp)
    rg, dtype = out.rg, out.dtype
    embed_seg = _finish(tp, [out], accumulate, free_first=mask if checkpointing else ZERO)

    recorded: dict[tuple[Hashable, bool, str], tuple[Segment, bool, str]] = {}
    layers: list[Segment] = []
    for i in layer_ids:
        key = (layer_key(i), rg, dtype)
        if key not in recorded:
            recorded[key] = _record_layer(
                program.layer, shape, layout, make_ctx, i, rg, dtype, attention, checkpointing, accumulate, training
            )
        seg, rg, dtype = recorded[key]
        layers.append(seg)

    tp = Tape(LOGITS, grad=training)
    ctx = make_ctx()
    if not checkpointing:
        tp.forward.push(ACT, mask, -1.0)
    x = tp.input(per_token(shape.hidden), dtype, rg)
    loss_t = program.head(tp, ctx, shape, layout, x, loss)
    ctx.end_forward(tp)
    tp.drop(x)
    head_seg = _finish(tp, [loss_t], accumulate)
    return StepProfile(embed_seg, tuple(layers), head_seg)


def _record_layer(
    program: LayerFn,
    shape: ModelShape,
    layout: Layout,
    make_ctx: Callable[[], Context],
    layer: int,
    rg: bool,
    act: str,
    attention: str,
    checkpointing: bool,
    accumulate: bool,
    training: bool,
) -> tuple[Segment, bool, str]:
    """Record one layer whose input (the previous layer's output) has ``act`` dtype."""
    # Checkpointed: the forward packs saved tensors away instead of keeping them; only x stays.
    tp = Tape(ACT, saving=not checkpointing, grad=training)
    ctx = make_ctx()
    x = tp.input(per_token(shape.hidden), act, rg)
    y = program(tp, ctx, shape, layout, layer, x, attention)
    ctx.end_forward(tp)
    out_rg = y.rg
    if not checkpointing:
        tp.drop(x)
        return _finish(tp, [y], accumulate), out_rg, y.dtype
    forward = Events()
    forward.extend(tp.forward)
    kept = Events()
    if x.storage is not None:
        kept.push(x.storage.cat, x.storage.nbytes)
    # Tensors held outside autograd's saved tensors survive the checkpointed forward.
    held = [s for s in tp.saved_storages() if s is not x.storage]
    for s in held:
        kept.push(s.cat, s.nbytes)
    # Backward: replay the forward on a fresh tape, then its backward, then let x go.
    tp2 = Tape(ACT)
    ctx2 = make_ctx()
    x2 = tp2.input(per_token(shape.hidden), act, rg)
    y2 = program(tp2, ctx2, shape, layout, layer, x2, attention)
    ctx2.end_forward(tp2)
    tp2.drop(y2)  # the recomputed output is not needed
    backward = Events()
    backward.extend(tp2.forward)
    bw, _ = tp2.backward([y2], have=_accumulate_set(accumulate))
    backward.extend(bw)
    if x2.storage is not None:
        x2.storage.py -= 1  # the checkpoint lets its input go once the layer is done
    backward.extend(_free_if_dead(x2))
    for s in held:
        backward.push(s.cat, s.nbytes, -1.0)
    return Segment(forward.compile(), backward.compile(), kept.compile()), out_rg, y.dtype


def _free_if_dead(x: Tensor) -> Events:
    events = Events()
    s = x.storage
    if s is not None and s.alive and s.saved <= 0 and s.py <= 0:
        s.alive = False
        events.push(s.cat, s.nbytes, -1.0)
    return events


class _AllParams(set[int]):
    """A ``have`` set that contains every parameter: gradients already exist (accumulation)."""

    def __contains__(self, item: object) -> bool:
        return True


def _accumulate_set(accumulate: bool) -> set[int] | None:
    return _AllParams() if accumulate else None


def _finish(tp: Tape, outputs: list[Tensor], accumulate: bool, free_first: Lin = ZERO) -> Segment:
    """The segment of ``tp``; ``free_first``: activation bytes its backward frees before anything else."""
    saved = Events()
    for s in tp.saved_storages():
        saved.push(s.cat, s.nbytes)
    forward = tp.forward
    bw = Events()
    bw.push(ACT, free_first, -1.0)
    bw.extend(tp.backward(outputs, have=_accumulate_set(accumulate))[0])
    return Segment(forward.compile(), bw.compile(), saved.compile())


def with_padding_mask(profile: StepProfile, shape: ModelShape, compute: str, *, checkpointing: bool) -> StepProfile:
    """A profile traced without a padding mask (a derived one: plain steps) with the mask's bytes added.

    What :func:`record_step` records with ``Context.padding_mask``, placed at its segments' edges: the
    boolean mask from the end of the embedding until the head starts (checkpointed: until the
    embedding's backward starts); per layer the additive mask and, with grouped heads, the keys and
    values repeated to every head, kept from the layer's start to the end of its backward (checkpointed:
    a moment at the end of its forward, then through its recomputed backward).
    """
    mask = ops.padding_mask(Tape()).nbytes
    kept = ops.additive_mask(Tape(), compute).nbytes
    if shape.kv_heads and shape.kv_heads != shape.heads and not shape.sdpa_repeats_kv:
        repeated = 2 * (shape.heads - shape.kv_heads) * shape.head_dim * nbytes(compute)
        kept = add(kept, per_token(repeated))
    neg_mask, neg_kept = scale(mask, -1.0), scale(kept, -1.0)
    embed = profile.embed
    embed = Segment(
        _with_rows(embed.forward, [], [mask]),
        _with_rows(embed.backward, [neg_mask] if checkpointing else [], []),
        embed.saved,
    )
    head = profile.head
    if not checkpointing:
        head = Segment(_with_rows(head.forward, [neg_mask], []), head.backward, head.saved)
    done: dict[int, Segment] = {}
    layers: list[Segment] = []
    for seg in profile.layers:
        if id(seg) not in done:
            if checkpointing:
                forward = _with_rows(seg.forward, [], [kept, neg_kept])
                saved = seg.saved
            else:
                forward = _with_rows(seg.forward, [kept], [])
                saved = _with_rows(seg.saved, [kept], [])
            backward = _with_rows(seg.backward, [kept] if checkpointing else [], [neg_kept])
            done[id(seg)] = Segment(forward, backward, saved)
        layers.append(done[id(seg)])
    return StepProfile(embed, tuple(layers), head)


def _with_rows(events: CompiledEvents, first: list[Lin], last: list[Lin]) -> CompiledEvents:
    """``events`` with activation events (sizes over the tape's terms) before and after them."""

    def rows(sizes: list[Lin]) -> np.ndarray:
        out = np.zeros((len(sizes), len(CATEGORIES), len(TERMS)))
        for i, size in enumerate(sizes):
            out[i, ACT, :3] = size
        return out

    running = events.running
    coeffs = np.diff(running, axis=0, prepend=np.zeros((1, *running.shape[1:])))
    return CompiledEvents.of(np.concatenate([rows(first), coeffs, rows(last)]))


def walk(profile: StepProfile, batch: float, seq: float, *, backward: bool) -> Walk:
    """Compose the segments: peak above the static base in forward and backward, per category.

    Runs of identical layers are composed in one step: live memory changes by
    the same amount per layer, so the highest point of a run is at its first or
    its last layer.
    """
    result = Walk()
    terms = basis(batch, seq)
    segments = [profile.embed, *profile.layers, profile.head]
    runs: list[tuple[Segment, int]] = []
    for seg in segments:
        if runs and runs[-1][0] is seg:
            runs[-1] = (seg, runs[-1][1] + 1)
        else:
            runs.append((seg, 1))
    evaluated: dict[int, tuple[Footprint, Footprint, float]] = {}
    for seg, _ in runs:
        if id(seg) not in evaluated:
            evaluated[id(seg)] = (
                seg.forward.evaluate(terms),
                seg.backward.evaluate(terms),
                seg.saved.evaluate(terms).end_total,
            )
    live = [0.0] * N
    best = _compose([(evaluated[id(seg)][0], n) for seg, n in runs], live)
    result.phases["forward"] = best
    result.forward_end = tuple(live)
    for index, (seg, n) in enumerate(runs):
        if 0 < index < len(runs) - 1:
            result.per_layer.extend([evaluated[id(seg)][2]] * n)
    if backward:
        result.phases["backward"] = _compose([(evaluated[id(seg)][1], n) for seg, n in reversed(runs)], live)
        result.grads_end = live[CATEGORIES.index("gradients")]
    return result


def _compose(steps: list[tuple[Footprint, int]], live: list[float]) -> tuple[float, tuple[float, ...]]:
    """Walk footprints in order from ``live`` (updated in place); the highest point and its breakdown."""
    best_total = -1.0
    best: tuple[float, ...] = tuple(live)
    for fp, n in steps:
        end_total = fp.end_total
        # Within a run of n identical segments the peak is at the first or the last one.
        j = n - 1 if end_total > 0 else 0
        at = [live[c] + j * fp.end[c] + fp.peak[c] for c in range(N)]
        total = sum(at)
        if total > best_total:
            best_total, best = total, tuple(at)
        for c in range(N):
            live[c] += n * fp.end[c]
    return best_total, best
