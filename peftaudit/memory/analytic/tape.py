"""A symbolic tape: what a forward pass allocates, what autograd keeps, what backward frees.

Layer programs (:mod:`peftaudit.memory.analytic.programs`) run on a :class:`Tape` instead
of on tensors. Each operation says which tensors it creates and which of its
inputs autograd saves, with PyTorch's rules (``mm`` saves its input only when
the weight needs a gradient, ``mul`` saves each operand only for the other's
gradient, ...). The tape records every allocation and free as an event; the
backward pass is replayed in reverse creation order, which is the order the
autograd engine runs a single-device graph in (the ready node with the highest
sequence number runs first, and in reverse creation order every node is ready).

Sizes are linear forms over ``(tokens, tokens * seq_len, 1)`` so that one
recorded tape answers every batch size and sequence length: evaluating a tape
is a dot product and a cumulative sum (:meth:`Events.evaluate`), which is what
makes thousands of estimates per second possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from peftaudit.memory.dtypes import nbytes

#: Event categories; the estimate's activation-side components.
CATEGORIES: tuple[str, ...] = ("activations", "logits_and_loss", "weight_copies", "temporaries", "gradients")
ACT, LOGITS, COPIES, TEMP, GRAD = range(5)

Lin = tuple[float, float, float]
"""A size as coefficients of (tokens, tokens x seq_len, 1)."""

ZERO: Lin = (0.0, 0.0, 0.0)

#: Terms a compiled size may have: a tape's three (tokens, tokens x seq_len, 1), then the terms a
#: size derived from a trace can also have: per sequence (batch), and per position or position
#: pair shared by the batch (seq_len, seq_len squared: a (1, heads, seq, seq) position bias).
TERMS: tuple[str, ...] = ("tokens", "tokens_seq", "one", "batch", "seq", "seq_seq")


def basis(batch: float, seq: float) -> np.ndarray:
    """The values of :data:`TERMS` for a micro-batch of ``batch`` sequences of ``seq`` tokens."""
    return np.array([batch * seq, batch * seq * seq, 1.0, batch, seq, seq * seq])


def _caller() -> str:
    import sys

    frame = sys._getframe(2)
    names: list[str] = []
    while frame is not None and len(names) < 4:
        if not frame.f_code.co_filename.endswith("tape.py"):
            names.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back  # type: ignore[assignment]
    return " < ".join(names)


def per_token(n: float) -> Lin:
    return (float(n), 0.0, 0.0)


def per_token_seq(n: float) -> Lin:
    return (0.0, float(n), 0.0)


def const(n: float) -> Lin:
    return (0.0, 0.0, float(n))


def scale(a: Lin, k: float) -> Lin:
    return (a[0] * k, a[1] * k, a[2] * k)


def add(a: Lin, b: Lin) -> Lin:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


class Storage:
    """Memory behind one or more tensors (views share it)."""

    __slots__ = ("alive", "cat", "label", "nbytes", "py", "saved")

    def __init__(self, size: Lin, cat: int) -> None:
        self.nbytes = size
        self.cat = cat
        self.py = 0
        """Live Python references (tensor handles the program still holds)."""
        self.saved = 0
        """Autograd nodes that saved a tensor of this storage."""
        self.alive = True
        self.label = _caller() if DEBUG else ""


class Tensor:
    """A symbolic tensor: element count (a linear form), dtype, requires_grad, storage."""

    __slots__ = ("dtype", "is_param", "numel", "rg", "storage")

    def __init__(self, numel: Lin, dtype: str, rg: bool, storage: Storage | None, is_param: bool = False) -> None:
        self.numel = numel
        self.dtype = dtype
        self.rg = rg
        self.storage = storage
        self.is_param = is_param

    @property
    def nbytes(self) -> Lin:
        return scale(self.numel, nbytes(self.dtype))


@dataclass
class Node:
    """An autograd node: inputs that need gradients, tensors it saved, extra backward memory."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    saved: list[Tensor]
    param_grads: list[tuple[int, Lin]] = field(default_factory=list)
    """(parameter id, gradient bytes) for trainable parameters this node feeds."""
    temp: Lin = ZERO
    """Scratch the backward kernel allocates and frees (e.g. a dequantized weight)."""
    alias: bool = False
    """The input gradients are the output gradient itself (views, ``add``, ``clone``)."""


class GradBuffer:
    """One gradient tensor in flight; several inputs can share it (``add`` passes it on)."""

    __slots__ = ("refs", "size")

    def __init__(self, size: Lin) -> None:
        self.size = size
        self.refs = 0


#: Set to True to record where each event comes from (``Events.labels``), for debugging.
DEBUG = False


@dataclass
class Events:
    """Recorded allocations (+) and frees (-) per category."""

    rows: list[tuple[int, Lin]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def push(self, cat: int, size: Lin, sign: float = 1.0) -> None:
        if size != ZERO:
            self.rows.append((cat, scale(size, sign)))
            if DEBUG:
                self.labels.append(_caller())

    def extend(self, other: Events) -> None:
        self.rows.extend(other.rows)
        self.labels.extend(other.labels)

    def compile(self) -> CompiledEvents:
        n = len(self.rows)
        coeffs = np.zeros((max(n, 1), len(CATEGORIES), len(TERMS)))
        for i, (cat, size) in enumerate(self.rows):
            coeffs[i, cat, :3] = size
        return CompiledEvents.of(coeffs, tuple(self.labels))


@dataclass(frozen=True)
class Footprint:
    """Memory of one replayed stretch: at its peak and at its end, per category (bytes)."""

    peak: tuple[float, ...]
    end: tuple[float, ...]

    @property
    def peak_total(self) -> float:
        return sum(self.peak)

    @property
    def end_total(self) -> float:
        return sum(self.end)


@dataclass(frozen=True)
class CompiledEvents:
    """Events as arrays of running totals, ready to evaluate for any batch and sequence length.

    ``running[i, c]`` holds the linear form of category ``c``'s total after event
    ``i``; cumulative sums commute with evaluation, so they are taken once here.
    """

    running: np.ndarray
    """(events, categories, terms) running totals as linear forms over :data:`TERMS`."""
    totals: np.ndarray
    """(events, terms): running total over all categories."""
    labels: tuple[str, ...] = ()

    @classmethod
    def of(cls, coeffs: np.ndarray, labels: tuple[str, ...] = ()) -> CompiledEvents:
        running = np.cumsum(coeffs, axis=0)
        return cls(running, running.sum(axis=1), labels)

    def evaluate(self, terms: np.ndarray) -> Footprint:
        """Running totals relative to the start: the highest point and the end.

        ``terms``: the values of :data:`TERMS` (:func:`basis`).
        """
        totals = self.totals @ terms
        i = int(np.argmax(totals))
        peak = self.running[i] @ terms if totals[i] > 0 else np.zeros(len(CATEGORIES))
        end = self.running[-1] @ terms
        return Footprint(tuple(peak.tolist()), tuple(end.tolist()))


class Tape:
    """Records one stretch of the forward pass (a segment) and replays its backward."""

    def __init__(self, cat: int = ACT, *, saving: bool = True, grad: bool = True) -> None:
        self.cat = cat
        self.grad = grad
        """False under ``torch.no_grad()`` (inference): nothing is recorded or saved."""
        self.saving = saving
        """False inside a checkpointed forward: saved tensors are packed away, not kept."""
        self.forward = Events()
        self.nodes: list[Node] = []
        self.held: list[Tensor] = []

    # --- creating tensors ---------------------------------------------------------------------
    def input(self, numel: Lin, dtype: str, rg: bool) -> Tensor:
        """A tensor made before this segment (its bytes are counted where it was made)."""
        t = Tensor(numel, dtype, rg, Storage(scale(numel, nbytes(dtype)), ACT))
        t.storage.py += 1  # type: ignore[union-attr]
        return t

    def param(self, numel: float, dtype: str, trainable: bool) -> Tensor:
        """A parameter: static memory, counted by the estimator, not by the tape."""
        return Tensor(const(numel), dtype, trainable, None, is_param=True)

    def new(self, numel: Lin, dtype: str, rg: bool = False, cat: int | None = None) -> Tensor:
        storage = Storage(scale(numel, nbytes(dtype)), self.cat if cat is None else cat)
        storage.py = 1
        self.forward.push(storage.cat, storage.nbytes)
        return Tensor(numel, dtype, rg, storage)

    def view(self, t: Tensor, numel: Lin | None = None) -> Tensor:
        """A view sharing ``t``'s storage (reshape, transpose, slice, chunk)."""
        v = Tensor(t.numel if numel is None else numel, t.dtype, t.rg, t.storage, t.is_param)
        if v.storage is not None:
            v.storage.py += 1
        if t.rg and not t.is_param:
            self.record([v], [t], alias=numel is None)
        return v

    # --- autograd -----------------------------------------------------------------------------------
    def record(
        self,
        outputs: Sequence[Tensor],
        inputs: Sequence[Tensor],
        saved: Iterable[Tensor | None] = (),
        temp: Lin = ZERO,
        alias: bool = False,
        held: Iterable[Tensor] = (),
    ) -> None:
        """Record an autograd node when any input needs a gradient; mark outputs accordingly.

        ``held`` are tensors a custom ``autograd.Function`` keeps as plain ``ctx``
        attributes (bitsandbytes' 8-bit matmul keeps its input so): unlike saved
        tensors, gradient checkpointing cannot discard them.
        """
        needs = [t for t in inputs if t.rg] if self.grad else []
        if not needs:
            for o in outputs:
                o.rg = False
            return
        for o in outputs:
            o.rg = True
        kept = [t for t in saved if t is not None] if self.saving else []
        kept += list(held)
        for t in kept:
            if t.storage is not None:
                t.storage.saved += 1
        grads = [(id(t), t.nbytes) for t in needs if t.is_param]
        self.nodes.append(Node([t for t in needs if not t.is_param], list(outputs), kept, grads, temp, alias))

    def drop(self, *tensors: Tensor | None) -> None:
        """The program lets go of these tensors (a Python variable reassigned or out of scope)."""
        for t in tensors:
            if t is None or t.storage is None:
                continue
            t.storage.py -= 1
            self._maybe_free(t.storage, self.forward)

    def _maybe_free(self, s: Storage, events: Events) -> None:
        if s.alive and s.py <= 0 and s.saved <= 0:
            s.alive = False
            events.push(s.cat, s.nbytes, -1.0)

    def temporary(self, size: Lin, cat: int | None = None) -> None:
        """Scratch allocated and freed inside one operation's forward."""
        c = self.cat if cat is None else cat
        self.forward.push(c, size)
        self.forward.push(c, size, -1.0)

    # --- replay --------------------------------------------------------------------------------------
    def saved_storages(self) -> list[Storage]:
        seen: dict[int, Storage] = {}
        for node in self.nodes:
            for t in node.saved:
                if t.storage is not None and t.storage.alive:
                    seen[id(t.storage)] = t.storage
        return list(seen.values())

    def backward(self, grad_outputs: Sequence[Tensor], have: set[int] | None = None) -> tuple[Events, list[Tensor]]:
        """Replay the backward pass of this segment.

        ``grad_outputs`` are the segment outputs whose gradients arrive from the
        next segment (already counted there). Returns the events and the segment
        inputs left holding a gradient (handed to the previous segment). ``have``
        collects the parameters that already hold a gradient, across segments:
        a second contribution (tied weights, accumulation) costs a temporary.
        """
        events = Events()
        have = have if have is not None else set()
        grads: dict[int, GradBuffer] = {}
        for t in grad_outputs:
            buf = GradBuffer(t.nbytes)
            buf.refs = 1
            grads[id(t)] = buf
        owners: dict[int, Tensor] = {}

        def give(t: Tensor, buf: GradBuffer) -> None:
            key = id(t)
            old = grads.get(key)
            if old is None:
                buf.refs += 1
                grads[key] = buf
                owners[key] = t
                return
            # Accumulate: in place when the old buffer is not shared, else out of place.
            if old.refs > 1:
                events.push(TEMP, old.size)
                new = GradBuffer(old.size)
                new.refs = 1
                grads[key] = new
                take(old)
            if buf.refs == 0:
                events.push(TEMP, buf.size, -1.0)

        def take(buf: GradBuffer) -> None:
            buf.refs -= 1
            if buf.refs == 0:
                events.push(TEMP, buf.size, -1.0)

        for node in reversed(self.nodes):
            out_bufs = [grads.pop(id(o)) for o in node.outputs if id(o) in grads]
            if not out_bufs:
                # Nothing downstream used it (e.g. a value only used without gradients).
                self._release(node, events)
                continue
            if node.alias:
                for t in node.inputs:
                    give(t, out_bufs[0])
            else:
                for t in node.inputs:
                    buf = GradBuffer(t.nbytes)
                    events.push(TEMP, buf.size)
                    give(t, buf)
            for pid, size in node.param_grads:
                if pid in have:
                    events.push(TEMP, size)
                    events.push(TEMP, size, -1.0)
                else:
                    have.add(pid)
                    events.push(GRAD, size)
            if node.temp != ZERO:
                events.push(TEMP, node.temp)
                events.push(TEMP, node.temp, -1.0)
            self._release(node, events)
            for buf in out_bufs:
                take(buf)
        remaining = [owners[key] for key in grads if key in owners]
        return events, remaining

    def _release(self, node: Node, events: Events) -> None:
        for t in node.saved:
            if t.storage is None:
                continue
            t.storage.saved -= 1
            self._maybe_free(t.storage, events)
