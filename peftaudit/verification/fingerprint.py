"""Per-tensor fingerprints: a hash of the raw bytes plus a few cheap facts.

Identity is bitwise: two tensors match when their dtype, shape and bytes
match. So NaN matches NaN with the same payload and -0.0 differs from +0.0,
unlike ``torch.equal``. The hash is xxh3-128, fast enough (tens of GB/s a core)
that hashing is bound by memory bandwidth, and wide enough that an accidental
collision is not a practical concern. It is not a defence against an attacker
who crafts colliding weights.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import xxhash

from peftaudit.verification.dtypes import lookup

HASH_NAME = "xxh3_128"
#: Bytes hashed per step when a tensor is streamed (GPU copies, checkpoint pages): large
#: enough that per-call overhead vanishes, small enough that resident memory stays flat.
CHUNK_BYTES = 16 << 20

Buffer = bytes | bytearray | memoryview


def digest_chunks(chunks: Iterable[Buffer]) -> str:
    """The hex digest of the concatenation of ``chunks`` (streaming equals one-shot)."""
    hasher = xxhash.xxh3_128()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


@lru_cache(maxsize=256)
def zero_digest(nbytes: int) -> str:
    """The digest of ``nbytes`` zero bytes: an all-zero tensor without reading it again."""
    block = bytes(min(nbytes, CHUNK_BYTES))
    hasher = xxhash.xxh3_128()
    left = nbytes
    while left:
        step = min(left, len(block))
        hasher.update(memoryview(block)[:step])
        left -= step
    return hasher.hexdigest()


@dataclass(frozen=True)
class SamplePolicy:
    """Which elements a snapshot keeps, so a later diff can size a change.

    Tensors of at most ``whole_below`` elements (norms, biases, small adapters)
    are kept whole, so their changes are measured exactly; larger ones keep
    ``points`` evenly spaced elements. Memory grows with the number of
    tensors, never with their size. ``points=0`` keeps nothing.
    """

    whole_below: int = 4096
    points: int = 512

    def positions(self, numel: int) -> np.ndarray:
        """Flat element indices kept for a tensor of ``numel`` elements, ascending."""
        if self.points <= 0 or numel == 0:
            return np.zeros(0, dtype=np.int64)
        if numel <= self.whole_below:
            return np.arange(numel, dtype=np.int64)
        count = min(self.points, numel)
        return (np.arange(count, dtype=np.int64) * numel) // count

    def exact(self, numel: int) -> bool:
        """Whether the sample of such a tensor is the whole tensor."""
        return self.points > 0 and numel <= self.whole_below


@dataclass(frozen=True)
class TensorFingerprint:
    """What a snapshot remembers of one tensor.

    ``nonfinite`` counts NaN and infinite elements (None when not computed or
    not a float type). ``sample`` holds the raw bytes of the elements at the
    snapshot policy's positions. ``trainable`` is ``requires_grad`` for a live
    parameter and None for a checkpoint. ``layout`` names how a distributed
    tensor was sharded ("" for a whole tensor): digests are only comparable
    between equal layouts.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    nonfinite: int | None = None
    sample: bytes | None = None
    trainable: bool | None = None
    layout: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        dtype = lookup(self.dtype)
        size = dtype.nbytes(self.numel) if dtype else None
        return size if size is not None else 0

    @property
    def is_zero(self) -> bool:
        """Whether every byte is zero (an untouched ``lora_B``), judged from the digest."""
        return self.numel > 0 and not self.layout and self.digest == zero_digest(self.nbytes)

    def same_bytes(self, other: TensorFingerprint) -> bool:
        """Bitwise identity: same dtype, shape, layout and digest."""
        return (
            self.digest == other.digest
            and self.dtype == other.dtype
            and self.shape == other.shape
            and self.layout == other.layout
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "digest": self.digest,
        }
        if self.nonfinite is not None:
            out["nonfinite"] = self.nonfinite
        if self.sample is not None:
            out["sample"] = base64.b64encode(self.sample).decode("ascii")
        if self.trainable is not None:
            out["trainable"] = self.trainable
        if self.layout:
            out["layout"] = self.layout
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorFingerprint:
        sample = data.get("sample")
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
            digest=str(data["digest"]),
            nonfinite=None if data.get("nonfinite") is None else int(data["nonfinite"]),
            sample=None if sample is None else base64.b64decode(sample, validate=True),
            trainable=data.get("trainable"),
            layout=str(data.get("layout", "")),
        )
