"""The caching-allocator model against the behaviour of PyTorch's own allocator.

Every test names the function of ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.13 line;
see :mod:`peftaudit.memory.allocator`) whose rule it checks, and the numbers it expects
follow from that rule by hand, not from the model.
"""

from __future__ import annotations

import random
import warnings

import pytest
from memory_models import build

from peftaudit.memory.allocator import (
    AllocatorConfig,
    CachingAllocator,
    allocation_events,
    allocation_size,
    replay,
    round_size,
    smallest_capacity,
)
from peftaudit.memory.allocator.caching import Block
from peftaudit.memory.tracing.tracker import EventLog

KIB = 1 << 10
MIB = 1 << 20


def allocate_then_free(*sizes: int) -> list[tuple[int, int]]:
    """Allocate every size in turn, then free them all in the same order."""
    return [(i, s) for i, s in enumerate(sizes)] + [(i, -s) for i, s in enumerate(sizes)]


# -- sizes: round_size, get_allocation_size --------------------------------------------------


def test_requests_are_rounded_to_512_bytes() -> None:
    """``round_size``: below ``kMinBlockSize`` (512) a request takes 512 bytes, else the next multiple of 512."""
    assert [round_size(n) for n in (1, 511, 512, 513, 1536, 1537)] == [512, 512, 512, 1024, 1536, 2048]
    allocator = CachingAllocator()
    block = allocator.malloc(1)
    assert block is not None and block.size == 512
    assert (allocator.stats.allocated, allocator.stats.requested) == (512, 1)


def test_power2_divisions_round_to_steps_between_powers_of_two() -> None:
    """``roundup_power2_next_division``: with 4 divisions, 5 MiB + 1 byte lies between 4 and 8 MiB
    (steps of 1 MiB) and goes up to 6 MiB; a power of two stays; off by default."""
    assert round_size(5 * MIB + 1, 4) == 6 * MIB
    assert round_size(4 * MIB, 4) == 4 * MIB
    assert round_size(5 * MIB + 1) == 5 * MIB + 512


def test_segment_sizes() -> None:
    """``get_allocation_size``: 2 MiB for the small pool (<= 1 MiB), ``kLargeBuffer`` (20 MiB)
    below ``kMinLargeAlloc`` (10 MiB), else the request rounded up to ``kRoundLarge`` (2 MiB)."""
    assert allocation_size(512) == allocation_size(MIB) == 2 * MIB
    assert allocation_size(MIB + 512) == allocation_size(10 * MIB - 512) == 20 * MIB
    assert allocation_size(10 * MIB) == 10 * MIB
    assert allocation_size(11 * MIB + 512) == 12 * MIB


def test_small_requests_are_packed_into_2_mib_segments() -> None:
    """``get_pool`` + ``get_allocation_size``: four 500 KiB requests (2,048,000 bytes) share one
    2 MiB segment; the fifth needs a second one."""
    assert replay(allocate_then_free(*[500 * KIB] * 4)).peak_reserved == 2 * MIB
    assert replay(allocate_then_free(*[500 * KIB] * 5)).peak_reserved == 4 * MIB


def test_requests_of_1_to_10_mib_are_packed_into_20_mib_segments() -> None:
    """``get_allocation_size``: a 2 MiB request gets a 20 MiB segment, which ``alloc_found_block``
    splits: ten of them fit, the eleventh takes a second segment."""
    ten = replay(allocate_then_free(*[2 * MIB] * 10))
    assert (ten.peak_reserved, ten.peak_segments) == (20 * MIB, 1)
    assert replay(allocate_then_free(*[2 * MIB] * 11)).peak_reserved == 40 * MIB
    # From 10 MiB a request gets a segment of its own size, rounded to 2 MiB.
    assert replay(allocate_then_free(10 * MIB, 11 * MIB + 1)).peak_reserved == 22 * MIB


# -- splitting: should_split -----------------------------------------------------------------


def test_a_large_block_is_split_only_when_more_than_1_mib_is_left() -> None:
    """``should_split`` (large pool): split when the remainder is more than ``kSmallSize`` (1 MiB).

    A 9 MiB request splits its 20 MiB segment (11 MiB left). A 9.5 MiB request then takes the
    11 MiB block and splits it (1.5 MiB left); a 10.5 MiB one takes it whole (0.5 MiB left),
    and ``allocated_bytes`` counts the whole 11 MiB block.
    """
    split = replay(allocate_then_free(9 * MIB, 9 * MIB + MIB // 2))
    assert (split.peak_reserved, split.peak_allocated) == (20 * MIB, 18 * MIB + MIB // 2)
    whole = replay(allocate_then_free(9 * MIB, 10 * MIB + MIB // 2))
    assert (whole.peak_reserved, whole.peak_allocated, whole.peak_requested) == (
        20 * MIB,
        20 * MIB,
        19 * MIB + MIB // 2,
    )


def test_a_small_block_is_split_down_to_512_bytes() -> None:
    """``should_split`` (small pool): split when ``remaining >= kMinBlockSize``.

    1 MiB and then 1 MiB - 512 bytes leave exactly 512 bytes of the 2 MiB segment, split off
    as a block of its own: a 512-byte request fits there; the next one needs a new segment.
    """
    sizes = (MIB, MIB - 512, 512)
    assert replay(allocate_then_free(*sizes)).peak_reserved == 2 * MIB
    assert replay(allocate_then_free(*sizes, 512)).peak_reserved == 4 * MIB


# -- reuse: get_free_block, free_block -------------------------------------------------------


def test_best_fit_takes_the_smallest_cached_block_that_fits() -> None:
    """``get_free_block``: ``lower_bound`` on (size) finds the smallest free block of at least the
    request. With 30 and 24 MiB cached, 22 MiB goes into the 24 (split, 2 MiB left), leaving the
    30 for a 29 MiB request: no new segment. Worst fit would have needed one."""
    events = [(0, 30 * MIB), (1, 24 * MIB), (0, -30 * MIB), (1, -24 * MIB), (2, 22 * MIB), (3, 29 * MIB)]
    result = replay(events)
    assert (result.peak_reserved, result.device_allocs) == (54 * MIB, 2)


def test_freed_neighbours_merge_for_a_larger_request() -> None:
    """``free_block`` -> ``try_merge_blocks``: two freed 2 MiB neighbours in a full 20 MiB segment
    merge into one 4 MiB block, which a 4 MiB request reuses: no second segment."""
    events = [(i, 2 * MIB) for i in range(10)] + [(3, -2 * MIB), (4, -2 * MIB), (10, 4 * MIB)]
    result = replay(events)
    assert (result.peak_reserved, result.peak_segments) == (20 * MIB, 1)


def test_alternating_frees_fragment_reserved_memory_above_allocated() -> None:
    """No block is moved, and a cached block only serves requests that fit in it.

    Eight 24 MiB buffers (a segment each) alternate with eight 4 MiB ones (carved five to a
    20 MiB segment); the 24 MiB ones are freed and eight 26 MiB ones follow (the step at a
    slightly longer length): no cached block is that large, so eight new segments are made.
    Reserved: 8 x 24 + 2 x 20 + 8 x 26 = 440 MiB while at most 8 x 4 + 8 x 26 = 240 MiB is
    allocated at once.
    """
    events = []
    for i in range(8):
        events += [(2 * i, 24 * MIB), (2 * i + 1, 4 * MIB)]
    events += [(2 * i, -24 * MIB) for i in range(8)]
    events += [(100 + i, 26 * MIB) for i in range(8)]
    result = replay(events)
    assert (result.peak_reserved, result.peak_allocated) == (440 * MIB, 240 * MIB)
    assert result.fragmentation > 0.8
    # Under a limit the retry frees the cached 24 MiB segments: 40 + 208 MiB is enough.
    assert smallest_capacity(events).bytes == 248 * MIB


# -- out of memory: the retry sequence of malloc --------------------------------------------


def test_freeing_the_cache_and_retrying_lets_a_step_fit() -> None:
    """``malloc``: when ``alloc_block`` (cudaMalloc) fails, ``release_cached_blocks`` frees every
    cached whole segment and ``alloc_block`` is tried again before raising out-of-memory.

    A cached 30 MiB segment and a 40 MiB request in 60 MiB: 30 + 40 does not fit, freeing the
    30 does. Without the retry (a naive allocator) it runs out of memory.
    """
    events = [(0, 30 * MIB), (0, -30 * MIB), (1, 40 * MIB), (1, -40 * MIB)]
    fits = replay(events, capacity=60 * MIB)
    assert not fits.oom
    assert (fits.alloc_retries, fits.device_frees, fits.peak_reserved) == (1, 1, 40 * MIB)
    naive = replay(events, capacity=60 * MIB, config=AllocatorConfig(release_on_oom=False))
    assert (naive.oom, naive.oom_event, naive.oom_bytes) == (True, 2, 40 * MIB)
    assert replay(events).peak_reserved == 70 * MIB
    assert smallest_capacity(events).bytes == 40 * MIB


def test_a_segment_with_a_live_block_is_not_released() -> None:
    """``release_blocks``: only a free block with no neighbours (``!prev && !next``: a whole
    segment) goes back to CUDA. A 20 MiB segment holding a live 2 MiB buffer stays, so a 30 MiB
    request does not fit in 40 MiB even after the retry."""
    events = [(0, 2 * MIB), (1, 30 * MIB)]
    result = replay(events, capacity=40 * MIB)
    assert (result.oom, result.alloc_retries, result.oom_event) == (True, 1, 1)
    assert replay(events, capacity=50 * MIB).peak_reserved == 50 * MIB


def test_oversize_blocks_with_max_split_size() -> None:
    """``get_free_block`` with ``max_split_size_mb:40``: a cached block of 40 MiB or more serves
    no request below 40 MiB, and an oversize request only a block less than
    ``max_non_split_rounding`` (20 MiB) larger, unsplit (``should_split``: the request is not
    below ``max_split_size``)."""
    config = AllocatorConfig(max_split_size=40 * MIB)
    cached = [(0, 60 * MIB), (0, -60 * MIB)]
    small = replay([*cached, (1, 30 * MIB)], config=config)
    assert (small.peak_reserved, small.device_allocs) == (90 * MIB, 2)
    near = replay([*cached, (1, 50 * MIB)], config=config)
    assert (near.peak_reserved, near.peak_allocated) == (60 * MIB, 60 * MIB)
    far = replay([*cached, (1, 40 * MIB)], config=config)  # 60 >= 40 + 20: not reused
    assert far.peak_reserved == 100 * MIB
    assert replay([*cached, (1, 30 * MIB)]).peak_reserved == 60 * MIB  # unlimited: reused and split


def test_release_available_cached_blocks_frees_just_enough_oversize_blocks() -> None:
    """``release_available_cached_blocks`` (only with ``max_split_size``): before freeing the whole
    cache, free the smallest oversize block of at least max(request, ``max_split_size``).

    Cached 60 and 50 MiB blocks, a 30 MiB request in 120 MiB: the 50 goes, the 60 stays, and
    no full retry is needed. With torch's defaults the full release frees both.
    """
    events = [(0, 60 * MIB), (1, 50 * MIB), (0, -60 * MIB), (1, -50 * MIB), (2, 30 * MIB)]
    config = AllocatorConfig(max_split_size=40 * MIB)
    partial = replay(events, capacity=120 * MIB, config=config)
    assert (partial.oom, partial.alloc_retries, partial.final_reserved) == (False, 0, 90 * MIB)
    full = replay(events, capacity=120 * MIB)
    assert (full.oom, full.alloc_retries, full.final_reserved) == (False, 0, 110 * MIB)  # reuses the 50
    full = replay([*events[:4], (2, 70 * MIB)], capacity=120 * MIB)
    assert (full.alloc_retries, full.final_reserved) == (1, 70 * MIB)


# -- expandable segments ---------------------------------------------------------------------


def test_expandable_segments_map_pages_of_2_and_20_mib() -> None:
    """Note [Expandable Segments] / ``find_expandable_block``: one segment per pool, grown by
    mapping 2 MiB pages (small pool) or ``large_segment_size`` pages (20 MiB, large pool)."""
    assert replay([(0, KIB)], expandable_segments=True).peak_reserved == 2 * MIB
    assert replay([(0, 3 * MIB)], expandable_segments=True).peak_reserved == 20 * MIB
    grown = replay([(0, 30 * MIB), (1, 30 * MIB)], expandable_segments=True)
    assert (grown.peak_reserved, grown.peak_segments) == (60 * MIB, 1)


def test_expandable_segments_stop_fragmentation_across_lengths() -> None:
    """``try_allocate_expandable_block``: the freed block at the end of the segment merges with
    the newly mapped pages, so a buffer that grows step by step (11, 12, ... 19 MiB: batches of
    varying length) stays in one 20 MiB page; with fixed segments each new size is a segment.
    Also two freed 20 MiB neighbours merge for a 40 MiB request (``free_block``)."""
    growing = []
    for i, size in enumerate(range(11, 20)):
        growing += [(i, size * MIB), (i, -size * MIB)]
    assert replay(growing, expandable_segments=True).peak_reserved == 20 * MIB
    assert replay(growing).peak_reserved == (12 + 14 + 16 + 18 + 20) * MIB
    pair = [(0, 20 * MIB), (1, 20 * MIB), (0, -20 * MIB), (1, -20 * MIB), (2, 40 * MIB)]
    assert replay(pair, expandable_segments=True).peak_reserved == 40 * MIB
    assert replay(pair).peak_reserved == 80 * MIB


def test_expandable_segments_unmap_free_pages_before_raising() -> None:
    """``release_blocks`` -> ``unmap_block``: with expandable segments the retry unmaps every free
    page. 40 MiB freed at the start of the segment before a live 20 MiB: a 60 MiB request in
    80 MiB fits only once those two pages are unmapped (it is mapped after the live block)."""
    events = [(0, 40 * MIB), (1, 20 * MIB), (0, -40 * MIB), (2, 60 * MIB)]
    result = replay(events, expandable_segments=True, capacity=80 * MIB)
    assert not result.oom
    assert (result.alloc_retries, result.device_frees, result.final_reserved) == (1, 1, 80 * MIB)
    assert replay(events, expandable_segments=True).peak_reserved == 120 * MIB


# -- the model's own bookkeeping -------------------------------------------------------------


def _check(allocator: CachingAllocator, live: dict[int, Block]) -> None:
    """Every segment is a chain of adjacent blocks; free neighbours are merged; each free block
    is in its pool under its size; the mapped bytes are the reserved ones."""
    seen: dict[int, Block] = {}
    starts = [*live.values()]
    for pool in (allocator.small, allocator.large):
        assert len(pool.keys) == len(pool.blocks) and pool.keys == sorted(pool.keys)
        assert all(pool.blocks[c].size == size and not pool.blocks[c].allocated for size, c in pool.keys)
        assert all(not b.mapped for b in pool.unmapped.values())
        starts += [*pool.blocks.values(), *pool.unmapped.values()]
    heads: dict[int, Block] = {}
    for block in starts:
        while block.prev is not None and block.counter not in heads:
            heads[block.counter] = block  # not a head: marks the chain as walked up
            block = block.prev
        heads.setdefault(block.counter, block)
    for head in heads.values():
        if head.prev is not None:
            continue
        block: Block | None = head
        while block is not None:
            seen[block.counter] = block
            following = block.next
            if following is not None:
                assert following.prev is block and following.ptr == block.ptr + block.size
                assert block.allocated or following.allocated or block.mapped != following.mapped
            block = following
    assert sum(b.size for b in seen.values() if b.mapped) == allocator.stats.reserved
    assert sum(b.size for b in seen.values() if b.allocated) == allocator.stats.allocated
    free = sum(len(pool.blocks) + len(pool.unmapped) for pool in (allocator.small, allocator.large))
    assert free + len(live) == len(seen)


@pytest.mark.parametrize("expandable", [False, True])
@pytest.mark.parametrize("capacity", [None, 400 * MIB])
def test_random_sequences_keep_the_books_straight(expandable: bool, capacity: int | None) -> None:
    """Random allocations and frees (some running out of memory): the invariants of
    ``CUDACachingAllocator.cpp``'s blocks hold after every step, and freeing everything then
    releasing the cache gives every byte back (``release_cached_blocks``)."""
    rng = random.Random(14)
    allocator = CachingAllocator(AllocatorConfig(expandable_segments=expandable), capacity)
    live: dict[int, Block] = {}
    for step in range(1500):
        if live and rng.random() < 0.45:
            allocator.free(live.pop(rng.choice(list(live))))
        else:
            size = rng.randint(1, MIB) if rng.random() < 0.6 else rng.randint(MIB, 48 * MIB)
            block = allocator.malloc(size)
            if block is not None:
                live[step] = block
        _check(allocator, live)
        assert allocator.stats.requested <= allocator.stats.allocated <= allocator.stats.reserved
        assert capacity is None or allocator.stats.peak_reserved <= capacity
    for block in live.values():
        allocator.free(block)
    allocator.release_cached_blocks()
    _check(allocator, {})
    assert allocator.stats.reserved == allocator.stats.allocated == 0
    assert allocator.stats.segments == 0 if not expandable else allocator.stats.segments <= 2


# -- the event log ---------------------------------------------------------------------------


def test_out_of_place_gradient_accumulation_becomes_in_place() -> None:
    """Fake tensors add a second gradient out of place (``new = a + b``); real tensors add into
    ``a``'s buffer: ``new`` allocates nothing and ``a``'s buffer lives until both are freed."""
    log = EventLog(
        rows=[("forward", 0), (0, 100), (1, 100), (2, 100), (1, -100), (0, -100), (3, 0), (2, -100)],
        in_place=[(2, 0, 1)],
    )
    assert allocation_events(log) == [(0, 100), (1, 100), (1, -100), (0, -100)]
    assert len(allocation_events(log, in_place=False)) == 6
    assert replay(log).peak_requested == 200


def test_a_traced_llama_step_replays_to_the_trace_peak() -> None:
    """Two traced LoRA steps of a small Llama: the replay holds at its peak exactly the bytes
    the trace counts, the blocks (rounded to 512 bytes) at least that, and the reserved memory
    at least the blocks; the smallest capacity lies between the peak and the plentiful reserve."""
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.memory.tracing.model import decoder_layers
    from peftaudit.memory.tracing.run import run_trace

    model = build("llama")
    layers = [(str(i), layer) for i, layer in enumerate(decoder_layers(model))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = run_trace(model, TrainingPlan(method="lora", batch_size=2, seq_len=128), steps=2, layers=layers)
    assert traced.events is not None
    events = allocation_events(traced.events)
    for expandable in (False, True):
        result = replay(events, expandable_segments=expandable)
        assert result.peak_requested == traced.peak_bytes
        assert traced.peak_bytes <= result.peak_allocated <= result.peak_reserved
        assert result.peak_reserved % (2 * MIB) == 0 and not result.oom
        capacity = smallest_capacity(events, expandable_segments=expandable)
        assert traced.peak_bytes <= capacity.bytes <= result.peak_reserved
        assert not capacity.tight.oom
        assert replay(events, expandable_segments=expandable, capacity=capacity.bytes - 2 * MIB).oom


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="power of 2"):
        CachingAllocator(AllocatorConfig(roundup_power2_divisions=3))
    with pytest.raises(ValueError, match="max_split_size"):
        CachingAllocator(AllocatorConfig(max_split_size=4 * MIB))
    with pytest.raises(ValueError, match="allocated twice"):
        replay([(0, 512), (0, 512)])
