"""Replaying a traced step's allocations through the allocator model.

A traced step (:class:`~peftaudit.memory.tracing.tracker.EventLog`) lists every storage
allocated and freed, in order. :func:`allocation_events` turns it into what the GPU would
see; :func:`replay` runs that through :class:`~peftaudit.memory.allocator.caching.CachingAllocator`
and reports ``max_memory_allocated``/``max_memory_reserved``; :func:`smallest_capacity`
finds the least device memory the step runs in, free-and-retry included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from peftaudit.memory.allocator.caching import Block, CachingAllocator
from peftaudit.memory.allocator.config import ROUND_LARGE, AllocatorConfig

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.tracing.tracker import EventLog

Event = tuple[int, int]
"""``(buffer, +bytes)`` allocates a buffer, ``(buffer, -bytes)`` frees it."""


@dataclass(frozen=True)
class Replay:
    """What the allocator did over a replayed sequence (``torch.cuda.memory_stats`` terms)."""

    peak_requested: int
    """Most bytes the program held at once, as asked for: the trace's own peak."""
    peak_allocated: int
    """``max_memory_allocated``: the blocks handed out (requests rounded to 512 bytes,
    plus remainders too small to split off)."""
    peak_reserved: int
    """``max_memory_reserved``: what the allocator held from the device (segments or mapped pages)."""
    final_reserved: int
    peak_segments: int
    device_allocs: int
    """``cudaMalloc`` calls (page mappings with expandable segments)."""
    device_frees: int
    alloc_retries: int
    """How often the allocator freed its cached blocks and retried (``num_alloc_retries``)."""
    oom: bool
    """The replay ran out of memory (torch raises ``OutOfMemoryError``) and stopped there."""
    oom_event: int | None
    """Index in the events of the allocation that failed."""
    oom_bytes: int
    events: int
    """Events replayed (up to the failure)."""
    capacity: int | None
    expandable_segments: bool

    @property
    def fragmentation(self) -> float:
        """Peak reserved over peak allocated, less one (0.1: reserved peaks 10 % above allocated)."""
        return self.peak_reserved / self.peak_allocated - 1.0 if self.peak_allocated else 0.0


@dataclass(frozen=True)
class Capacity:
    """The smallest device memory (a multiple of 2 MiB) the step runs in, and the replays that found it."""

    bytes: int
    plentiful: Replay
    """The replay with memory to spare: its ``peak_reserved`` is what a large GPU shows."""
    tight: Replay
    """The replay at ``bytes``: it completes, after freeing its cache ``alloc_retries`` times."""
    replays: int


def allocation_events(log: EventLog, *, in_place: bool = True) -> list[Event]:
    """The storage allocations and frees of a traced step, as the GPU's allocator would get them.

    Marks and empty storages go (torch never calls the allocator for 0 bytes). With
    ``in_place`` (the default), a gradient that fake tensors accumulate out of place
    (``log.in_place``: ``new = a + b``) is added into ``a``'s buffer as real tensors do:
    ``new`` allocates nothing and shares ``a``'s buffer, freed when both are gone.
    """
    return [e for e in marked_events(log, in_place=in_place) if not isinstance(e, str)]


def marked_events(log: EventLog, *, in_place: bool = True) -> Iterator[Event | str]:
    """:func:`allocation_events` with the log's marks (strings) where they fell."""
    accumulated = {new: a for new, a, _b in log.in_place} if in_place else {}
    owner: dict[int, int] = {}  # storage serial -> the buffer it lives in
    holders: dict[int, int] = {}  # buffer -> storages living in it
    sizes: dict[int, int] = {}
    for key, size in log.rows:
        if isinstance(key, str):
            yield key
            continue
        if size == 0:
            continue
        if size > 0:
            target = accumulated.get(key)
            buffer = owner.get(target) if target is not None else None
            if buffer is not None:
                owner[key] = buffer
                holders[buffer] += 1
                continue
            owner[key] = key
            holders[key] = 1
            sizes[key] = size
            yield (key, size)
            continue
        buffer = owner.pop(key, None)
        if buffer is None:
            continue  # allocated before the log began
        holders[buffer] -= 1
        if holders[buffer] == 0:
            del holders[buffer]
            yield (buffer, -sizes.pop(buffer))


def replay(
    events: EventLog | Sequence[Event],
    *,
    expandable_segments: bool = False,
    capacity: int | None = None,
    config: AllocatorConfig | None = None,
) -> Replay:
    """Run ``events`` (an event log, or :func:`allocation_events`' pairs) through the allocator.

    ``capacity``: bytes the allocator may hold from the device (``None``: plenty); the replay
    stops at the first allocation that fails after freeing the cache and retrying.
    ``config``: allocator settings (torch's defaults if ``None``); ``expandable_segments=True``
    turns that one on.
    """
    pairs = allocation_events(events) if not isinstance(events, Sequence) else events
    settings = config or AllocatorConfig()
    if expandable_segments:
        settings = replace(settings, expandable_segments=True)
    allocator = CachingAllocator(settings, capacity)
    live: dict[int, Block] = {}
    oom_event: int | None = None
    oom_bytes = 0
    done = 0
    malloc, free = allocator.malloc, allocator.free
    for done, (key, size) in enumerate(pairs, start=1):
        if size > 0:
            if key in live:
                raise ValueError(f"buffer {key} allocated twice without a free")
            block = malloc(size)
            if block is None:
                oom_event, oom_bytes = done - 1, size
                break
            live[key] = block
        elif size < 0:
            held = live.pop(key, None)
            if held is not None:
                free(held)
    stats = allocator.stats
    return Replay(
        peak_requested=stats.peak_requested,
        peak_allocated=stats.peak_allocated,
        peak_reserved=stats.peak_reserved,
        final_reserved=stats.reserved,
        peak_segments=stats.peak_segments,
        device_allocs=stats.device_allocs,
        device_frees=stats.device_frees,
        alloc_retries=stats.alloc_retries,
        oom=oom_event is not None,
        oom_event=oom_event,
        oom_bytes=oom_bytes,
        events=done,
        capacity=capacity,
        expandable_segments=settings.expandable_segments,
    )


def smallest_capacity(
    events: EventLog | Sequence[Event],
    *,
    expandable_segments: bool = False,
    config: AllocatorConfig | None = None,
    unit: int = ROUND_LARGE,
) -> Capacity:
    """The least memory (a multiple of ``unit``, 2 MiB) at which the whole sequence runs.

    Bisection between the peak requested bytes (below it nothing runs) and the plentiful
    replay's peak reserved (with that much, no ``cudaMalloc`` ever fails, so it runs as with
    plenty). The allocator is not strictly monotone in capacity (a tighter limit frees the
    cache earlier and lays blocks out differently), so this is the boundary bisection finds:
    the step runs at the answer and not ``unit`` bytes below it.
    """
    pairs = allocation_events(events) if not isinstance(events, Sequence) else events
    plentiful = replay(pairs, expandable_segments=expandable_segments, config=config)
    if plentiful.peak_reserved == 0:
        return Capacity(0, plentiful, plentiful, 1)
    high = -(-plentiful.peak_reserved // unit)  # runs
    low = -(-plentiful.peak_requested // unit) - 1  # low * unit < peak requested: cannot run
    # Reserved never passes the plentiful peak, so with that much the replay is the plentiful one.
    tight = replace(plentiful, capacity=high * unit)
    replays = 1
    while high - low > 1:
        middle = (high + low) // 2
        attempt = replay(pairs, expandable_segments=expandable_segments, capacity=middle * unit, config=config)
        replays += 1
        if attempt.oom:
            low = middle
        else:
            high, tight = middle, attempt
    return Capacity(high * unit, plentiful, tight, replays)
