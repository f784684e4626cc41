"""A model of PyTorch's CUDA caching allocator, to replay a traced step's allocations.

The trace counts the bytes tensors hold; a GPU runs out of memory when the allocator
cannot get a segment, and the allocator holds more than the tensors do: it rounds
requests to 512 bytes, packs small ones into 2 MiB segments and 1-10 MiB ones into
20 MiB segments, keeps freed blocks cached for reuse (best fit, split and merged), and
only when ``cudaMalloc`` fails frees the cached segments and retries. :func:`replay` runs
a step's allocations and frees through a model of that allocator and reports what
``torch.cuda.max_memory_reserved`` would show; :func:`smallest_capacity` the least
device memory the step runs in.

Modelled from ``c10/cuda/CUDACachingAllocator.cpp`` and ``c10/core/AllocatorConfig.{h,cpp}``
of the PyTorch 2.13 line. The pytorch/pytorch snapshot is too large to fetch here and the
source index holds only an older revision of that file, so the code read is the copy in the
``Continuous-Integrator/pytorch`` mirror (file revision 0919d01f; ``AllocatorConfig.cpp``
09384c1f), whose allocator matches the 2.13 wheel's own headers (``large_segment_size``,
``throw_on_cudamalloc_oom``, ``OomRejectionObserver``, ``num_oom_rejections``,
``registration_counter``). Functions are cited by name (line numbers move between
releases). What is left out is listed in :mod:`.caching`.

>>> from peftaudit.memory.allocator import replay
>>> replay([(0, 3 << 20), (1, 3 << 20), (0, -(3 << 20))]).peak_reserved >> 20
20
"""

from __future__ import annotations

from peftaudit.memory.allocator.caching import CachingAllocator
from peftaudit.memory.allocator.config import AllocatorConfig, allocation_size, round_size
from peftaudit.memory.allocator.replay import Capacity, Event, Replay, allocation_events, replay, smallest_capacity

__all__ = [
    "AllocatorConfig",
    "CachingAllocator",
    "Capacity",
    "Event",
    "Replay",
    "allocation_events",
    "allocation_size",
    "replay",
    "round_size",
    "smallest_capacity",
]
