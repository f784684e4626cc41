"""Measuring a change: elementwise comparison of two versions of one tensor.

Exact when both versions can be read (two checkpoints, or a checkpoint and a
live model); over the snapshot's sample otherwise. Runs in bounded chunks, so
comparing a multi-GB tensor needs a few MB of memory. For IEEE floats the
bookkeeping (which elements differ, NaN/Inf counts, the largest magnitude)
runs on the raw bits, and only differing elements are decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftaudit.verification.dtypes import can_decode, decode, lookup
from peftaudit.verification.fingerprint import SamplePolicy, TensorFingerprint
from peftaudit.verification.values import ValueSource

#: Elements read and decoded per step of a full comparison (8 MB as float64).
CHUNK_ELEMENTS = 1 << 20
#: A change of at most this many rounding steps of the tensor's dtype is "rounding-level".
ROUNDING_STEPS = 2.0
# A merge rounds at the scale of ``W + delta``, not of ``W``: where the adapter's delta is
# larger than a small weight, the round-trip error is a step of the delta's size. Allowing
# one step of the tensor's largest magnitude on top covers deltas up to the weights' scale.

#: IEEE layouts: (exponent mask, magnitude mask). Exponent all ones means NaN or infinity, and
#: for finite values the magnitude bits order like the magnitudes.
_IEEE = {
    "F16": (0x7C00, 0x7FFF),
    "BF16": (0x7F80, 0x7FFF),
    "F32": (0x7F800000, 0x7FFFFFFF),
    "F64": (0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
}


@dataclass(frozen=True)
class ChangeSize:
    """How much a tensor changed, over ``compared`` elements (all of them when ``exact``).

    ``max_abs`` is the largest absolute change of a finite element;
    ``max_rel`` divides it by the largest absolute value before (the tensor's
    scale); ``fraction`` is the share of compared elements whose bits differ.
    """

    max_abs: float
    max_rel: float | None
    fraction: float
    compared: int
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "fraction_changed": self.fraction,
            "elements_compared": self.compared,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class Comparison:
    """What an elementwise comparison found (None where it could not tell)."""

    size: ChangeSize | None = None
    #: Every differing element moved by at most ``ROUNDING_STEPS`` steps of its dtype (plus one
    #: step at the tensor's largest magnitude).
    rounding_level: bool = False
    #: For a dtype change: whether every compared element kept its value.
    values_equal: bool | None = None
    nonfinite_before: int | None = None
    nonfinite_after: int | None = None
    #: A narrower dtype the change is exactly a cast round-trip through (``"BF16"``), if any.
    roundtrip: str | None = None


def _round_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (round to nearest even), as float64."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def _through(numpy_type: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: values.astype(numpy_type).astype(np.float64)


#: Narrower types a wider tensor may have been cast through, narrowest first.
_ROUNDTRIPS: dict[str, tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...]] = {
    "F32": (("F16", _through(np.float16)), ("BF16", _round_bf16)),
    "F64": (("F16", _through(np.float16)), ("BF16", _round_bf16), ("F32", _through(np.float32))),
}


def _raw(code: str, buf: Any) -> np.ndarray | None:
    dtype = lookup(code)
    size = dtype.itemsize if dtype else None
    if size not in (1, 2, 4, 8):
        return None
    return np.frombuffer(buf, dtype=np.dtype(f"<u{size}"))


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two equal-length arrays hold the same bytes (compared 8 bytes at a time)."""
    wa, wb = a.view(np.uint8), b.view(np.uint8)
    cut = wa.size - wa.size % 8
    return bool(np.array_equal(wa[:cut].view(np.uint64), wb[:cut].view(np.uint64))) and bool(
        np.array_equal(wa[cut:], wb[cut:])
    )


def _ieee_stats(bits: np.ndarray, exponent: int, magnitude: int) -> tuple[int, Any]:
    """(NaN/Inf count, largest finite magnitude's bits or None) of IEEE floats given as integers.

    With the sign cleared, an IEEE float is NaN or infinite exactly when its bits are at least
    the exponent mask, and finite magnitudes order like their bits.
    """
    mags = bits & bits.dtype.type(magnitude)
    limit = bits.dtype.type(exponent)
    top = mags.max() if mags.size else None
    if top is None or top < limit:
        return 0, top
    nonfinite = mags >= limit
    finite = mags[~nonfinite]
    return int(np.count_nonzero(nonfinite)), (finite.max() if finite.size else None)


@dataclass
class _Tally:
    """Running totals over the chunks of one comparison."""

    before: str
    after: str
    compared: int = 0
    differing: int = 0
    max_abs: float = 0.0
    max_before: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    #: Every change so far finite on both sides.
    finite_changes: bool = True
    #: Largest amount by which a change exceeds ROUNDING_STEPS steps of its own element.
    excess: float = 0.0
    roundtrips: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dtype = lookup(self.before)
        self.eps = dtype.eps if dtype is not None else 0.0
        self.bitwise = self.before == self.after
        if self.bitwise:
            self.roundtrips = {code: True for code, _ in _ROUNDTRIPS.get(self.before, ())}

    def add(self, raw_a: Any, raw_b: Any) -> None:
        """Fold in one chunk of raw element bytes from each side."""
        ia, ib = _raw(self.before, raw_a), _raw(self.after, raw_b)
        layout = _IEEE.get(self.before) if self.bitwise else None
        if layout is not None and ia is not None and ib is not None:
            exponent, magnitude = layout
            count_a, largest = _ieee_stats(ia, exponent, magnitude)
            self.nonfinite_a += count_a
            self.compared += ia.size
            if largest is not None:
                value = decode(self.before, np.array([largest], dtype=ia.dtype).view(np.uint8))
                assert value is not None
                self.max_before = max(self.max_before, float(value[0]))
            if _same_bytes(ia, ib):  # the common case: an unchanged stretch of a changed tensor
                self.nonfinite_b += count_a
                return
            self.nonfinite_b += _ieee_stats(ib, exponent, magnitude)[0]
            changed = np.flatnonzero(ia != ib)
            a = decode(self.before, ia[changed].view(np.uint8))
            b = decode(self.after, ib[changed].view(np.uint8))
            assert a is not None and b is not None
            self._changes(a, b)
            return
        a, b = decode(self.before, raw_a), decode(self.after, raw_b)
        assert a is not None and b is not None
        finite_a = np.isfinite(a)
        self.nonfinite_a += int(a.size - np.count_nonzero(finite_a))
        self.nonfinite_b += int(b.size - np.count_nonzero(np.isfinite(b)))
        if finite_a.any():
            self.max_before = max(self.max_before, float(np.abs(a[finite_a]).max()))
        self.compared += a.size
        if self.bitwise and ia is not None and ib is not None:
            differ = ia != ib
        else:
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        self._changes(a[differ], b[differ])

    def _changes(self, a: np.ndarray, b: np.ndarray) -> None:
        """Fold in elements that differ (before ``a``, after ``b``)."""
        self.differing += a.size
        both = np.isfinite(a) & np.isfinite(b)
        if not both.all():
            # A NaN or infinity appeared or went away: not rounding of any kind.
            self.finite_changes = False
        a, b = a[both], b[both]
        if not a.size:
            return
        delta = np.abs(b - a)
        self.max_abs = max(self.max_abs, float(delta.max()))
        scale = np.maximum(np.abs(a), np.abs(b))
        self.excess = max(self.excess, float((delta - ROUNDING_STEPS * self.eps * scale).max()))
        for code, narrow in _ROUNDTRIPS.get(self.before, ()):
            if self.roundtrips.get(code):
                with np.errstate(over="ignore"):
                    self.roundtrips[code] = bool(np.array_equal(narrow(a), b))

    def result(self, exact: bool) -> Comparison:
        if self.compared == 0:
            return Comparison()
        size = ChangeSize(
            max_abs=self.max_abs,
            max_rel=self.max_abs / self.max_before if self.max_before > 0 else None,
            fraction=self.differing / self.compared,
            compared=self.compared,
            exact=exact,
        )
        changed = self.differing > 0 and self.finite_changes
        through = [code for code, ok in self.roundtrips.items() if ok]
        return Comparison(
            size=size,
            rounding_level=changed and self.eps > 0 and self.excess <= self.eps * self.max_before,
            values_equal=self.differing == 0,
            nonfinite_before=self.nonfinite_a if exact else None,
            nonfinite_after=self.nonfinite_b if exact else None,
            roundtrip=through[0] if changed and through else None,
        )


def compare(
    before: TensorFingerprint,
    after: TensorFingerprint,
    *,
    before_values: ValueSource | None,
    after_values: ValueSource | None,
    before_policy: SamplePolicy,
    after_policy: SamplePolicy,
) -> Comparison:
    """Compare two versions of a tensor of the same shape, as exactly as the inputs allow."""
    if before.shape != after.shape or not (can_decode(before.dtype) and can_decode(after.dtype)):
        return Comparison()
    tally = _Tally(before.dtype, after.dtype)
    if before_values is not None and after_values is not None and not before.layout:
        for start in range(0, before.numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, before.numel)
            tally.add(before_values.read(before.name, start, stop), after_values.read(after.name, start, stop))
            before_values.release(before.name, start, stop)
            after_values.release(after.name, start, stop)
        return tally.result(exact=True)

    unknown = Comparison(nonfinite_before=before.nonfinite, nonfinite_after=_count_nonfinite(after, after_values))
    if not before.sample:
        return unknown
    after_raw: bytes | None = None
    if after_values is not None and not (after.layout or before.layout):
        after_raw = after_values.gather(after.name, before_policy.positions(before.numel))
    elif after.sample is not None and after_policy == before_policy and _elements(after) == _elements(before):
        after_raw = after.sample  # two snapshots: their samples sit at the same positions
    if after_raw is None:
        return unknown
    tally.add(before.sample, after_raw)
    exact = len(before.sample) == before.nbytes
    found = tally.result(exact=exact)
    return Comparison(
        size=found.size,
        rounding_level=found.rounding_level,
        roundtrip=found.roundtrip,
        values_equal=found.values_equal,
        nonfinite_before=before.nonfinite if before.nonfinite is not None else found.nonfinite_before,
        nonfinite_after=(
            after.nonfinite
            if after.nonfinite is not None
            else found.nonfinite_after
            if exact
            else _count_nonfinite(after, after_values)
        ),
    )


def _elements(fp: TensorFingerprint) -> int:
    dtype = lookup(fp.dtype)
    size = dtype.itemsize if dtype else None
    return len(fp.sample) // size if fp.sample is not None and size else -1


def _count_nonfinite(fp: TensorFingerprint, values: ValueSource | None) -> int | None:
    if fp.nonfinite is not None:
        return fp.nonfinite
    dtype = lookup(fp.dtype)
    if values is None or fp.layout or not can_decode(fp.dtype) or dtype is None or dtype.kind != "float":
        return None
    layout = _IEEE.get(fp.dtype)
    total = 0
    for start in range(0, fp.numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, fp.numel)
        raw = values.read(fp.name, start, stop)
        bits = _raw(fp.dtype, raw)
        if layout is not None and bits is not None:
            total += _ieee_stats(bits, *layout)[0]
        else:
            decoded = decode(fp.dtype, raw)
            assert decoded is not None
            total += int(decoded.size - np.count_nonzero(np.isfinite(decoded)))
        values.release(fp.name, start, stop)
    return total


def nonfinite_count(fp: TensorFingerprint, values: ValueSource | None) -> int | None:
    """NaN/Inf elements of a tensor: from its fingerprint, else counted from its values."""
    return _count_nonfinite(fp, values)
