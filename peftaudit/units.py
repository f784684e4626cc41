"""Units: bytes in a GiB, bytes per element of each dtype, and reading the sizes people type.

The one copy of each: the report's weight bytes, the memory estimator and the
verifier's safetensors table all read :data:`DTYPE_BYTES`; every GiB shown or
parsed is :data:`GIB`.
"""

from __future__ import annotations

import math
import re

from peftaudit.errors import PeftauditError

#: A binary gigabyte: what every size peftaudit prints in GiB divides by.
GIB = 1024**3

#: Bytes per element by torch dtype name (``str(torch.bfloat16)`` without ``torch.``).
TORCH_DTYPE_BYTES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "uint32": 4,
    "int32": 4,
    "uint64": 8,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex64": 8,
}

#: The short names training plans and the CLI use (``--dtype bf16``), and the torch dtype each means.
SHORT_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}

#: Bytes per element by dtype name, torch's or short.
DTYPE_BYTES: dict[str, int] = {
    **TORCH_DTYPE_BYTES,
    **{short: TORCH_DTYPE_BYTES[name] for short, name in SHORT_DTYPES.items()},
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")
_BYTE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KIB": 1024,
    "KB": 1000,
    "M": 1024**2,
    "MIB": 1024**2,
    "MB": 1000**2,
    "G": GIB,
    "GIB": GIB,
    "GB": 1000**3,
    "T": 1024**4,
    "TIB": 1024**4,
    "TB": 1000**4,
}
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def is_finite_number(value: object) -> bool:
    """A real number strict JSON can hold: an int or a float, not a bool, not NaN or infinite.

    The one test for figures read from files, plugins and plans (a string or a
    boolean where a number belongs is a mistake, not a number).
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_size(text: str) -> int:
    """Bytes from ``48GiB``, ``24GB``, ``80G`` (binary), ``512MiB``; a bare number is bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _BYTE_UNITS:
        raise PeftauditError(f"cannot read memory size {text!r}: write e.g. 48GiB, 24GB or 80G")
    value = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if value <= 0:
        raise PeftauditError(f"memory size must be positive, got {text!r}")
    return value


def parse_tokens(text: str) -> int:
    """A token count from ``20M``, ``1.5B``, ``200k`` or ``20000000``."""
    cleaned = text.replace(",", "").replace("_", "")
    match = _SIZE.match(cleaned)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _COUNT_UNITS:
        raise PeftauditError(f"cannot read token count {text!r}: write e.g. 20M, 1.5B or 200k")
    return int(float(match.group(1)) * _COUNT_UNITS[unit])
