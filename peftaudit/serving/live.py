"""Serving a live model: its architecture sized as :func:`~peftaudit.serving.estimate.size_serving` sizes any.

What the pytest marker's ``serves=`` asks. A PeftModel's active LoRA adapter is served unmerged, as vLLM's
``--enable-lora`` serves it: one slot at the smallest ``max_lora_rank`` vLLM accepts for the adapter's rank.
"""

from __future__ import annotations

from typing import Any

from peftaudit.serving.estimate import ServingEstimate, size_serving
from peftaudit.serving.plan import AdapterPlan, ServingPlan


def serve_live_model(model: Any, *, gpu: str, **plan: Any) -> ServingEstimate:
    """``model`` served on ``gpu`` (a ``peftaudit gpus`` name) under the :class:`ServingPlan` fields ``plan``
    (``max_model_len``, ``concurrency``, ``precision``, ``tensor_parallel_size``...), the live weights untouched."""
    from peftaudit.gpus.catalog import find_gpu
    from peftaudit.gpus.live import active_peft_config, live_inventory
    from peftaudit.serving.adapters import vllm_max_lora_rank

    inventory, name = live_inventory(model)
    adapter = active_peft_config(model)
    rank = getattr(adapter, "r", None)
    if isinstance(rank, int) and "adapters" not in plan:
        plan["adapters"] = AdapterPlan(max_lora_rank=vllm_max_lora_rank(rank))
    chosen = find_gpu(gpu)
    return size_serving(inventory, ServingPlan(**plan), gpu=chosen.name, total_bytes=chosen.usable_bytes, model=name)


__all__ = ["serve_live_model"]
