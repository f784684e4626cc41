"""Fitting a step's sizes from traces at a few batch and sequence sizes, segment by segment.

A traced step (:class:`~peftaudit.memory.tracing.tracker.EventLog`) is the same
sequence of allocations and frees at every batch size and sequence length; only
the sizes change. Each size is a product of dimensions, so a monomial in batch
``b`` and sequence ``s``: from traces at ``(1, S)``, ``(2, S)`` and ``(1, 2S)``
the ratios give its exponents (``b s``: per token; ``b s^2``: per token pair;
``s^2``: a position bias shared by the batch...) and the first trace its
coefficient (:data:`POINTS` uses batches 2 and 4: the same ratios). Sizes
that are not monomials (none in the families we checked) are fitted linearly
in the sequence; the largest is kept with the profile (``Derived.inexact_bytes``).

The marks the trace leaves where layers start and end cut the step into the
segments :mod:`~peftaudit.memory.analytic.step` composes: the embedding (what
runs before the first layer), each layer, and the head (what runs after the
last layer: final norm, output head, loss); backward the same in reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from peftaudit.memory.analytic.step import Segment
from peftaudit.memory.analytic.tape import CATEGORIES, TERMS, CompiledEvents
from peftaudit.memory.tracing.tracker import EventLog

#: The traced points: (batch, multiple of the base sequence length). Batch 2, not 1: with one
#: sequence some reshapes are views that copy with more (shifting the labels for the loss).
POINTS: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (2, 2))

_TERM_OF = {(1, 1): "tokens", (1, 2): "tokens_seq", (0, 0): "one", (1, 0): "batch", (0, 1): "seq", (0, 2): "seq_seq"}
_STATIC = {"base_weights", "trainable_weights", "quantization_constants", "optimizer_states"}


class DerivationError(Exception):
    """The layer profile cannot be derived from a trace (the message says why, in one line)."""


Row = tuple[int, float]
"""One event of a single trace: category index and signed bytes."""


@dataclass
class Cut:
    """One trace cut into segments: rows per segment, forward and backward."""

    embed: tuple[list[Row], list[Row]] = field(default_factory=lambda: ([], []))
    layers: dict[str, tuple[list[Row], list[Row]]] = field(default_factory=dict)
    head: tuple[list[Row], list[Row]] = field(default_factory=lambda: ([], []))
    order: list[str] = field(default_factory=list)
    """Layer labels in the order their forward ran."""


@dataclass(frozen=True)
class Fitted:
    """Segments fitted over :data:`POINTS`, and what could not be fitted exactly."""

    embed: Segment
    layers: dict[str, Segment]
    head: Segment
    order: tuple[str, ...]
    inexact_bytes: float = 0.0
    """The largest size (at the first point) that was not a monomial in batch and sequence."""


def cut(log: EventLog, first_layers: set[str]) -> Cut:
    """Cut one trace's events into segments (see the module docstring).

    Forward, a layer's segment runs from its start mark through its end mark and the frees
    right after it (its input, let go when the layer returns); what runs between that and the
    next layer's start (a second stack's embedding) is put at the start of the next layer, and
    what runs after the last layer (final norm, output head, loss) is the head. Backward, a
    layer's segment starts when the gradient of its output is ready (``G:``); the first layer
    of a stack also covers what ran before it, up to the gradient of its input (``I:``).
    ``first_layers``: labels of the first layer of each stack.
    """
    rows = _events(log)
    out = Cut()
    marks = [key for key, _ in rows]
    backward = marks.index("backward") if "backward" in marks else None
    end = marks.index("end") if "end" in marks else len(rows)
    fwd = rows[: backward if backward is not None else end]
    bwd = rows[backward + 1 : end] if backward is not None else []

    target: list[Row] = out.embed[0]
    gap: list[Row] = []
    current: str | None = None
    state = "embed"  # embed -> layer -> trailing -> gap -> layer ...
    for key, size in fwd:
        if isinstance(key, str):
            kind, _, label = key.partition(":")
            if kind == "L":
                if label in out.layers:
                    raise DerivationError(f"layer {label} ran twice in one forward pass")
                out.layers[label] = (list(gap), [])
                out.order.append(label)
                gap, current, state = [], label, "layer"
                target = out.layers[label][0]
            elif kind == "E" and label == current:
                state = "trailing"
            continue
        row = (int(key), float(size))
        if state == "trailing" and size > 0:
            state = "gap"
        if state == "gap":
            gap.append(row)
        else:
            target.append(row)
    out.head[0].extend(gap)

    target = out.head[1]
    for key, size in bwd:
        if isinstance(key, str):
            kind, _, label = key.partition(":")
            if kind == "G" and label in out.layers:
                target = out.layers[label][1]
            elif kind == "I" and label in first_layers and label in out.layers:
                # The first stack's input gradient ends at the embedding; a later stack's
                # first layer also ran what fed it (the gap before it).
                target = out.embed[1] if out.order.index(label) == 0 else out.layers[label][1]
            continue
        target.append((int(key), float(size)))
    return out


def _events(log: EventLog) -> list[tuple[int | str, int]]:
    """The step's rows with categories (marks kept): static storages and outside allocations dropped.

    An out-of-place gradient accumulation (fake tensors) becomes the in-place one a real
    tensor does: the new buffer's allocation and the first free of the buffers it sums go.
    """
    start = next((i for i, r in enumerate(log.rows) if r == ("forward", 0)), None)
    if start is None:
        raise DerivationError("the trace recorded no forward pass")
    rows = log.rows[start:]
    skip_alloc = {new for new, _a, _b in log.in_place}
    waiting = {new: (a, b) for new, a, b in log.in_place}
    allocated: set[int] = set()
    out: list[tuple[int | str, int]] = []
    for key, size in rows:
        if isinstance(key, str):
            out.append((key, 0))
            continue
        if size > 0:
            allocated.add(key)
            if key in skip_alloc:
                continue
        else:
            if key not in allocated:
                continue  # made before the step (token ids): not part of it
            hit = next((n for n, pair in waiting.items() if key in pair and n in allocated), None)
            if hit is not None:
                del waiting[hit]
                continue
        category = log.categories.get(key, "activations")
        if category in _STATIC:
            continue
        out.append((CATEGORIES.index(category), size))
    return out


def fit(cuts: Sequence[Cut], seq: int, offset: int = 0) -> Fitted:
    """Fit every segment's sizes over :data:`POINTS` (traces at base sequence length ``seq``).

    ``offset``: keys every attention layer holds beyond the sequence (prefix tuning's virtual
    tokens), so sizes may also grow with ``seq + offset`` (:func:`_monomial`).
    """
    base = cuts[0]
    for other in cuts[1:]:
        if other.order != base.order:
            raise DerivationError("the layers ran in a different order at another batch or sequence size")
    worst = [0.0]

    def segment(parts: Sequence[tuple[list[Row], list[Row]]]) -> Segment:
        forward = _fit_rows([p[0] for p in parts], seq, worst, offset)
        backward = _fit_rows([p[1] for p in parts], seq, worst, offset)
        # What the layer keeps: its forward's net bytes, one event per category.
        saved = np.zeros((len(CATEGORIES), len(CATEGORIES), len(TERMS)))
        net = forward.sum(axis=0)
        for c in range(len(CATEGORIES)):
            saved[c, c] = net[c]
        return Segment(CompiledEvents.of(forward), CompiledEvents.of(backward), CompiledEvents.of(saved))

    layers = {label: segment([c.layers[label] for c in cuts]) for label in base.order}
    return Fitted(
        embed=segment([c.embed for c in cuts]),
        layers=layers,
        head=segment([c.head for c in cuts]),
        order=tuple(base.order),
        inexact_bytes=worst[0],
    )


def _fit_rows(traces: Sequence[list[Row]], seq: int, worst: list[float], offset: int = 0) -> np.ndarray:
    """(events, categories, terms) coefficients for one segment's rows at every point."""
    lengths = {len(t) for t in traces}
    if len(lengths) != 1:
        raise DerivationError("the step allocates differently at another batch or sequence size")
    n = lengths.pop()
    coeffs = np.zeros((max(n, 1), len(CATEGORIES), len(TERMS)))
    for i in range(n):
        cats = {t[i][0] for t in traces}
        signs = {math.copysign(1.0, t[i][1]) for t in traces}
        if len(cats) != 1 or len(signs) != 1:
            raise DerivationError("the step allocates differently at another batch or sequence size")
        sizes = [abs(t[i][1]) for t in traces]
        if len(sizes) == 2:  # traced in batch only: a vision model's images fix its sequence
            sizes.append(sizes[0])
        coeffs[i, cats.pop()] = signs.pop() * _monomial(sizes, seq, worst, offset)
    return coeffs


def _monomial(sizes: Sequence[float], seq: int, worst: list[float], offset: int = 0) -> np.ndarray:
    """The size as coefficients over :data:`~peftaudit.memory.analytic.tape.TERMS`."""
    n0, n_batch, n_seq = sizes
    out = np.zeros(len(TERMS))
    i = math.log2(n_batch / n0)
    j = math.log2(n_seq / n0)
    ri, rj = round(i), round(j)
    if abs(i - ri) < 1e-9 and abs(j - rj) < 1e-9 and (ri, rj) in _TERM_OF:
        out[TERMS.index(_TERM_OF[(ri, rj)])] = n0 / (POINTS[0][0] ** ri * seq**rj)
        return out
    if offset and abs(i - ri) < 1e-9:
        shifted = _shifted(n0, n_seq, ri, seq, offset)
        if shifted is not None:
            return shifted
    # Not a monomial: linear in the sequence (per sequence or shared by the batch), and say so.
    worst[0] = max(worst[0], n0)
    per_seq = ri >= 1
    batch = POINTS[0][0] if per_seq else 1
    slope = (n_seq - n0) / seq / batch
    out[TERMS.index("tokens" if per_seq else "seq")] = slope
    out[TERMS.index("batch" if per_seq else "one")] = n0 / batch - slope * seq
    return out


def _shifted(n0: float, n_seq: float, ri: int, seq: int, offset: int) -> np.ndarray | None:
    """``b^ri s^j (s + offset)^k`` (k = 1, 2) as coefficients over the terms, when the sizes are that.

    Prefix tuning's keys and values are ``seq + offset`` long: K/V per layer ``b (s + v)``, the
    attention mask and eager scores ``b s (s + v)``. Expanded, each is a sum of the usual terms.
    """
    for j, k in ((0, 1), (1, 1), (0, 2)):
        ratio = 2**j * ((2 * seq + offset) / (seq + offset)) ** k
        if abs(n_seq / n0 - ratio) > 1e-9 * ratio:
            continue
        c = n0 / (POINTS[0][0] ** ri * seq**j * (seq + offset) ** k)
        out = np.zeros(len(TERMS))
        for m in range(k + 1):  # s^j (s + v)^k = sum over m of C(k, m) v^(k-m) s^(j+m)
            term = _TERM_OF.get((ri, j + m))
            if term is None:
                return None
            out[TERMS.index(term)] += c * math.comb(k, m) * offset ** (k - m)
        return out
    return None
