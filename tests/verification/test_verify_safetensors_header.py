"""The safetensors header parser: every malformed-input rule, then fuzzing against the reference."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.safetensors_format import MAX_HEADER_BYTES, Header, header_length, parse_header


def parse(blob: bytes) -> Header:
    n = header_length(blob[:8], len(blob), "blob")
    return parse_header(blob[8 : 8 + n], len(blob), "blob")


def assemble(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def reference(blob: bytes) -> list[tuple[str, str, list[int], bytes]] | None:
    """What the safetensors library itself makes of ``blob`` (None if it refuses it)."""
    try:
        loaded = safetensors.deserialize(blob)
    except Exception:
        return None
    return sorted((name, t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in loaded)


def ours(blob: bytes) -> list[tuple[str, str, list[int], bytes]] | None:
    try:
        header = parse(blob)
    except CheckpointError:
        return None
    return sorted((e.name, e.dtype, list(e.shape), blob[e.start : e.stop]) for e in header.entries)


def test_a_file_written_by_safetensors_parses_to_its_tensors() -> None:
    blob = save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}, {"k": "v"})
    header = parse(blob)
    assert header.metadata == {"k": "v"}
    assert {(e.name, e.dtype, e.shape) for e in header.entries} == {("a", "F32", (2, 3)), ("b", "I64", (4,))}
    a = next(e for e in header.entries if e.name == "a")
    np.testing.assert_array_equal(np.frombuffer(blob[a.start : a.stop], np.float32), np.arange(6))
    assert ours(blob) == reference(blob)


def spec(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x05\x00\x00", "truncated"),
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}", "exceeds"),
        ((1000).to_bytes(8, "little") + b"{}", "truncated: header claims 1000 bytes"),
        (assemble(None, raw=b"{\xff}"), "not UTF-8"),
        (assemble(None, raw=b"[1, 2]"), "does not start with a JSON object"),
        (assemble(None, raw=b"{not json}"), "not valid JSON"),
        (assemble(None, raw=b'{"a": 1, "a": 2}'), "duplicate key"),
        (assemble(None, raw=b'{"x": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'), "not valid JSON"),
        (assemble({"x": spec(dtype="Q4")}, bytes(8)), "unknown dtype 'Q4'"),
        (assemble({"x": spec(shape=[-2])}, bytes(8)), "shape must be"),
        (assemble({"x": spec(shape=[True, 2])}, bytes(8)), "shape must be"),
        (assemble({"x": {"dtype": "F32", "shape": [2]}}, bytes(8)), "missing data_offsets"),
        (assemble({"x": spec(offsets=[8, 0])}, bytes(8)), "end before they begin"),
        (assemble({"x": spec(shape=[3])}, bytes(8)), "needs 12 bytes, offsets span 8"),
        (assemble({"x": spec(), "y": spec(offsets=[4, 12])}, bytes(12)), "overlaps"),
        (assemble({"x": spec(), "y": spec(offsets=[12, 20])}, bytes(20)), "gap"),
        (assemble({"x": spec()}, bytes(12)), "4 trailing bytes"),
        (assemble({"x": spec()}, bytes(5)), "truncated: tensors end at byte"),
        (assemble({"x": spec(offsets=[0, 10**30])}, bytes(8)), "needs 8 bytes"),
        (assemble({"__metadata__": {"k": 1}}), "__metadata__ must map strings"),
        (assemble({"x": spec(dtype="F4", shape=[3], offsets=[0, 1])}, bytes(1)), "not a whole number of bytes"),
    ],
)
def test_malformed_headers_are_refused_with_a_clear_error(blob: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse(blob)


def test_empty_header_and_zero_sized_tensors_are_valid() -> None:
    assert parse(assemble({})).entries == ()
    blob = assemble({"e": spec(shape=[0, 3], offsets=[0, 0]), "x": spec()}, bytes(8))
    assert [e.name for e in parse(blob).entries] == ["e", "x"]
    assert ours(blob) == reference(blob)


# --- fuzzing -----------------------------------------------------------------------------------

DTYPE_WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8, "F8_E4M3": 1}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_checkpoint_errors(blob: bytes) -> None:
    with contextlib.suppress(CheckpointError):
        parse(blob)


@st.composite
def near_valid_files(draw: st.DrawFn) -> bytes:
    """Headers built tensor by tensor, each field sometimes wrong, with data that may not fit."""
    count = draw(st.integers(0, 4))
    header: dict[str, Any] = {}
    offset = 0
    for i in range(count):
        dtype = draw(st.sampled_from([*DTYPE_WIDTHS, "F4", "XX"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        width = DTYPE_WIDTHS.get(dtype, 1)
        size = math.prod(shape) * width
        size += draw(st.sampled_from([0, 0, 0, 1, -1]))
        begin = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
        entry: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        if draw(st.booleans()) and draw(st.booleans()):
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
        header[draw(st.sampled_from([f"t{i}", "__metadata__", "t0"]))] = entry
        offset = begin + size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    data = bytes(max(0, offset + draw(st.sampled_from([0, 0, 1, -1]))))
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    return len(text).to_bytes(8, "little") + text + data


@FUZZ
@given(near_valid_files())
def test_near_valid_headers_are_judged_exactly_as_the_reference_judges_them(blob: bytes) -> None:
    # Both directions: nothing the reference refuses gets through, nothing it reads is refused.
    assert ours(blob) == reference(blob)


def test_the_near_valid_generator_reaches_accepted_multi_tensor_files() -> None:
    # Without this, the property above could pass by refusing everything.
    found = find(near_valid_files(), lambda blob: len(ours(blob) or []) >= 3)
    assert reference(found) is not None


@FUZZ
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.tuples(st.sampled_from(["<f4", "<f2", "<i8", "u1", "<f8"]), st.lists(st.integers(0, 3), max_size=3)),
        max_size=5,
    )
)
def test_every_file_the_library_writes_we_read_the_same(spec_map: dict[str, tuple[str, list[int]]]) -> None:
    arrays = {name: np.ones(shape, dtype=np.dtype(dt)) for name, (dt, shape) in spec_map.items()}
    blob = save(arrays)
    assert ours(blob) == reference(blob)
    assert ours(blob) is not None


@FUZZ
@given(st.data())
def test_mutations_of_a_valid_file_are_refused_or_read_as_the_reference_reads_them(data: st.DataObject) -> None:
    blob = bytearray(save({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.int64)}))
    header_end = 8 + int.from_bytes(blob[:8], "little")
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "size"]))
    if kind == "flip":
        where = data.draw(st.integers(0, header_end - 1))
        blob[where] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    else:
        blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    mine = ours(bytes(blob))
    if mine is not None:
        assert reference(bytes(blob)) == mine
