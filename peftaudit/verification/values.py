"""Where a diff reads tensor values from: a protocol, and helpers shared by its implementations."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np

from peftaudit.verification.fingerprint import Buffer

#: Called with a number of bytes each time that many more have been hashed.
Progress = Callable[[int], None]

T = TypeVar("T")


class ValueSource(Protocol):
    """Read access to the raw bytes of a set of named tensors, without copying them all.

    Offsets are in elements of the tensor's own dtype, row-major (the order a
    safetensors file stores them in).
    """

    def read(self, name: str, start: int, stop: int) -> Buffer:
        """Raw bytes of elements ``[start, stop)`` of a tensor."""
        ...

    def gather(self, name: str, positions: np.ndarray) -> bytes:
        """Raw bytes of the elements at ``positions`` (ascending flat indices)."""
        ...

    def chunks(self, name: str) -> Iterator[Buffer]:
        """The tensor's raw bytes in bounded chunks, in order (for hashing)."""
        ...

    def release(self, name: str, start: int, stop: int) -> None:
        """A hint that elements ``[start, stop)`` were read and will not be needed soon."""
        ...


def default_workers() -> int:
    """Threads for hashing: hashing releases the GIL, so threads scale with cores."""
    import os

    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(
    func: Callable[[T], object], items: Sequence[T], *, workers: int | None, cost: Callable[[T], int]
) -> list[object]:
    """``[func(x) for x in items]`` on a thread pool, biggest first, results in input order."""
    count = workers or default_workers()
    if count <= 1 or len(items) <= 1:
        return [func(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i]))
    results: list[object] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="peftaudit-hash") as pool:
        futures = {pool.submit(func, items[i]): i for i in order}
        for future, index in futures.items():
            results[index] = future.result()
    return results
