"""Derived step profiles on disk, so a model's traces run once per plan shape and library versions.

Entries are JSON (never pickles) in :func:`peftaudit.cache.profiles_dir`
(``~/.cache/peftaudit/profiles``, or ``PEFTAUDIT_PROFILE_DIR``), keyed by the
model's config, the plan fields that change the step, the stack rules it was
traced under (:mod:`peftaudit.memory.stack_rules`: an older release's step), and
the versions of peftaudit, torch, transformers and peft (another version may run
another step). An entry that cannot be read back as a profile (truncated, edited, the
wrong shape) is a miss, derived again and overwritten. ``PEFTAUDIT_NO_CACHE=1``
turns the store off, as it turns off the report cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from peftaudit import cache
from peftaudit._version import __version__
from peftaudit.memory.analytic.step import Segment, StepProfile
from peftaudit.memory.analytic.tape import CATEGORIES, TERMS, CompiledEvents
from peftaudit.memory.derived.derivation import Derived

#: Bumped whenever what is stored, or how it is derived, changes (2: weights a model keeps in float32,
#: memory/keep_fp32.py, are traced in float32).
FORMAT = 2


def key_for(config: Mapping[str, Any], plan_fields: Mapping[str, Any], rules: tuple[str, ...] = ()) -> str | None:
    """The entry's name for this config and plan shape, or ``None`` when caching is off.

    ``rules``: the stack rules the step was traced under (:mod:`peftaudit.memory.stack_rules`),
    by name; none (the installed stack) leaves the key as it was before there were rules.
    """
    if not cache.enabled():
        return None
    versions = {dist: cache.installed_version(dist) for dist in ("torch", "transformers", "peft")}
    parts: list[Any] = [FORMAT, __version__, versions, config, plan_fields]
    if rules:
        parts.append({"stack_rules": list(rules)})
    return hashlib.sha256(cache.canonical_json(parts).encode()).hexdigest()


def _path(key: str) -> Path:
    return cache.profiles_dir() / f"{key}.json"


def load(key: str) -> Derived | None:
    """The stored profile, or ``None`` if absent or unreadable."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _from_dict(data)
    except Exception:  # an entry we cannot read back is a miss: the store only saves time
        return None


def store(key: str, derived: Derived) -> None:
    """Write the profile atomically; a store that cannot be written is skipped silently."""
    from peftaudit.errors import PeftauditError
    from peftaudit.files import write_atomic
    from peftaudit.render.json import dumps

    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dumps(_to_dict(derived), compact=True))
    except (OSError, PeftauditError):
        pass


def _to_dict(derived: Derived) -> dict[str, Any]:
    profile = derived.profile
    unique: list[Segment] = []
    index: dict[int, int] = {}
    for seg in profile.layers:
        if id(seg) not in index:
            index[id(seg)] = len(unique)
            unique.append(seg)
    return {
        "format": FORMAT,
        "embed": _segment_dict(profile.embed),
        "head": _segment_dict(profile.head),
        "segments": [_segment_dict(s) for s in unique],
        "layers": [index[id(s)] for s in profile.layers],
        "kept": {k: list(v) for k, v in derived.kept.items()},
        "attention": derived.attention,
        "inexact_bytes": derived.inexact_bytes,
    }


def _from_dict(data: Any) -> Derived:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a profile")
    segments = [_segment(s) for s in data["segments"]]
    layers = tuple(segments[int(i)] for i in data["layers"])
    kept = {str(k): tuple(int(i) for i in v) for k, v in data["kept"].items()}
    attention = data["attention"]
    inexact = float(data["inexact_bytes"])
    if not isinstance(attention, str) or not math.isfinite(inexact):
        raise ValueError("not a profile")
    return Derived(StepProfile(_segment(data["embed"]), layers, _segment(data["head"])), kept, attention, inexact)


def _segment_dict(seg: Segment) -> dict[str, Any]:
    return {name: _rows(getattr(seg, name)) for name in ("forward", "backward", "saved")}


def _segment(data: Any) -> Segment:
    if not isinstance(data, dict):
        raise ValueError("not a segment")
    forward, backward, saved = (_compiled(data[name]) for name in ("forward", "backward", "saved"))
    return Segment(forward, backward, saved)


def _rows(events: CompiledEvents) -> list[list[float]]:
    """Each event as ``[category, coefficient per term]`` (one category per event)."""
    coeffs = np.diff(events.running, axis=0, prepend=np.zeros((1, *events.running.shape[1:])))
    rows = []
    for event in coeffs:
        cats = np.flatnonzero(np.any(event != 0, axis=1))
        cat = int(cats[0]) if len(cats) else 0
        rows.append([float(cat), *(float(v) for v in event[cat])])
    return rows


def _compiled(rows: Any) -> CompiledEvents:
    if not isinstance(rows, list):
        raise ValueError("not events")
    coeffs = np.zeros((max(len(rows), 1), len(CATEGORIES), len(TERMS)))
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 1 + len(TERMS):
            raise ValueError("not an event")
        values = [float(v) for v in row]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("not finite")
        cat = int(values[0])
        if not 0 <= cat < len(CATEGORIES):
            raise ValueError("no such category")
        coeffs[i, cat] = values[1:]
    return CompiledEvents.of(coeffs)
