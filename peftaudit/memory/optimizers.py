"""Optimizer state and step scratch per trainable tensor.

Sources: ``torch.optim.AdamW``/``SGD`` create their states with
``torch.zeros_like(param)`` (so in the parameter's dtype); the ``foreach``
implementation allocates one temporary per state list (``_foreach_sqrt`` of
``exp_avg_sq``); the fused kernel none. bitsandbytes' 8-bit optimizers keep
uint8 states with one fp32 absmax per block of 256 (``blocksize=256``) and fall
back to fp32 states for tensors under 4096 elements (``min_8bit_size``); its
32-bit optimizers always keep fp32 states. ``transformers.Adafactor`` keeps
factored fp32 row and column second moments for matrices (and a full one for
vectors) and works on an fp32 copy of each half-precision parameter during its
step. Lion keeps one momentum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from peftaudit.memory.dtypes import nbytes

BNB_MIN_8BIT = 4096
BNB_BLOCK = 256


@dataclass(frozen=True)
class TrainableTensor:
    """One trainable tensor as the optimizer sees it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


@dataclass(frozen=True)
class OptimizerMemory:
    states: int
    """Persistent state bytes."""
    step_temporaries: int
    """Peak scratch during ``optimizer.step()``."""
    paged: bool = False
    """States live in CUDA unified memory and can be evicted to the host under pressure."""


def _bnb_state(t: TrainableTensor, eight_bit: bool) -> int:
    if eight_bit and t.numel >= BNB_MIN_8BIT:
        return t.numel + 4 * math.ceil(t.numel / BNB_BLOCK)
    return 4 * t.numel


def optimizer_memory(name: str, impl: str, tensors: Iterable[TrainableTensor]) -> OptimizerMemory:
    """States and step scratch of optimizer ``name`` over ``tensors``."""
    items = list(tensors)
    if name == "none" or not items:
        return OptimizerMemory(0, 0)
    own = [t.numel * nbytes(t.dtype) for t in items]
    largest = max(own)
    if name == "adamw":
        states = 2 * sum(own)
        return OptimizerMemory(states, _scratch(impl, sum(own), largest))
    if name in ("sgd", "sgd_momentum"):
        states = sum(own) if name == "sgd_momentum" else 0
        return OptimizerMemory(states, 0 if name == "sgd" else _scratch(impl, sum(own), largest, 0))
    if name == "lion":
        # Trainer's "lion_32bit" is bitsandbytes' Lion: one fp32 momentum, fused kernel.
        return OptimizerMemory(sum(_bnb_state(t, False) for t in items), 0)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        states = 2 * sum(_bnb_state(t, True) for t in items)
        return OptimizerMemory(states, 0, paged=name.startswith("paged"))
    if name == "paged_adamw":
        return OptimizerMemory(2 * sum(_bnb_state(t, False) for t in items), 0, paged=True)
    if name == "lion_8bit":
        return OptimizerMemory(sum(_bnb_state(t, True) for t in items), 0)
    if name == "adafactor":
        states = 0
        scratch = 0
        for t in items:
            if len(t.shape) >= 2:
                rows = math.prod(t.shape[:-1])
                cols = math.prod(t.shape[:-2]) * t.shape[-1]
                states += 4 * (rows + cols)
            else:
                states += 4 * t.numel
            # fp32 copies of grad and param, the update and its square, one tensor at a time.
            fp32_copies = (2 if t.dtype != "fp32" else 0) + 2
            scratch = max(scratch, 4 * t.numel * fp32_copies)
        return OptimizerMemory(states, scratch)
    raise ValueError(f"unknown optimizer {name!r}")


def _scratch(impl: str, total: int, largest: int, per_state: int = 1) -> int:
    if impl == "fused":
        return 0
    if impl == "foreach":
        return per_state * total
    return per_state * largest
