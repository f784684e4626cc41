"""The estimate of every catalog model against a fake-tensor trace, for three plan shapes.

Shared by ``tests/memory/test_memory_derived_catalog.py`` (one model per family) and
``benchmarks/bench_derived.py`` (the whole catalog, figures for docs/memory.md).

Each model is checked on a copy cut to :data:`CHECK_DEPTH` layers per stack
(:func:`memory_models.reduced_config`), because a full-depth trace of a 70B or
671B model takes minutes on two cores: the copy has every kind of layer the
model has (sliding and global attention, dense and MoE layers) and more layers
than the profile derives from, so the estimate replays layers it never traced.
The check runs at a batch and sequence length the derivation was not fitted on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

from memory_models import DEPTH_KEYS, reduced_config

CHECK_DEPTH = 8
TOLERANCE = 0.03
CHECK_BATCH = 3

#: The plan shapes of issue 13. ZeRO-3 cannot be traced (the trace is one GPU): its per-GPU
#: activations are the single-GPU step's, so the full step is traced on one GPU and ZeRO-3's
#: own estimate is checked to come from the same derived profile.
SHAPES: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "qlora-ckpt": {"method": "qlora", "gradient_checkpointing": True},
    "full-zero3-8": {"method": "full"},
}

#: Vision models: their step takes images only (tests/memory/test_memory_images.py checks them).
NOT_TEXT = {"vit", "convnext", "dinov2", "clip", "swin"}


@dataclass(frozen=True)
class Comparison:
    """One model and plan shape: the estimate, the trace, and how far apart."""

    model: str
    shape: str
    estimate_bytes: int
    trace_bytes: int | None
    seconds: float
    """Time of the first estimate (deriving the profile, when the model has no program)."""
    warnings: tuple[str, ...]
    skipped: str = ""
    """Why the trace could not run (the estimate's own warning says the same)."""

    @property
    def error(self) -> float:
        assert self.trace_bytes
        return self.estimate_bytes / self.trace_bytes - 1.0


def catalog_configs() -> dict[str, dict[str, Any]]:
    """Catalog id -> config of every text model in the catalog."""
    from peftaudit.sources.catalog import entries

    return {e.id: e.config for e in entries() if e.config.get("model_type") not in NOT_TEXT}


def explicit_depths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the depth of every sub-config that leaves it implicit written out.

    LLaVA's ``text_config`` names only its model type: transformers builds LlamaConfig's default
    32 layers, which :func:`memory_models.reduced_config` (cutting the depth keys a config has)
    would leave at 32, tracing four times the layers of every other model's copy.
    """
    from transformers import AutoConfig

    out = dict(config)
    for key, value in config.items():
        if not (key.endswith("_config") and isinstance(value, dict) and "model_type" in value):
            continue
        if any(k in value for k in DEPTH_KEYS):
            continue
        default = AutoConfig.for_model(value["model_type"])
        name = next((k for k in DEPTH_KEYS if isinstance(getattr(default, k, None), int)), None)
        if name is not None:
            out[key] = {**value, name: getattr(default, name)}
    return out


def one_per_family() -> list[str]:
    """The first catalog id of each model type (what CI checks)."""
    seen: dict[str, str] = {}
    for model_id, config in catalog_configs().items():
        seen.setdefault(str(config["model_type"]), model_id)
    return sorted(seen.values())


def compare(model_id: str, shape: str) -> Comparison:
    """Estimate and trace the depth-reduced copy of ``model_id`` under plan shape ``shape``."""
    from peftaudit.inventory import take_inventory
    from peftaudit.memory import TrainingPlan, estimate, trace
    from peftaudit.memory.derived.derivation import base_length
    from peftaudit.sources.build import build_from_config

    config = reduced_config(explicit_depths(catalog_configs()[model_id]), CHECK_DEPTH)
    seq = base_length(config, 0) * 3 // 2  # past every attention window, and not a fitted point
    plan = TrainingPlan(batch_size=CHECK_BATCH, seq_len=seq, **SHAPES[shape])
    inventory = take_inventory(build_from_config(config, model_id=model_id))
    started = time.perf_counter()
    estimated = estimate(inventory, plan)
    seconds = time.perf_counter() - started
    codes = tuple(w.code for w in estimated.warnings)
    if shape == "full-zero3-8":
        sharded = estimate(inventory, replace(plan, sharding="zero3", gpus=8))
        assert "approximate-activations" not in [w.code for w in sharded.warnings]
    traced_plan = plan
    if "attention-unsupported" in codes:
        traced_plan = replace(plan, attention="eager")  # what the estimate says the model runs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = trace(build_from_config(config, model_id=model_id), traced_plan)
    except Exception as exc:  # the trace runs the real libraries: what they refuse, we report
        return Comparison(model_id, shape, estimated.allocated_bytes, None, seconds, codes, f"{exc}"[:200])
    return Comparison(model_id, shape, estimated.allocated_bytes, traced.allocated_bytes, seconds, codes)
