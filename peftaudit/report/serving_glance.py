"""The default report's serving answer at a glance: how many GPUs of each class serve the model, and how much.

The training glance's GPU classes (:data:`peftaudit.report.glance.GPU_CLASSES`) each serve the model as vLLM
does at its defaults (:func:`peftaudit.serving.estimate.rank_gpus`, the same answer ``peftaudit serve``
gives), at :data:`CONTEXT` tokens per sequence (the model's own maximum when shorter), with the weights as the
checkpoint stores them and as AWQ 4-bit. Plain data the report carries (``Glance.serving``) and its HTML and
JSON show; nothing here renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

#: Tokens per sequence the glance serves at (the model's maximum when shorter).
CONTEXT = 8192
#: The weights' precisions of the glance: as the checkpoint stores them, and 4-bit AWQ.
PRECISIONS: tuple[str, ...] = ("auto", "awq")


@dataclass(frozen=True)
class ServingRow:
    """One precision on one GPU class: the fewest GPUs that serve a sequence of the context, and how many."""

    precision: str
    label: str
    """What the weights are stored as (``bf16 (the checkpoint's dtype)``, ``AWQ 4-bit, group 128``)."""
    class_gb: int
    gpu: str
    gpus: int
    """Tensor-parallel size: the fewest of 1, 2, 4, 8 that serve one sequence (8 when none does)."""
    fits: bool
    weights_bytes: int
    """Weights per GPU (vLLM's rotary cache included)."""
    kv_cache_tokens: int
    """vLLM's "GPU KV cache size"."""
    sequences: int
    """Sequences of the context served at once (vLLM's max concurrency, at most ``max_num_seqs``)."""


@dataclass(frozen=True)
class ServingGlance:
    """Serving on the GPU classes at vLLM's defaults: rows per precision and class, or why there are none."""

    context: int
    accounting: str
    """The vLLM releases whose start-up accounting the rows follow, in words."""
    plan: dict[str, Any]
    """The serving plan every row shares (``ServingPlan.to_dict()`` without ``precision``)."""
    rows: tuple[ServingRow, ...] = ()
    unavailable: str | None = None
    """Why the model is not sized for serving (not a generative model, an architecture vLLM does not run)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "unavailable": self.unavailable,
            "context": self.context,
            "accounting": self.accounting,
            "plan": dict(self.plan),
            "rows": [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServingGlance:
        return cls(
            context=int(data["context"]),
            accounting=str(data["accounting"]),
            plan=dict(data["plan"]),
            rows=tuple(ServingRow(**row) for row in data["rows"]),
            unavailable=data.get("unavailable"),
        )


def serving_glance(inventory: Inventory, *, model_id: str) -> ServingGlance:
    """Serve ``inventory``'s model on each GPU class at each of :data:`PRECISIONS`."""
    from peftaudit.errors import PeftauditError
    from peftaudit.report.glance import gpu_classes
    from peftaudit.serving.engine import release
    from peftaudit.serving.estimate import rank_gpus
    from peftaudit.serving.plan import ServingPlan

    context = min(CONTEXT, inventory.dims.max_position_embeddings or CONTEXT)
    base = ServingPlan(max_model_len=context)
    shared = {k: v for k, v in base.to_dict().items() if k != "precision"}
    classes = gpu_classes()
    accounting = release(base.vllm_version).covers
    rows: list[ServingRow] = []
    for precision in PRECISIONS:
        try:
            sized = rank_gpus(
                inventory,
                base.with_(precision=precision),
                [(g.name, g.usable_bytes) for _, g in classes],
                model=model_id,
            )
        except PeftauditError as exc:
            if not rows:
                return ServingGlance(context=context, accounting=accounting, plan=shared, unavailable=str(exc))
            continue  # a precision this model cannot take (AWQ of a checkpoint already quantized, say)
        rows += [
            ServingRow(
                precision=precision,
                label=e.weights_label,
                class_gb=gb,
                gpu=e.gpu,
                gpus=e.tensor_parallel,
                fits=e.fits,
                weights_bytes=e.weights_bytes,
                kv_cache_tokens=e.kv_cache_tokens,
                sequences=e.served_concurrency if e.starts else 0,
            )
            for (gb, _), e in zip(classes, sized, strict=True)
        ]
    return ServingGlance(context=context, accounting=accounting, plan=shared, rows=tuple(rows))


__all__ = ["CONTEXT", "PRECISIONS", "ServingGlance", "ServingRow", "serving_glance"]
