"""Element types of tensors: safetensors codes, widths, rounding steps, decoding to float64.

Everything here works on raw little-endian bytes with numpy, so reading and
comparing safetensors checkpoints never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from peftaudit.units import TORCH_DTYPE_BYTES

Kind = Literal["float", "int", "bool", "complex"]


@dataclass(frozen=True)
class DType:
    """One element type, named by its safetensors code (``"BF16"``)."""

    code: str
    bits: int
    kind: Kind
    #: Relative rounding step (machine epsilon); 0 for exact types.
    eps: float = 0.0

    @property
    def itemsize(self) -> int | None:
        """Bytes per element, or None for sub-byte types (F4, F6)."""
        return self.bits // 8 if self.bits % 8 == 0 else None

    def nbytes(self, numel: int) -> int | None:
        """Bytes for ``numel`` elements, or None when that is not a whole number of bytes."""
        total = numel * self.bits
        return total // 8 if total % 8 == 0 else None


#: Every safetensors code torch has a dtype for: (code, torch dtype name, kind, rounding step). The widths
#: are :data:`peftaudit.units.TORCH_DTYPE_BYTES`, the one table of bytes per element.
_TORCH_TYPES: tuple[tuple[str, str, Kind, float], ...] = (
    ("BOOL", "bool", "bool", 0.0),
    ("U8", "uint8", "int", 0.0),
    ("I8", "int8", "int", 0.0),
    ("U16", "uint16", "int", 0.0),
    ("I16", "int16", "int", 0.0),
    ("U32", "uint32", "int", 0.0),
    ("I32", "int32", "int", 0.0),
    ("U64", "uint64", "int", 0.0),
    ("I64", "int64", "int", 0.0),
    ("F16", "float16", "float", 2.0**-10),
    ("BF16", "bfloat16", "float", 2.0**-7),
    ("F32", "float32", "float", 2.0**-23),
    ("F64", "float64", "float", 2.0**-52),
    ("F8_E4M3", "float8_e4m3fn", "float", 2.0**-3),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", "float", 2.0**-3),
    ("F8_E5M2", "float8_e5m2", "float", 2.0**-2),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", "float", 2.0**-2),
    ("F8_E8M0", "float8_e8m0fnu", "float", 1.0),
    ("C64", "complex64", "complex", 2.0**-23),
)

_TABLE = (
    *(DType(code, 8 * TORCH_DTYPE_BYTES[name], kind, eps) for code, name, kind, eps in _TORCH_TYPES),
    # Sub-byte floats, which torch has no dtype for.
    DType("F6_E2M3", 6, "float", 2.0**-3),
    DType("F6_E3M2", 6, "float", 2.0**-2),
    DType("F4", 4, "float", 2.0**-1),
)

#: Every dtype code the safetensors format defines, by code.
DTYPES: dict[str, DType] = {d.code: d for d in _TABLE}

#: torch dtype name (``str(torch.bfloat16)`` without ``torch.``) to safetensors code.
TORCH_TO_CODE: dict[str, str] = {name: code for code, name, _, _ in _TORCH_TYPES}


def lookup(code: str) -> DType | None:
    """The dtype for a code, or None for one this version does not know."""
    return DTYPES.get(code)


def code_for_torch(dtype_name: str, itemsize: int) -> str:
    """The safetensors code for a torch dtype name; unknown ones keep their torch name.

    Unknown types (packed fp4 pairs, quantized types) still hash correctly: the
    fingerprint is over raw bytes. They only lose value decoding.
    """
    code = TORCH_TO_CODE.get(dtype_name)
    if code is not None:
        return code
    DTYPES.setdefault(dtype_name, DType(dtype_name, itemsize * 8, "int"))
    return dtype_name


_NUMPY: dict[str, str] = {
    "BOOL": "u1",
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
}


def _fp8_table(exp_bits: int, bias: int, *, fnuz: bool, ieee: bool) -> np.ndarray:
    """All 256 values of an 8-bit float format, computed from its definition."""
    man_bits = 7 - exp_bits
    out = np.empty(256, dtype=np.float64)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> man_bits) & ((1 << exp_bits) - 1)
        man = byte & ((1 << man_bits) - 1)
        top = (1 << exp_bits) - 1
        if fnuz and byte == 0x80:
            out[byte] = np.nan
            continue
        if ieee and exp == top:
            out[byte] = sign * np.inf if man == 0 else np.nan
            continue
        if not ieee and not fnuz and exp == top and man == (1 << man_bits) - 1:
            out[byte] = np.nan  # e4m3fn: only S.1111.111 is NaN, no infinities
            continue
        if exp == 0:
            out[byte] = sign * (man / (1 << man_bits)) * 2.0 ** (1 - bias)
        else:
            out[byte] = sign * (1 + man / (1 << man_bits)) * 2.0 ** (exp - bias)
    return out


@cache
def _lookup_table(code: str) -> np.ndarray:
    if code == "F8_E4M3":
        return _fp8_table(4, 7, fnuz=False, ieee=False)
    if code == "F8_E4M3FNUZ":
        return _fp8_table(4, 8, fnuz=True, ieee=False)
    if code == "F8_E5M2":
        return _fp8_table(5, 15, fnuz=False, ieee=True)
    if code == "F8_E5M2FNUZ":
        return _fp8_table(5, 16, fnuz=True, ieee=False)
    if code == "F8_E8M0":
        table = 2.0 ** (np.arange(256, dtype=np.float64) - 127)
        table[255] = np.nan
        return table
    raise KeyError(code)


def can_decode(code: str) -> bool:
    """Whether :func:`decode` turns this type's bytes into numbers."""
    return code in _NUMPY or code == "BF16" or code.startswith("F8_")


def decode(code: str, raw: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray | None:
    """Raw little-endian element bytes as a float64 array, or None if not decodable."""
    buf = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    buf = buf.view(np.uint8).reshape(-1)
    if code in _NUMPY:
        return buf.view(np.dtype(_NUMPY[code])).astype(np.float64)
    if code == "BF16":
        # bfloat16 is the top half of a float32.
        wide = buf.view("<u2").astype(np.uint32) << 16
        return wide.view(np.float32).astype(np.float64)
    if code.startswith("F8_"):
        return _lookup_table(code)[buf]
    return None
