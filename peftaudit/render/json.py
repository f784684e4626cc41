"""JSON out: the one strict writer every command uses.

:func:`dumps` is :func:`json.dumps` with ``allow_nan=False``: ``NaN`` and
``Infinity`` are not JSON (RFC 8259), and strict parsers (``jq``, JavaScript's
``JSON.parse``, Go, Rust's serde_json) refuse a document that holds them. Inputs
that could produce them are refused where they are read, so a non-finite
number reaching the writer is a bug; it raises naming where in the document
it was, instead of printing something no strict parser reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def dumps(data: Any, *, indent: int | None = 2, compact: bool = False) -> str:
    """``data`` as strict JSON: indented by ``indent``, or with no spaces at all if ``compact``.

    Raises :class:`ValueError` naming the path (``$.plans[0].run.cost``) of the
    first ``NaN`` or infinity, which strict JSON cannot hold.
    """
    try:
        if compact:
            return json.dumps(data, allow_nan=False, separators=(",", ":"))
        return json.dumps(data, allow_nan=False, indent=indent)
    except ValueError as exc:
        found = _non_finite(data, "$")
        if found is None:
            raise
        raise ValueError(f"not JSON: {found[0]} is {found[1]!r}") from exc


def _non_finite(data: Any, path: str) -> tuple[str, float] | None:
    """Where the first non-finite float in ``data`` is (depth first, as json.dumps walks), and its value."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (path, data)
    if isinstance(data, Mapping):
        items: Any = ((f"{path}.{key}", value) for key, value in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{path}[{i}]", value) for i, value in enumerate(data))
    else:
        return None
    for where, value in items:
        found = _non_finite(value, where)
        if found is not None:
            return found
    return None
