"""The safetensors header, parsed and validated by us (no pickle, no torch).

Layout: an unsigned little-endian u64 ``N``, ``N`` bytes of UTF-8 JSON, then
the data buffer. The JSON maps tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the data buffer) and may
hold a ``"__metadata__"`` map of strings.

The rules match the reference implementation's ``validate``: tensors tile the
buffer exactly (sorted by offset, each starting where the previous ended), each
tensor's byte length equals its element count times its width, and the buffer
ends at the end of the file. We are stricter in two places: duplicate JSON keys
and unknown dtypes are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from peftaudit.verification.dtypes import lookup
from peftaudit.verification.errors import CheckpointError

#: The reference implementation's limit; a larger header is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
_PREFIX = 8


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; offsets are absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: its tensors in file order and its string metadata."""

    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str]
    data_start: int


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """The JSON length from the first 8 bytes, checked against limits and the file size."""
    if file_size < _PREFIX or len(prefix) < _PREFIX:
        raise CheckpointError(f"{where}: truncated: {file_size} bytes is shorter than the 8-byte header size")
    n = int.from_bytes(prefix[:_PREFIX], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise CheckpointError(f"{where}: header of {n} bytes is too small to hold a JSON object")
    if _PREFIX + n > file_size:
        raise CheckpointError(
            f"{where}: truncated: header claims {n} bytes but the file has {file_size - _PREFIX} after the size"
        )
    return n


def parse_header(header_json: bytes, file_size: int, where: str) -> Header:
    """Validate a header's JSON bytes against the size of the file they came from."""
    data_start = _PREFIX + len(header_json)
    try:
        text = header_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{where}: header does not start with a JSON object")
    try:
        raw = json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: header is not valid JSON: {_short(exc)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")

    metadata = _metadata(raw.pop("__metadata__", None), where)
    entries = [_entry(name, spec, data_start, where) for name, spec in raw.items()]
    # Zero-length tensors may share an offset; order them before a sized one there.
    entries.sort(key=lambda e: (e.start, e.stop))
    cursor = data_start
    for entry in entries:
        if entry.start != cursor:
            kind = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap before it"
            raise CheckpointError(f"{where}: tensor {entry.name!r} {kind} (offset {entry.start - data_start})")
        cursor = entry.stop
    if cursor != file_size:
        if cursor > file_size:
            raise CheckpointError(
                f"{where}: truncated: tensors end at byte {cursor} but the file has {file_size} bytes"
            )
        raise CheckpointError(f"{where}: {file_size - cursor} trailing bytes after the last tensor")
    return Header(entries=tuple(entries), metadata=metadata, data_start=data_start)


def _entry(name: str, spec: Any, data_start: int, where: str) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: tensor {name!r}: expected an object, got {type(spec).__name__}")
    missing = {"dtype", "shape", "data_offsets"} - spec.keys()
    if missing:
        raise CheckpointError(f"{where}: tensor {name!r}: missing {', '.join(sorted(missing))}")
    code = spec["dtype"]
    dtype = lookup(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: tensor {name!r}: unknown dtype {code!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r}: shape must be a list of non-negative integers")
    offsets = spec["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: tensor {name!r}: data_offsets end before they begin")
    numel = math.prod(shape)
    expected = dtype.nbytes(numel)
    if expected is None:
        raise CheckpointError(f"{where}: tensor {name!r}: {numel} x {code} is not a whole number of bytes")
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r}: shape {tuple(shape)} of {code} needs {expected} bytes, "
            f"offsets span {end - begin}"
        )
    return HeaderEntry(name, code, tuple(shape), data_start + begin, data_start + end)


def _metadata(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    return dict(raw)


def _is_count(value: Any) -> bool:
    # bool is an int subclass in Python; JSON true is not a count.
    return type(value) is int and value >= 0


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def refuse_constant(name: str) -> Any:
    """``json.loads(parse_constant=...)``: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
