"""What the caching allocator holds above the allocated peak, for an analytic estimate.

An analytic estimate knows the bytes tensors hold at the peak, not the order they come and go
in, so it cannot replay the step through :mod:`peftaudit.memory.allocator` itself. It learns
instead: ``benchmarks/learn_allocator.py`` traces training steps of Llama-shaped models (several
depths, token counts and methods), replays each through the allocator model, and fits, per plan
shape (:func:`plan_shape`), how much the allocator holds above the allocated peak as a
non-negative combination of four things the estimate has (:data:`FEATURES`). The coefficients
are data (``factors.json``, written by that script, with the fit's worst miss per shape); this
module only applies them.

Two figures come out (:class:`Overheads`):

* ``reserved``: peak reserved minus peak allocated with memory to spare, what
  ``torch.cuda.max_memory_reserved`` and nvidia-smi show above the tensors on a large GPU;
* ``capacity``: the smallest device memory the step runs in, minus the allocated peak: under a
  limit the allocator frees its cached blocks and retries before it raises out-of-memory, so a
  step runs in less than it reserves where memory is plentiful. ``fit``, ``gpus`` and
  ``recommend`` decide with this one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.plan import TrainingPlan

GIB = 1 << 30

#: What the fit combines, each in GiB: activations kept for backward (the sum over layers),
#: logits and loss at the peak, the rest of the step's working set there (what comes and goes:
#: scratch, recomputed layers, gradients of activations), parameter gradients, and what is
#: allocated once and kept (weights, optimizer states). Logits are apart because they come in a
#: few tensors of the vocabulary's width, which the layers' own requests can reuse only by
#: splitting them. Every feature scales with the model: a 110M-parameter model gets no share of
#: a 7B one's overhead.
FEATURES: tuple[str, ...] = ("saved", "logits", "transient", "gradients", "static")

#: Components that are allocated once and kept: they come from the static side of the estimate.
STATIC: tuple[str, ...] = (
    "base_weights",
    "quantization_constants",
    "trainable_weights",
    "optimizer_states",
    "master_weights",
)
#: Components of the step's working set (:data:`STATIC` and these add up to the allocated peak).
WORKING: tuple[str, ...] = ("weight_copies", "activations", "logits_and_loss", "temporaries")

#: The steps traced for ``--lengths varied``, as fractions of ``seq_len``: the first allocates the
#: optimizer states, the last three give every allocation's size as a function of the length, from
#: which :mod:`.lengths` makes the long run the reserve is replayed over. Their own replay (ever
#: longer batches, each finding the blocks the shorter ones cached too small) gives the least
#: capacity; the last step is the longest, whose activations the estimate has.
VARIED: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Overheads:
    """Bytes the allocator holds above the allocated peak."""

    reserved: int
    """With memory to spare: ``max_memory_reserved`` minus ``max_memory_allocated``."""
    capacity: int
    """The smallest device memory the step runs in, minus the allocated peak."""
    source: str
    """``replay`` (the trace's own), ``learned`` (:data:`factors.json`) or ``flat`` (``--allocator-margin``)."""


def method_class(plan: TrainingPlan, quantized: bool = False) -> str:
    """``full`` (every weight trains), ``qlora`` (quantized frozen base) or ``lora`` (adapters on a 16-bit base).

    ``quantized``: the estimate stores frozen weights quantized whatever the method says (a
    checkpoint's own ``quantization_config``: LoRA on a 4-bit checkpoint is QLoRA).
    """
    from peftaudit.memory.plan import GALORE_METHOD_NAMES

    if plan.method in ("full", "freeze", *GALORE_METHOD_NAMES):
        return "full"
    if quantized or plan.method in ("qlora", "lora-8bit") or plan.base_dtype in ("nf4", "fp4", "int8"):
        return "qlora"
    return "lora"


def plan_shape(plan: TrainingPlan, quantized: bool = False) -> str:
    """The key the factors are learned under: method class, checkpointing, lengths, segments."""
    return "/".join(
        (
            method_class(plan, quantized),
            "checkpointing" if plan.gradient_checkpointing else "no-checkpointing",
            plan.lengths,
            "expandable" if plan.expandable_segments else "segments",
        )
    )


def step_lengths(plan: TrainingPlan) -> tuple[int, ...]:
    """The sequence length of each traced step: two of ``seq_len``, or :data:`VARIED`'s four."""
    if plan.lengths != "varied":
        return (plan.seq_len, plan.seq_len)
    # Rounded up to a multiple of 8 (what padding to pad_to_multiple_of=8 gives), never past seq_len.
    return tuple(min(plan.seq_len, max(8, -(-round(plan.seq_len * f) // 8) * 8)) for f in VARIED)


def features(components: Mapping[str, float], activations_per_layer: Sequence[float]) -> tuple[float, ...]:
    """:data:`FEATURES` of an estimate's peak (its tensor components, no context or margin), in GiB."""
    saved = float(sum(activations_per_layer))
    logits = float(components.get("logits_and_loss", 0))
    working = sum(float(components.get(k, 0)) for k in WORKING)
    gradients = float(components.get("gradients", 0))
    static = sum(float(components.get(k, 0)) for k in STATIC)
    return (saved / GIB, logits / GIB, max(0.0, working - saved - logits) / GIB, gradients / GIB, static / GIB)


@cache
def factors() -> dict[str, dict[str, list[float]]]:
    """Plan shape -> ``{"reserved": coefficients, "capacity": coefficients}`` (GiB per GiB of each feature)."""
    text = resources.files("peftaudit.memory.allocator").joinpath("factors.json").read_text(encoding="utf-8")
    return {shape: dict(entry) for shape, entry in json.loads(text)["shapes"].items()}


def flat(plan: TrainingPlan, allocated: float) -> Overheads | None:
    """``--allocator-margin``: both figures a flat fraction of the allocated peak; ``None`` when not given."""
    if plan.allocator_fraction is None:
        return None
    margin = round(allocated * plan.allocator_fraction)
    return Overheads(margin, margin, "flat")


def learned(plan: TrainingPlan, components: Mapping[str, float], activations_per_layer: Sequence[float]) -> Overheads:
    """The allocator's overheads for an analytic estimate of ``plan`` (module docstring).

    ``plan.allocator_fraction``, when given, replaces the learned figures with that fraction of
    the allocated peak (both figures).
    """
    given = flat(plan, sum(float(v) for k, v in components.items() if k not in ("cuda_context", "allocator_margin")))
    if given is not None:
        return given
    x = features(components, activations_per_layer)
    quantized = components.get("quantization_constants", 0) > 0  # only quantized weights have constants
    shapes = [plan_shape(plan, quantized)]
    if plan.lengths == "varied":
        # Varied batches run the longest one too, after a history that lays blocks out differently (the
        # replay's least capacity moves either way with it): decide with the larger of the two fits.
        shapes.append(plan_shape(replace(plan, lengths="fixed"), quantized))
    reserved = max(_dot(factors()[shape]["reserved"], x) for shape in shapes)
    capacity = max(_dot(factors()[shape]["capacity"], x) for shape in shapes)
    # The smallest capacity never passes what is reserved with memory to spare (allocator/replay.py).
    return Overheads(round(reserved), round(min(capacity, reserved)), "learned")


def _dot(coefficients: Sequence[float], x: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(coefficients, x, strict=True)) * GIB
