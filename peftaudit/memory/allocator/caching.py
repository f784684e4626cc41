"""A model of one device's ``DeviceCachingAllocator`` (``c10/cuda/CUDACachingAllocator.cpp``), one stream.

Every method below is named after the C++ function it models and keeps its order of
operations, so the two can be read side by side. What is left out, and why:

* streams, events and ``recordStream``: one stream, so a freed block is reusable at once
  (``free`` goes straight to ``free_block``; ``process_events`` has nothing to do);
* CUDA graphs, private and user memory pools (``pool_diversions``, ``use_on_oom_pools``,
  ``no_split_pools``): a training step allocates from the default pools;
* ``garbage_collection_threshold`` and ``per_process_memory_fraction``: both off by default
  (garbage collection only runs when a memory fraction is set); the capacity of a replay stands
  for the device memory ``cudaMalloc`` can still get, not for a fraction;
* ``FreeCudaMemoryCallbacksRegistry`` (the only one torch registers frees CUDA IPC blocks):
  nothing to free in one process;
* ``throw_on_cudamalloc_oom`` (off by default) and ``release_lock_on_cudamalloc`` (threads).

Addresses are virtual: every segment gets a fresh range, as ``cudaMalloc`` and
``cuMemAddressReserve`` give. They only order the unmapped blocks of expandable segments;
best fit breaks ties between equal sizes by the order blocks were made in
(``BlockComparatorRegistrationCounter``), as the model does with its counter.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from peftaudit.memory.allocator.config import (
    MIN_BLOCK_SIZE,
    SMALL_BUFFER,
    SMALL_SIZE,
    AllocatorConfig,
    allocation_size,
    round_size,
)

#: Expandable segments reserve address space for 1 1/8 of the GPU's memory
#: (``ExpandableSegment::ExpandableSegment``); without a capacity, for this much.
_DEFAULT_DEVICE_MEMORY = 1 << 40


@dataclass(slots=True)
class Expandable:
    """One ``ExpandableSegment``: reserved address space mapped ``page`` bytes at a time."""

    base: int
    page: int
    pages: int


@dataclass(slots=True, eq=False)
class Block:
    """A ``Block``: a piece of a segment, free (cached) or handed out."""

    ptr: int
    size: int
    counter: int
    """``registration_counter``: the order blocks were made in (best fit's tie-break)."""
    small: bool
    expandable: Expandable | None = None
    allocated: bool = False
    mapped: bool = True
    requested: int = 0
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    def splice(self, before: Block | None, after: Block | None) -> None:
        """``Block::splice``: put this block between ``before`` and ``after``."""
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


class Pool:
    """A ``BlockPool``: free mapped blocks by (size, counter), unmapped ones by address."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[int, Block] = {}
        self.unmapped_keys: list[tuple[int, int]] = []
        self.unmapped: dict[int, Block] = {}

    def insert(self, block: Block) -> None:
        """Cache a free mapped block (``insert_into_blocks``)."""
        bisect.insort(self.keys, (block.size, block.counter))
        self.blocks[block.counter] = block

    def erase(self, block: Block) -> None:
        """Remove a free mapped block; its size must be what it was inserted with."""
        key = (block.size, block.counter)
        i = bisect.bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            raise AssertionError(f"block {block.counter} is not in the pool")
        del self.keys[i]
        del self.blocks[block.counter]

    def insert_unmapped(self, block: Block) -> None:
        """Keep an unmapped stretch of an expandable segment, by address."""
        bisect.insort(self.unmapped_keys, (block.ptr, block.counter))
        self.unmapped[block.counter] = block

    def erase_unmapped(self, block: Block) -> None:
        """Remove an unmapped block (it is being mapped or merged)."""
        key = (block.ptr, block.counter)
        i = bisect.bisect_left(self.unmapped_keys, key)
        if i == len(self.unmapped_keys) or self.unmapped_keys[i] != key:
            raise AssertionError(f"block {block.counter} is not among the unmapped")
        del self.unmapped_keys[i]
        del self.unmapped[block.counter]

    def at(self, i: int) -> Block:
        """The ``i``-th free block by (size, counter)."""
        return self.blocks[self.keys[i][1]]


@dataclass
class Stats:
    """The ``DeviceStats`` a replay reports (aggregate over both pools), with peaks."""

    requested: int = 0
    """Bytes the program asked for (``requested_bytes``): what the trace counts."""
    allocated: int = 0
    """Bytes of the blocks handed out (``allocated_bytes``: rounded, with unsplit remainders)."""
    reserved: int = 0
    """Bytes held from the device (``reserved_bytes``; ``total_allocated_memory``)."""
    segments: int = 0
    peak_requested: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_segments: int = 0
    device_allocs: int = 0
    """``num_device_alloc``: cudaMalloc calls and page mappings."""
    device_frees: int = 0
    """``num_device_free``: cudaFree calls and page unmappings."""
    alloc_retries: int = 0
    """``num_alloc_retries``: how often every cached block was released to retry."""
    ooms: int = 0


class CachingAllocator:
    """The allocator of one device: ``malloc`` a size, ``free`` the block it gave.

    ``capacity``: the bytes ``cudaMalloc`` (or mapping pages) can get in all; ``None`` is plenty.
    """

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None) -> None:
        self.config = config or AllocatorConfig()
        self.config.validate()
        self.capacity = capacity
        self.large = Pool(small=False)
        self.small = Pool(small=True)
        self.stats = Stats()
        self._counter = itertools.count()
        self._address = 1 << 32
        self._device_memory = capacity if capacity else _DEFAULT_DEVICE_MEMORY

    # -- malloc ------------------------------------------------------------------------------

    def malloc(self, orig_size: int) -> Block | None:
        """``DeviceCachingAllocator::malloc``; ``None`` where torch raises ``OutOfMemoryError``."""
        if orig_size <= 0:
            raise ValueError("an allocation has a positive size (torch never calls the allocator for 0 bytes)")
        config = self.config
        size = round_size(orig_size, config.roundup_power2_divisions)
        pool = self.small if size <= SMALL_SIZE else self.large  # get_pool
        alloc_size = allocation_size(size, config.large_segment_size)
        expandable = config.expandable_segments
        # First, try to get a block from the existing pool.
        block = self.get_free_block(pool, size)
        if block is None:
            # Can't reuse an existing block; try to get a new one.
            block = self.alloc_block(pool, size, alloc_size)
            if block is None and config.release_on_oom:
                # Free enough oversize cached blocks to satisfy the request and retry ...
                if self.release_available_cached_blocks(pool, size):
                    block = self.alloc_block(pool, size, alloc_size)
                # ... then free every cached block that is a whole segment (and every free
                # page of the expandable segments) and retry.
                if block is None:
                    self.release_cached_blocks()
                    self.stats.alloc_retries += 1
                    block = self.alloc_block(pool, size, alloc_size)
        if block is None:
            self.stats.ooms += 1
            return None
        split = self.should_split(block, size, expandable)
        return self.alloc_found_block(block, pool, size, orig_size, split)

    def alloc_found_block(self, block: Block, pool: Pool, size: int, orig_size: int, split: bool) -> Block:
        """``alloc_found_block``: split off the front ``size`` bytes if asked, hand the block out."""
        if split:
            remaining = block
            block = Block(remaining.ptr, size, next(self._counter), pool.small, remaining.expandable)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        block.requested = orig_size
        stats = self.stats
        stats.allocated += block.size
        stats.requested += orig_size
        stats.peak_allocated = max(stats.peak_allocated, stats.allocated)
        stats.peak_requested = max(stats.peak_requested, stats.requested)
        return block

    def should_split(self, block: Block, size: int, expandable: bool) -> bool:
        """``should_split``: small-pool and expandable blocks split when 512 bytes or more are
        left; large blocks when more than 1 MiB is left and the request is below ``max_split_size``."""
        remaining = block.size - size
        if block.small or expandable:
            return remaining >= MIN_BLOCK_SIZE
        return size < self.config.split_limit and remaining > SMALL_SIZE

    def get_free_block(self, pool: Pool, size: int) -> Block | None:
        """``get_free_block``: the smallest cached block of at least ``size`` bytes (best fit)."""
        i = bisect.bisect_left(pool.keys, (size, -1))
        n = len(pool.keys)
        if i == n:
            return None
        block = pool.at(i)
        if block.expandable is not None:
            if self.config.expandable_segments:
                # A block at the end of an expandable segment counts as the size it can grow to.
                while (
                    i + 1 < n
                    and pool.at(i).expandable is not None
                    and (_expandable_size(pool.at(i + 1)) < _expandable_size(pool.at(i)))
                ):
                    i += 1
            else:
                while i < n and pool.at(i).expandable is not None:
                    i += 1
                if i == n:
                    return None
            block = pool.at(i)
        limit = self.config.split_limit
        # Do not return an oversize block for a request below max_split_size ...
        if size < limit and block.size >= limit:
            return None
        # ... and round an oversize request up only so far.
        if size >= limit and block.size >= size + self.config.rounding_limit:
            return None
        pool.erase(block)
        return block

    def alloc_block(self, pool: Pool, size: int, alloc_size: int) -> Block | None:
        """``alloc_block``: a new segment from ``cudaMalloc`` (or mapped pages when expandable)."""
        if self.config.expandable_segments:
            return self.try_allocate_expandable_block(pool, size)
        stats = self.stats
        if self.capacity is not None and stats.reserved + alloc_size > self.capacity:
            return None  # cudaErrorMemoryAllocation
        block = Block(self._reserve(alloc_size), alloc_size, next(self._counter), pool.small)
        stats.reserved += alloc_size
        stats.segments += 1
        stats.device_allocs += 1
        stats.peak_reserved = max(stats.peak_reserved, stats.reserved)
        stats.peak_segments = max(stats.peak_segments, stats.segments)
        return block

    # -- releasing cached memory -------------------------------------------------------------

    def release_available_cached_blocks(self, pool: Pool, size: int) -> bool:
        """``release_available_cached_blocks``: with ``max_split_size`` set, free oversize cached
        blocks, the smallest that is large enough or else the largest first, until enough is freed."""
        limit = self.config.split_limit
        if limit == float("inf"):
            return False
        key = max(size, int(limit))
        i = bisect.bisect_left(pool.keys, (key, -1))
        if i == len(pool.keys) or pool.at(i).expandable is not None:
            # No single block is large enough; free several oversize blocks, largest first.
            if i == 0:
                return False
            released = 0
            i -= 1
            while released < key and pool.at(i).size >= limit:
                current = pool.at(i)
                if current.expandable is None:
                    released += current.size
                    self.release_block(current)
                if i == 0:
                    break
                i -= 1
            return released >= key
        self.release_block(pool.at(i))
        return True

    def release_cached_blocks(self) -> None:
        """``release_cached_blocks`` (default pool, no capture): free every cached whole segment
        (``release_blocks``) of the large pool, then of the small pool."""
        self.release_blocks(self.large)
        self.release_blocks(self.small)

    def release_blocks(self, pool: Pool) -> None:
        """``release_blocks``: ``cudaFree`` unsplit free blocks; unmap the free pages of expandable ones."""
        to_unmap = []
        for _size, counter in list(pool.keys):
            block = pool.blocks[counter]
            if block.expandable is not None:
                to_unmap.append(block)
            elif block.prev is None and block.next is None:
                self.release_block(block)
        for block in to_unmap:
            self.unmap_block(block, pool)
            if not block.mapped and block.prev is None and block.next is None:
                self.release_expandable_segment(block, pool)

    def release_block(self, block: Block) -> None:
        """``release_block``: ``cudaFree`` a whole free segment."""
        pool = self.small if block.small else self.large
        pool.erase(block)
        self.stats.reserved -= block.size
        self.stats.segments -= 1
        self.stats.device_frees += 1

    def release_expandable_segment(self, block: Block, pool: Pool) -> None:
        """``release_expandable_segment``: drop a segment with nothing left mapped."""
        pool.erase_unmapped(block)
        self.stats.segments -= 1

    # -- free --------------------------------------------------------------------------------

    def free(self, block: Block) -> None:
        """``DeviceCachingAllocator::free`` (one stream: straight to ``free_block``)."""
        block.allocated = False
        self.stats.allocated -= block.size
        self.stats.requested -= block.requested
        self.free_block(block)

    def free_block(self, block: Block) -> None:
        """``free_block``: merge with free neighbours of the same segment, back into the pool."""
        pool = self.small if block.small else self.large
        self.try_merge_blocks(block, block.prev, pool)
        self.try_merge_blocks(block, block.next, pool)
        block.requested = 0
        pool.insert(block)

    @staticmethod
    def try_merge_blocks(dst: Block, src: Block | None, pool: Pool) -> int:
        """``try_merge_blocks``: absorb the free neighbour ``src`` into ``dst`` (which is in no pool)."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            pool.erase(src)
        else:
            pool.erase_unmapped(src)
        if dst.prev is src:
            dst.ptr = src.ptr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # -- expandable segments -----------------------------------------------------------------

    def try_allocate_expandable_block(self, pool: Pool, size: int) -> Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address where ``size`` fits."""
        candidate = self.find_expandable_block(pool, size)
        if not candidate.mapped and not self.map_block(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            # free -> unmapped -> ...: map some of the unmapped block; it absorbs the free one.
            remaining = size - candidate.size
            following = candidate.next
            assert following is not None
            if not self.map_block(following, min(remaining, following.size), pool):
                return None
            candidate = following
        pool.erase(candidate)
        return candidate

    def find_expandable_block(self, pool: Pool, size: int) -> Block:
        """``find_expandable_block``: the lowest-addressed run of free and unmapped blocks with
        room for ``size``; a new segment (2 MiB pages small, ``large_segment_size`` large) if none."""
        for _ptr, counter in pool.unmapped_keys:
            candidate = pool.unmapped[counter]
            if candidate.prev is not None and not candidate.prev.allocated:
                candidate = candidate.prev
            room = 0
            b: Block | None = candidate
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return candidate
        page = SMALL_BUFFER if pool.small else self.config.large_segment_size
        memory = self._device_memory
        pages = -(-(memory + memory // 8) // page)
        segment = Expandable(self._reserve(page * pages), page, pages)
        block = Block(segment.base, page * pages, next(self._counter), pool.small, segment, mapped=False)
        pool.insert_unmapped(block)
        self.stats.segments += 1
        self.stats.peak_segments = max(self.stats.peak_segments, self.stats.segments)
        return block

    def map_block(self, to_map: Block, size: int, pool: Pool) -> bool:
        """``map_block``: map whole pages over the first ``size`` bytes of an unmapped block.

        ``ExpandableSegment::map`` creates every page or, when one fails, none.
        """
        segment = to_map.expandable
        assert segment is not None and not to_map.mapped
        begin = (to_map.ptr - segment.base) // segment.page
        end = -(-(to_map.ptr + size - segment.base) // segment.page)
        mapped = (end - begin) * segment.page
        stats = self.stats
        if mapped == 0 or (self.capacity is not None and stats.reserved + mapped > self.capacity):
            return False
        pool.erase_unmapped(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(
                to_map.ptr + mapped, to_map.size - mapped, next(self._counter), pool.small, segment, mapped=False
            )
            rest.splice(to_map, to_map.next)
            pool.insert_unmapped(rest)
            to_map.size = mapped
        self.try_merge_blocks(to_map, to_map.prev, pool)
        self.try_merge_blocks(to_map, to_map.next, pool)
        pool.insert(to_map)
        stats.reserved += mapped
        stats.device_allocs += 1
        stats.peak_reserved = max(stats.peak_reserved, stats.reserved)
        return True

    def unmap_block(self, block: Block, pool: Pool) -> None:
        """``unmap_block``: unmap the pages that lie wholly inside a free block; the bytes before
        and after them stay mapped as free blocks of their own."""
        segment = block.expandable
        assert segment is not None
        begin = -(-(block.ptr - segment.base) // segment.page)
        end = (block.ptr + block.size - segment.base) // segment.page
        if begin >= end:
            return
        pool.erase(block)
        start = segment.base + begin * segment.page
        unmapped = (end - begin) * segment.page
        before = start - block.ptr
        if before > 0:
            head = Block(block.ptr, before, next(self._counter), pool.small, segment)
            head.splice(block.prev, block)
            pool.insert(head)
        after = block.size - before - unmapped
        if after > 0:
            tail = Block(start + unmapped, after, next(self._counter), pool.small, segment)
            tail.splice(block, block.next)
            pool.insert(tail)
        block.ptr = start
        block.size = unmapped
        block.mapped = False
        self.try_merge_blocks(block, block.prev, pool)
        self.try_merge_blocks(block, block.next, pool)
        pool.insert_unmapped(block)
        self.stats.reserved -= unmapped
        self.stats.device_frees += 1

    # -- helpers -----------------------------------------------------------------------------

    def _reserve(self, size: int) -> int:
        """A fresh virtual address range (segments are never adjacent, as no two cudaMallocs are)."""
        ptr = self._address
        self._address += size + SMALL_BUFFER
        return ptr


def _expandable_size(block: Block) -> int:
    """The size a block can grow to: itself plus the unmapped block after it."""
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)
