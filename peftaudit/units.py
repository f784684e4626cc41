"""Reading sizes people type: memory (``48GiB``, ``24GB``) and token counts (``20M``, ``1.5B``)."""

from __future__ import annotations

import re

from peftaudit.errors import PeftauditError

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
    "G": 1024**3,
    "GIB": 1024**3,
    "GB": 1000**3,
    "T": 1024**4,
    "TIB": 1024**4,
    "TB": 1000**4,
}
_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


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
