"""A long run of batches of varying length, made from a few traced steps.

A training run whose batches vary in length hands the caching allocator a new set of sizes
every step: blocks cached for one length are a little too small for a longer batch and are
split for a shorter one, so what ``max_memory_reserved`` shows keeps growing for many steps
(ms-swift's Yi-6B LoRA at max_length 4096 reads 28.25 GiB reserved over about 15 GiB
allocated). Tracing hundreds of steps on fake tensors would take as long as running them, and
the trace of a few steps already says everything else: between two steps of a text batch only
the sizes change, and each size is a polynomial of degree at most two in the sequence length
(a hidden state is linear in it, an attention score matrix quadratic).

So :func:`long_run` cuts a traced log of steps at increasing lengths at its step marks
(:data:`STEP_MARK`, written by ``tracing/run.py``), checks that the last three steps run the same
program, fits every allocation's size through their three lengths, and appends :data:`RUN_STEPS`
steps at the lengths of :func:`run_lengths`, each allocation sized for its step's length and
each free pointing at the buffer its step (or the one before) allocated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from peftaudit.memory.allocator.replay import Event, marked_events, replay

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.tracing.tracker import EventLog

#: The mark ``tracing/run.py`` writes where each optimizer step begins (its token ids included).
STEP_MARK = "step"

#: Steps of random length in the long run. The reserve of a long run grows for hundreds of
#: steps and then levels off: a Yi-6B LoRA step at 4,096 tokens, replayed with three seeds,
#: reserves 24.5/31.2/19.8 GiB after 256 steps and 27.4/31.2/22.7 GiB after 512 and after 1,024
#: (the allocated peak is 15.3 GiB). A fine-tuning run has thousands of micro-batches.
RUN_STEPS = 512

#: The runs replayed, each with its own draw of lengths: the figure is their median, as the
#: reserve of one run depends on the order its lengths came in (above: 22.7 to 31.2 GiB).
SEEDS: tuple[int, ...] = (0, 1, 2)

#: The shortest step of the run, as a fraction of ``seq_len``.
SHORTEST = 0.125


@dataclass(frozen=True)
class _Op:
    """One allocation or free of a step's program."""

    alloc: bool
    index: int
    """An allocation's number within its step; for a free, the number of what it frees."""
    age: int = 0
    """For a free: 0 frees what this step allocated, 1 what the step before it did."""


def step_blocks(log: EventLog) -> list[list[Event]]:
    """The log's allocation events cut at its step marks: block 0 is what came before the first step."""
    blocks: list[list[Event]] = [[]]
    for item in marked_events(log):
        if isinstance(item, str):
            if item == STEP_MARK:
                blocks.append([])
        else:
            blocks[-1].append(item)
    return blocks


def run_lengths(seq_len: int, steps: int = RUN_STEPS, *, seed: int = 0) -> tuple[int, ...]:
    """``steps`` lengths drawn evenly from :data:`SHORTEST` of ``seq_len`` to all of it, in multiples
    of 8, one of them (at a drawn place) all of ``seq_len``: the longest batch the plan allows.

    A fixed seed: the same plan always replays the same run.
    """
    low = max(8, -(-int(seq_len * SHORTEST) // 8) * 8)
    draw = random.Random(seed)
    lengths = [min(seq_len, 8 * draw.randint(low // 8, max(low, seq_len) // 8)) for _ in range(steps)]
    lengths[draw.randrange(steps)] = seq_len
    return tuple(lengths)


def long_run(log: EventLog, traced: Sequence[int], run: Sequence[int]) -> list[Event] | None:
    """The trace's first step, then one step at each of the ``run`` lengths.

    ``traced``: the length of each traced step (one per step mark), at least four; the last
    three distinct. The first step is replayed as traced (it allocates the optimizer states);
    every later one is made from the program the traced steps after the first share, each
    allocation sized by the polynomial through the last three steps' sizes of it.

    ``None`` when the trace cannot be extended: too few or too alike steps, or steps that do not
    run the same program (a model whose work depends on the data).
    """
    template = _Template.of(log, traced)
    return None if template is None else template.run(run)


@dataclass(frozen=True)
class _Template:
    """What every step after the first allocates and frees, with each allocation's size as a
    function of the length: made once from a trace, run at any lengths."""

    head: tuple[Event, ...]
    """What came before the first step, and the first step, as traced."""
    program: tuple[_Op, ...]
    sizes: tuple[_Quadratic, ...]
    """Per op of the program (an allocation's size; a free's is its allocation's)."""
    first: tuple[Event, ...]
    """By the program's allocation number: the first step's buffer a second step frees there
    (``(0, 0)`` where it frees none)."""

    @classmethod
    def of(cls, log: EventLog, traced: Sequence[int]) -> _Template | None:
        blocks = step_blocks(log)
        if len(blocks) != len(traced) + 1 or len(traced) < 4:
            return None
        a, b, c = blocks[-3:]
        xs = (traced[-3], traced[-2], traced[-1])
        # The last step's block ends with the trace's final frees (its optimizer states, say): compared without them.
        c = c[: len(b)]
        program = _program(b, a)
        if len(set(xs)) != 3 or len(a) != len(b) or program is None or _program(c, b) != program:
            return None
        # The second step frees into the first, whose allocations are numbered differently (it also
        # allocates the optimizer states): where each of the program's frees of the step before lands there.
        second = _program(blocks[2], blocks[1])
        if second is None or len(second) != len(program):
            return None
        into_first: dict[int, int] = {}
        for mine, theirs in zip(program, second, strict=True):
            if (mine.alloc, mine.age) != (theirs.alloc, theirs.age) or (mine.age == 0 and mine != theirs):
                return None
            if mine.age == 1:
                into_first[mine.index] = theirs.index
        first = [(key, n) for key, n in blocks[1] if n > 0]
        allocations = sum(op.alloc for op in program)
        return cls(
            head=tuple(blocks[0] + blocks[1]),
            program=tuple(program),
            sizes=tuple(
                _Quadratic.through(xs, (abs(x[1]), abs(y[1]), abs(z[1]))) for x, y, z in zip(a, b, c, strict=True)
            ),
            first=tuple(first[into_first[i]] if i in into_first else (0, 0) for i in range(allocations)),
        )

    def run(self, lengths: Sequence[int]) -> list[Event]:
        """The head, then one step at each of ``lengths``."""
        events = list(self.head)
        before: Sequence[Event] = self.first
        next_key = 1 + max((k for k, _ in events), default=0)
        for length in lengths:
            keys: list[int] = []
            mine: list[int] = []  # by allocation number: its size at this length (0: not allocated)
            for op, size in zip(self.program, self.sizes, strict=True):
                if op.alloc:
                    n = max(0, round(size(length)))
                    keys.append(next_key)
                    mine.append(n)
                    if n:
                        events.append((next_key, n))
                    next_key += 1
                    continue
                key, n = (keys[op.index], mine[op.index]) if op.age == 0 else before[op.index]
                if n:
                    events.append((key, -n))
            before = list(zip(keys, mine, strict=True))
        return events


def _program(block: list[Event], previous: list[Event]) -> list[_Op] | None:
    """The block as allocation numbers and ages; ``None`` if it frees what neither it nor the
    step before it allocated (not a repeated step)."""
    owners = {key: (1, number) for number, (key, _n) in enumerate(e for e in previous if e[1] > 0)}
    ops: list[_Op] = []
    count = 0
    for key, size in block:
        if size > 0:
            owners[key] = (0, count)
            ops.append(_Op(True, count))
            count += 1
        else:
            found = owners.get(key)
            if found is None:
                return None
            ops.append(_Op(False, found[1], found[0]))
    return ops


@dataclass(frozen=True)
class _Quadratic:
    """The polynomial of degree at most two through three ``(length, bytes)`` points."""

    c0: float
    c1: float
    c2: float

    @classmethod
    def through(cls, xs: tuple[int, int, int], ys: tuple[int, int, int]) -> _Quadratic:
        """Exactly through the three points (Lagrange's form, in fractions, then floats)."""
        coef = [Fraction(0)] * 3
        for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
            others = [xj for j, xj in enumerate(xs) if j != i]
            scale = Fraction(yi, (xi - others[0]) * (xi - others[1]))
            # (x - p)(x - q) = x^2 - (p + q) x + p q
            coef[0] += scale * others[0] * others[1]
            coef[1] -= scale * (others[0] + others[1])
            coef[2] += scale
        return cls(float(coef[0]), float(coef[1]), float(coef[2]))

    def __call__(self, x: int) -> float:
        return self.c0 + x * (self.c1 + x * self.c2)


def reserved_over_run(
    log: EventLog, traced: Sequence[int], seq_len: int, *, accumulation: int = 1, expandable_segments: bool = False
) -> int | None:
    """``max_memory_reserved`` after a long run of batches of varying length, up to ``seq_len``:
    the median over :data:`SEEDS` of runs of :data:`RUN_STEPS` micro-batches made by :func:`long_run`.

    ``accumulation``: micro-batches per traced step (gradient accumulation); the run has
    ``RUN_STEPS // accumulation`` steps, so its cost stays that of :data:`RUN_STEPS` micro-batches.
    ``None`` when the trace cannot be extended (:func:`long_run`).
    """
    template = _Template.of(log, traced)
    if template is None:
        return None
    steps = max(1, RUN_STEPS // max(1, accumulation))
    peaks = sorted(
        replay(
            template.run(run_lengths(seq_len, steps, seed=seed)), expandable_segments=expandable_segments
        ).peak_reserved
        for seed in SEEDS
    )
    return peaks[len(peaks) // 2]
