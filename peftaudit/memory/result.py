"""The result of an estimate (analytic or traced): components, peak, phase.

Plain data with no heavy imports, so renderers and cached reports can read it
without numpy or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftaudit.memory.plan import PlanWarning

#: Components of an estimate, in the order they are shown. They add up to ``total_bytes``.
COMPONENTS: tuple[str, ...] = (
    "base_weights",
    "quantization_constants",
    "trainable_weights",
    "gradients",
    "optimizer_states",
    "master_weights",
    "reference_weights",
    "weight_copies",
    "activations",
    "kv_cache",
    "logits_and_loss",
    "temporaries",
    "cuda_context",
    "allocator_margin",
)

#: What each component is, for tables and docs.
COMPONENT_HELP: dict[str, str] = {
    "base_weights": "frozen model weights at their storage dtype (packed when quantized), plus buffers",
    "quantization_constants": "absmax / scale tensors and code books of quantized weights",
    "trainable_weights": "weights that train: adapters, trained base weights, modules_to_save copies",
    "gradients": "parameter gradients alive at the peak",
    "optimizer_states": "optimizer moments (Adam m and v, momentum, factored second moments)",
    "master_weights": "fp32 copies of half-precision weights kept by the optimizer (ZeRO)",
    "reference_weights": "the reference model a preference or GRPO objective compares with, when it is a "
    "second copy of the model (full fine-tuning; PEFT disables its adapters instead)",
    "weight_copies": "half-precision casts of weights (autocast) and dequantized or gathered weights",
    "activations": "tensors the forward pass keeps for backward (and forward scratch at the peak)",
    "kv_cache": "keys and values of the prompts and completions GRPO generates, cached for each next token",
    "logits_and_loss": "logits, their fp32 upcast, log-softmax and its gradient (or TRL's fused log-prob head)",
    "temporaries": "gradients of activations in flight and kernel scratch at the peak",
    "cuda_context": "CUDA context, kernels and library workspaces outside PyTorch's allocator",
    "allocator_margin": "caching allocator: the least device memory the step runs in, above the tensors "
    "(block rounding, cached segments, fragmentation)",
}

#: Phases of one step in the order they run: GRPO generates its completions first; the preference
#: objectives' reference (and KTO's KL) forward passes run after the policy's forward, before backward.
PHASES: tuple[str, ...] = ("generation", "forward", "reference forward", "backward", "optimizer step")

#: Where an estimate's activations come from: the hand-written layer program of its model type,
#: a step profile derived from traces of a depth-reduced copy, a Llama-shaped stand-in where even
#: the trace cannot run (the ``approximate-activations`` warning says why), or the trace itself.
ACTIVATION_SOURCES: tuple[str, ...] = ("program", "derived", "stand-in", "trace")

#: Where an estimate's allocator figures come from: a replay of the traced step through the
#: caching-allocator model, factors learned from such replays per plan shape, or the flat
#: fraction the plan gave (``--allocator-margin``) (:mod:`peftaudit.memory.allocator.reserve`).
ALLOCATOR_SOURCES: tuple[str, ...] = ("replay", "learned", "flat")


@dataclass(frozen=True)
class BaseStorage:
    """How the frozen base weights of a checkpoint with a ``quantization_config`` are stored, and why.

    Parameter counts are logical (as published); the bytes follow the format.
    """

    source: str
    """``checkpoint`` (its format), ``dequantized`` (a recipe dequantizes first) or ``override`` (--base-dtype)."""
    quant_method: str
    """The checkpoint's ``quant_method`` (``bitsandbytes``, ``gptq``, ``mxfp4``, ...)."""
    format: str
    """The checkpoint's format in a few words (``bitsandbytes nf4, double quant``)."""
    quantized_params: int
    """Parameters stored packed in this estimate."""
    packed_bytes: int
    """Their packed bytes (their constants are the ``quantization_constants`` component)."""
    constant_bytes: int
    note: str
    """One line: what the estimate assumes and why (shown in the terminal and Markdown)."""
    reference: str | None = None
    """The fine-tuning recipe the assumption follows, where there is one."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "quant_method": self.quant_method,
            "format": self.format,
            "quantized_params": self.quantized_params,
            "packed_bytes": self.packed_bytes,
            "constant_bytes": self.constant_bytes,
            "note": self.note,
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseStorage:
        return cls(
            source=str(data["source"]),
            quant_method=str(data["quant_method"]),
            format=str(data["format"]),
            quantized_params=int(data["quantized_params"]),
            packed_bytes=int(data["packed_bytes"]),
            constant_bytes=int(data["constant_bytes"]),
            note=str(data["note"]),
            reference=None if data.get("reference") is None else str(data["reference"]),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one GPU for one plan, by component.

    ``components`` are the bytes alive at the peak (plus the fixed overheads) and
    add up to ``total_bytes``; ``peak_phase`` is the step where the peak happens.
    """

    method: str
    total_bytes: int
    """Peak per GPU, CUDA context and allocator margin included."""
    components: dict[str, int]
    """Bytes per component at the peak, in :data:`COMPONENTS` order."""
    peak_phase: str
    """One of :data:`PHASES`: ``forward``, ``backward``, ``optimizer step``; objectives add ``generation``
    and ``reference forward``."""
    activations_per_layer: tuple[int, ...] = ()
    """Bytes each layer keeps for backward at the end of the forward pass."""
    phase_peaks: dict[str, int] = field(default_factory=dict)
    """Allocated peak (no context, no margin) of each phase."""
    trainable_params: int = 0
    total_params: int = 0
    plan: dict[str, Any] = field(default_factory=dict)
    """The :class:`TrainingPlan` as a dict."""
    warnings: tuple[PlanWarning, ...] = ()
    source: str = "analytic"
    """``analytic`` or ``trace`` (the fake-tensor oracle)."""
    base_storage: BaseStorage | None = None
    """For a checkpoint with its own ``quantization_config``: how its base weights are stored."""
    activations_source: str = "program"
    """Where the activation side came from: one of :data:`ACTIVATION_SOURCES`."""
    reserved_bytes: int = 0
    """Peak reserved on a GPU with memory to spare: what ``torch.cuda.max_memory_reserved`` shows
    (no CUDA context; nvidia-smi adds it). ``total_bytes`` is less: the least memory the step runs
    in, where the allocator frees its cache and retries before giving up. 0: not known (older JSON)."""
    allocator_source: str = "learned"
    """Where the allocator's figures came from: one of :data:`ALLOCATOR_SOURCES`."""

    @property
    def allocated_bytes(self) -> int:
        """Peak of tensors alone: what ``torch.cuda.max_memory_allocated`` measures."""
        return self.total_bytes - self.components.get("cuda_context", 0) - self.components.get("allocator_margin", 0)

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations_per_layer)

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON data; ``base_storage`` only for checkpoints with a quantization_config."""
        data = {
            "method": self.method,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "components": {k: self.components.get(k, 0) for k in COMPONENTS},
            "peak_phase": self.peak_phase,
            "activations_per_layer": list(self.activations_per_layer),
            "phase_peaks": dict(self.phase_peaks),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "plan": dict(self.plan),
            "warnings": [w.to_dict() for w in self.warnings],
            "source": self.source,
            "activations_source": self.activations_source,
            "reserved_bytes": self.reserved_bytes,
            "allocator_source": self.allocator_source,
        }
        if self.base_storage is not None:
            data["base_storage"] = self.base_storage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryEstimate:
        return cls(
            method=str(data["method"]),
            total_bytes=int(data["total_bytes"]),
            components={k: int(v) for k, v in dict(data["components"]).items()},
            peak_phase=str(data["peak_phase"]),
            activations_per_layer=tuple(int(v) for v in data.get("activations_per_layer", ())),
            phase_peaks={k: int(v) for k, v in dict(data.get("phase_peaks", {})).items()},
            trainable_params=int(data.get("trainable_params", 0)),
            total_params=int(data.get("total_params", 0)),
            plan=dict(data.get("plan", {})),
            warnings=tuple(PlanWarning(w["code"], w["message"]) for w in data.get("warnings", ())),
            source=str(data.get("source", "analytic")),
            base_storage=BaseStorage.from_dict(data["base_storage"]) if data.get("base_storage") else None,
            activations_source=str(data.get("activations_source", "program")),
            reserved_bytes=int(data.get("reserved_bytes", 0)),
            allocator_source=str(data.get("allocator_source", "learned")),
        )
