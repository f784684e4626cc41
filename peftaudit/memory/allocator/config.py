"""The allocator's constants and settings, as PyTorch's CUDA caching allocator has them.

Source: ``c10/core/AllocatorConfig.h`` (the constants; identical in the torch 2.13 wheel's
headers), ``c10/core/AllocatorConfig.cpp`` (the settings' defaults) and the size rules of
``c10/cuda/CUDACachingAllocator.cpp`` (``round_size``, ``roundup_power2_next_division``,
``get_allocation_size``). See :mod:`peftaudit.memory.allocator` for the version read.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20

MIN_BLOCK_SIZE = 512
"""``kMinBlockSize``: every request is rounded up to a multiple of 512 bytes."""
SMALL_SIZE = 1 * MIB
"""``kSmallSize``: the largest request served from the small pool."""
SMALL_BUFFER = 2 * MIB
"""``kSmallBuffer``: small requests are packed into 2 MiB segments (and 2 MiB pages when expandable)."""
MIN_LARGE_ALLOC = 10 * MIB
"""``kMinLargeAlloc``: large requests below 10 MiB get a ``large_segment_size`` segment to split."""
ROUND_LARGE = 2 * MIB
"""``kRoundLarge``: a segment for a request of 10 MiB or more is the request rounded up to 2 MiB."""
LARGE_SEGMENT_SIZE = 20 * MIB
"""``large_segment_size_`` default (``kLargeBuffer`` before it became a setting): 20 MiB."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` settings the model honours; the defaults are torch's.

    ``release_on_oom`` is not a torch setting: ``False`` turns off the free-cached-blocks-and-retry
    step of ``malloc``, a naive allocator to compare the real one with.
    """

    expandable_segments: bool = False
    """``expandable_segments:True``: one growing segment per pool, mapped page by page."""
    max_split_size: int | None = None
    """``max_split_size_mb`` in bytes; ``None`` is torch's default, unlimited (``SIZE_MAX``)."""
    max_non_split_rounding: int | None = None
    """``max_non_split_rounding_mb`` in bytes; ``None`` follows ``large_segment_size`` (20 MiB)."""
    large_segment_size: int = LARGE_SEGMENT_SIZE
    """``large_segment_size_mb`` in bytes (20 MiB by default; torch requires more than 10 MiB)."""
    roundup_power2_divisions: int = 0
    """``roundup_power2_divisions:N`` (one value for every size; 0, the default, turns it off)."""
    release_on_oom: bool = True
    """Free cached blocks and retry before raising out-of-memory (what torch does)."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) on a setting torch itself would refuse."""
        if self.large_segment_size <= MIN_LARGE_ALLOC or self.large_segment_size % MIB:
            raise ValueError("large_segment_size must be whole MiB and more than 10 MiB")
        n = self.roundup_power2_divisions
        if n < 0 or (n and n & (n - 1)):
            raise ValueError("roundup_power2_divisions must be 0 or a power of 2")
        for name in ("max_split_size", "max_non_split_rounding"):
            value = getattr(self, name)
            if value is not None and (value < self.large_segment_size or value % MIB):
                raise ValueError(f"{name} must be whole MiB and at least large_segment_size")

    @property
    def split_limit(self) -> float:
        """``max_split_size`` as a number (infinite when unlimited)."""
        return float("inf") if self.max_split_size is None else self.max_split_size

    @property
    def rounding_limit(self) -> int:
        """``max_non_split_rounding_size``: how much larger than an oversize request a reused block may be."""
        return self.large_segment_size if self.max_non_split_rounding is None else self.max_non_split_rounding


def round_size(size: int, divisions: int = 0) -> int:
    """The block size a request of ``size`` bytes gets (``DeviceCachingAllocator::round_size``)."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(size, divisions)
    return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: up to the next of ``divisions`` steps between powers of 2."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def allocation_size(size: int, large_segment_size: int = LARGE_SEGMENT_SIZE) -> int:
    """The segment ``cudaMalloc`` gets for a rounded request that no cached block serves
    (``get_allocation_size``): 2 MiB for the small pool, ``large_segment_size`` below 10 MiB,
    else the request rounded up to 2 MiB."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return large_segment_size
    return -(-size // ROUND_LARGE) * ROUND_LARGE
