"""Attention windows: where a model's step changes with the sequence length.

Sliding-window (and chunked) attention runs differently once sequences reach
the window: below it transformers skips the window's mask (it is the causal
mask), from it on it builds one. A step profile holds for the lengths on one
side of every window, its *regime*; the traced lengths are chosen inside the
plan's regime, and the regime is part of what a profile is stored under.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

#: The preferred base length of the traced points (the fit makes its value matter little).
BASE_LENGTH = 64


def windows(config: Mapping[str, Any]) -> tuple[int, ...]:
    """Attention windows and chunks anywhere in the config, ascending (``sliding_window``...)."""
    return tuple(sorted(set(_windows(config))))


def _windows(config: Mapping[str, Any]) -> Iterator[int]:
    if config.get("use_sliding_window") is False:  # Qwen2 publishes a window it does not use
        return
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _windows(value)
        elif isinstance(key, str) and ("window" in key or "chunk" in key) and type(value) is int and value > 0:
            yield value


def regime(config: Mapping[str, Any], seq: int) -> tuple[bool, ...]:
    """For each window of the model, whether sequences of ``seq`` tokens reach it."""
    return reached(windows(config), seq)


def reached(model_windows: tuple[int, ...], seq: int) -> tuple[bool, ...]:
    """:func:`regime` for windows already read from the config (estimates for many lengths).

    transformers skips a window's mask only for sequences shorter than the window
    (``kv_length < sliding_window``): a sequence as long as the window builds it.
    """
    return tuple(seq >= w for w in model_windows)


def base_length(config: Mapping[str, Any], seq: int, *, longer_than: int = 0) -> int:
    """A base length ``S`` whose traced lengths ``S`` and ``2S`` share the regime of ``seq``.

    ``seq`` counts every token the layers see; ``longer_than``: the prompt-tuning tokens
    (the traced sequences include them, so ``S`` must leave room for text).
    """
    reached = [w for w in windows(config) if w <= seq]
    beyond = [w for w in windows(config) if w > seq]
    lower = max([*reached, longer_than + 1])  # S reaches every window seq reaches
    upper = (min(beyond) - 1) // 2 if beyond else None  # 2S stays short of the next window
    base = BASE_LENGTH
    while base < lower:
        base *= 2
    if upper is not None and base > upper:
        base = max(lower, upper)  # as long as the regime allows (a narrow one: 2S may cross)
    return base
