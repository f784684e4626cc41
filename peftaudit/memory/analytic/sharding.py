"""Dividing static memory across GPUs: DDP, ZeRO-1/2/3, FSDP, and CPU offload.

What each strategy keeps on one GPU (N = GPUs sharing the shards):

* ``ddp``: a full replica, plus DDP's gradient buckets: with PyTorch's default
  ``gradient_as_bucket_view=False`` the buckets are a second copy of all
  gradients, kept for the whole run.
* ``zero1``: optimizer states (and fp32 master weights) / N.
* ``zero2``: also gradients / N (reduce-scattered per bucket).
* ``zero3`` and ``fsdp``: also parameters / N; the weights of the layer being
  computed are gathered, and the next one prefetched (two layers in flight).
* ``fsdp-hybrid``: as ``fsdp`` inside one node (N = GPUs per node), replicated
  across nodes.
* ``offload``: optimizer states and master weights (``optimizer``) and/or
  parameters (``parameters``, sharded strategies only) live in host memory.

DeepSpeed keeps fp32 master weights in the optimizer when the model trains in
half precision (``bf16``/``fp16`` plans under ZeRO); FSDP with fp32 parameters
(``*-mixed`` plans) has them as the parameters themselves.

A weight the step gives no gradient (a multimodal model's vision tower in a
text-only step, :mod:`~peftaudit.memory.reached`) has none under DDP and FSDP,
and torch's optimizers keep no state for it; DDP's buckets, and DeepSpeed's
flat gradient and optimizer partitions, are allocated for every trainable weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftaudit.memory.plan import PlanWarning, TrainingPlan

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.analytic.layout import ModelLayout
    from peftaudit.memory.analytic.static import Static


@dataclass(frozen=True)
class PerGpu:
    """Static memory on one GPU after sharding and offload."""

    base_weights: int
    quantization_constants: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    master_weights: int
    optimizer_step_scratch: int
    gathered_weights: int
    """ZeRO-3/FSDP: full weights of the layers being computed (current and prefetched)."""
    persistent_grad_buffers: int
    """DDP's gradient buckets (a second copy of the gradients)."""
    gradient_fraction: float
    """Share of each gradient a GPU keeps after reduce-scatter (1 without gradient sharding)."""
    warnings: tuple[PlanWarning, ...] = field(default_factory=tuple)


def per_gpu(plan: TrainingPlan, static: Static, layout: ModelLayout) -> PerGpu:
    s = plan.sharding
    n = plan.gpus if s != "fsdp-hybrid" else min(plan.gpus, plan.gpus_per_node)
    shard_opt = s in ("zero1", "zero2", "zero3", "fsdp", "fsdp-hybrid")
    shard_grad = s in ("zero2", "zero3", "fsdp", "fsdp-hybrid")
    shard_param = s in ("zero3", "fsdp", "fsdp-hybrid")
    half_weights = plan.weight_dtype != "fp32"
    master = 0
    deepspeed = s.startswith("zero")
    # DeepSpeed steps flat partitions of every trainable weight, reached by the step or not.
    states = static.flat_optimizer_states if deepspeed else static.optimizer_states
    if deepspeed and half_weights and plan.training:
        # DeepSpeed's optimizer keeps an fp32 copy of every trainable half-precision weight,
        # and steps it: its states are fp32 too.
        master = 2 * static.trainable_weights
        states = static.optimizer_states_fp32
    div = float(n) if shard_opt else 1.0
    states_gpu = int(states / div)
    master_gpu = int(master / div)
    offload_opt = plan.offload in ("optimizer", "both")
    offload_param = plan.offload in ("parameters", "both")
    if offload_opt:
        states_gpu = master_gpu = 0
    # ZeRO-2/3 reduce into gradient partitions of every trainable weight (zeros where none came).
    grad_bytes = static.flat_gradients if s in ("zero2", "zero3") else static.gradients
    grads = int(grad_bytes / (n if shard_grad else 1))
    base = static.base_weights
    consts = static.quantization_constants
    trainable = static.trainable_weights
    gathered = 0
    if shard_param:
        base, consts, trainable = int(base / n), int(consts / n), int(trainable / n)
        # The layer being computed and the prefetched next one are unsharded.
        gathered = 2 * static.largest_layer_params
        if offload_param:
            base = consts = trainable = 0
    buckets = static.flat_gradients if s == "ddp" else 0
    scratch = 0 if offload_opt else int(static.optimizer_step_scratch / div)
    return PerGpu(
        base_weights=base,
        quantization_constants=consts,
        trainable_weights=trainable,
        gradients=grads,
        optimizer_states=states_gpu,
        master_weights=master_gpu,
        optimizer_step_scratch=scratch,
        gathered_weights=gathered,
        persistent_grad_buffers=buckets,
        gradient_fraction=1.0 / n if shard_grad else 1.0,
    )
