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

GaLore (``galore_adamw``, galore-torch 1.0 ``adamw.py`` and ``galore_projector.py``, as transformers'
``optim="galore_adamw"`` builds it): a for-loop over parameters. A targeted m x n weight projects its
gradient with a projector from an SVD of the gradient and keeps ``exp_avg``/``exp_avg_sq`` of the
low-rank gradient (:func:`galore_shapes`); every other parameter is plain Adam of galore-torch's own
(two states; ``exp_avg_sq.sqrt()`` and ``exp_avg / denom`` are temporaries of its size).
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
    low_rank: int = 0
    """GaLore: the projection rank of a targeted weight; 0 for a full-rank (plain) tensor."""
    proj: str = "std"
    """GaLore: the projection type (``proj_type``) of a targeted weight."""

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


def galore_shapes(t: TrainableTensor) -> tuple[tuple[int, int], tuple[tuple[int, int], ...], bool]:
    """GaLore's shapes for a targeted m x n weight (torch's (out, in)): the low-rank gradient (and so
    ``exp_avg`` and ``exp_avg_sq``), the projector matrices, and whether the projector is U's side.

    ``GaLoreProjector.project`` with ``std``: m >= n takes ``Vh[:r, :]`` (r x n) and the gradient becomes
    ``grad @ P.T`` (m x r); m < n takes ``U[:, :r]`` (m x r) and ``P.T @ grad`` (r x n). ``reverse_std`` the
    other way round, ``right``/``left`` always one side, ``full`` both (an r x r gradient). The paper's
    count (Zhao et al. 2024, Table 1: states mr + 2nr for m <= n) is the ``std`` case. A rank above
    min(m, n) keeps min(m, n): the slices ``[:r]`` stop there.
    """
    m, n = t.shape
    r = min(t.low_rank, m, n)
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(t.proj, t.proj)
    if side == "right":
        return (m, r), ((r, n),), False
    if side == "left":
        return (r, n), ((m, r),), True
    return (r, r), ((m, r), (r, n)), True


@dataclass(frozen=True)
class _GaloreStep:
    """One tensor under galore-torch's AdamW: its states and what its step allocates (bytes)."""

    states: int
    projection: int
    """Scratch before the low-rank gradient exists (a target's SVD, on projection-update steps)."""
    update: int
    """Scratch while the update is made: the low-rank temporaries and the full-size update."""
    left: tuple[int, int]
    """What the loop's locals keep of it into the next parameter's step: ``norm_grad`` (the full-size
    update) and ``denom``. ``step`` is one Python loop, so they live until rebound."""


def _galore(t: TrainableTensor) -> _GaloreStep:
    size = nbytes(t.dtype)
    if not t.low_rank or len(t.shape) != 2:
        # exp_avg, exp_avg_sq; denom = exp_avg_sq.sqrt() and exp_avg / denom alive together.
        return _GaloreStep(2 * t.numel * size, 0, 2 * t.numel * size, (t.numel * size, t.numel * size))
    m, n = t.shape
    k = min(m, n)
    r = min(t.low_rank, k)
    low, projectors, left = galore_shapes(t)
    low_numel = math.prod(low)
    full = len(projectors) == 2
    if t.dtype == "fp32":
        # get_orthogonal_matrix returns views of U and Vh (no cast): the whole m x k U or k x n Vh stays.
        projector = 4 * ((m * k if left else 0) + (k * n if full or not left else 0))
    else:
        projector = size * sum(math.prod(p) for p in projectors)  # cast copies of the slices
    # Projection update (step 0 and every update_proj_gap-th step): svd(grad.float()) -> an fp32 copy of
    # a half-precision gradient, U (m x k), S (k), Vh (k x n), diag(S[:r]) and one discarded product
    # (U[:, :r] @ diag or diag @ Vh[:r]), then the new projector's cast copy next to the old projector.
    copy = 4 * m * n if t.dtype != "fp32" else 0
    svd = copy + 4 * (m * k + k + k * n + r * r + max(m, n) * r) + (projector if t.dtype != "fp32" else 0)
    # The step: the low-rank gradient, exp_avg_sq.sqrt() and exp_avg / denom, then project_back's
    # full m x n matmul and its "* scale" copy (param dtype) before p.add_.
    back = 3 * low_numel * size + 2 * m * n * size
    if full:
        back += m * r * size  # U[:, :r] @ low first, then @ Vh[:r]
    return _GaloreStep(2 * low_numel * size + projector, svd, back, (m * n * size, low_numel * size))


def _galore_scratch(items: list[TrainableTensor]) -> int:
    """Peak scratch of one ``GaLoreAdamW.step()``: parameters in transformers' group order (the plain
    group, then the targets), each step's own scratch plus what the previous one left in the locals."""
    ordered = [t for t in items if not t.low_rank] + [t for t in items if t.low_rank]
    peak = 0
    left = (0, 0)
    for t in ordered:
        step = _galore(t)
        # A target's projection runs before its denom and norm_grad rebind the previous ones; a plain
        # parameter's denom rebinds first (then only the previous update is left).
        before = left[0] + left[1] if step.projection else left[0]
        peak = max(peak, step.projection + before, step.update + (0 if step.projection else left[0]))
        left = step.left
    return peak


def galore_in_flight(tensors: Iterable[TrainableTensor]) -> tuple[tuple[int, int], ...]:
    """Layer-wise GaLore (one optimizer per parameter, stepped in its gradient's post-accumulate hook):
    per gradient size in bytes, the largest step scratch of a parameter with a gradient of that size,
    as ``((gradient bytes, scratch bytes), ...)``."""
    most: dict[int, int] = {}
    for t in tensors:
        step = _galore(t)
        size = t.numel * nbytes(t.dtype)
        most[size] = max(most.get(size, 0), step.projection, step.update)
    return tuple(sorted(most.items()))


def optimizer_memory(name: str, impl: str, tensors: Iterable[TrainableTensor]) -> OptimizerMemory:
    """States and step scratch of optimizer ``name`` over ``tensors``."""
    items = list(tensors)
    if name == "none" or not items:
        return OptimizerMemory(0, 0)
    own = [t.numel * nbytes(t.dtype) for t in items]
    largest = max(own)
    if name == "galore_adamw":
        # A Python for-loop over parameters, whatever the plan's optimizer implementation.
        return OptimizerMemory(sum(_galore(t).states for t in items), _galore_scratch(items))
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
