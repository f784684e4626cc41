"""The analytic estimate: peak memory per GPU for one model under one training plan.

:func:`estimate` is pure: an :class:`~peftaudit.inventory.Inventory` and a
:class:`~peftaudit.memory.plan.TrainingPlan` in, a frozen
:class:`MemoryEstimate` out. Its parts:

* static memory from the inventory and the method's adaptation (weights at
  their storage dtype, quantization constants, trainable weights, gradients,
  optimizer states, master weights), divided across GPUs as the sharding says
  (:mod:`peftaudit.memory.sharding`);
* the activation side from the layer programs replayed on tapes
  (:mod:`peftaudit.memory.simulate`), which gives the peak of the forward and
  backward passes and what is alive at that moment;
* the optimizer step (gradients, states and the step's scratch);
* the CUDA context and the caching allocator's slack, as explicit components.

The step is recorded once per (model, plan shape) and cached; another batch
size or sequence length only re-evaluates the recording, which takes tens of
microseconds.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Any

from peftaudit.inventory import Inventory, ParameterRecord
from peftaudit.memory import sharding
from peftaudit.memory.dtypes import fp8_bytes, int8_bytes, nbytes, nf4_bytes
from peftaudit.memory.families import Shape
from peftaudit.memory.graph import CATEGORIES
from peftaudit.memory.layout import ModelLayout, SyntheticLayout, layer_indices, main_block, shape_of
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.ops import Context
from peftaudit.memory.optimizers import TrainableTensor, optimizer_memory
from peftaudit.memory.plan import PlanError, PlanWarning, TrainingPlan
from peftaudit.memory.result import COMPONENT_HELP, COMPONENTS, PHASES, MemoryEstimate
from peftaudit.memory.simulate import StepProfile, record_step, walk

# --- static memory -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Static:
    base_weights: int
    quantization_constants: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    optimizer_step_scratch: int
    master_weights: int
    optimizer_states_fp32: int
    """States when the optimizer steps fp32 master copies (DeepSpeed ZeRO with half weights)."""
    trainable_params: int
    paged_optimizer: bool
    largest_layer_params: int
    """Bytes of the largest layer's weights (ZeRO-3/FSDP gather one or two of these)."""


def static_memory(inventory: Inventory, plan: TrainingPlan, adaptation: Adaptation, layout: ModelLayout) -> Static:
    """Weights, gradients and optimizer states, per model replica (before sharding)."""
    from peftaudit.memory.targets import output_head_path

    head = output_head_path(inventory)
    quantizable = layout._quantizable  # modules bitsandbytes would convert
    quant = adaptation.quantization
    base = consts = trainable_bytes = 0
    tensors: list[TrainableTensor] = []
    trainable_params = 0
    per_layer: dict[int, int] = {}
    for p in inventory.parameters:
        trains = p.name in adaptation.trainable or _in_saved(p, adaptation)
        dtype = layout._dense_dtype(trains)
        if trains:
            size = p.numel * nbytes(dtype)
            trainable_bytes += size
            tensors.append(TrainableTensor(p.shape, dtype))
            trainable_params += p.numel
            if _in_saved(p, adaptation) and p.name not in adaptation.trainable:
                base += size  # the frozen original stays next to the trained copy
        elif quant is not None and p.module in quantizable and not p.is_bias and len(p.shape) == 2 and p.module != head:
            size, c = _quantized(quant, p, plan)
            base += size
            consts += c
        else:
            size = p.numel * nbytes(dtype)
            base += size
        if p.layer is not None:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + size
    base += sum(b.numel * nbytes(_short(b.dtype)) for b in inventory.buffers)
    adapter_dtype = plan.weight_dtype if plan.adapter_dtype == "auto" else plan.adapter_dtype
    for a in adaptation.adapters:
        n = a.params
        trainable_bytes += n * nbytes(adapter_dtype)
        trainable_params += n
        if a.kind == "ia3":
            tensors.append(TrainableTensor((n,), adapter_dtype))
        else:
            tensors.append(TrainableTensor((a.rank * a.num_experts, a.in_features), adapter_dtype))
            tensors.append(TrainableTensor((a.out_features, a.rank * a.num_experts), adapter_dtype))
    if adaptation.prompt_params:
        dtype = layout._dense_dtype(True)
        trainable_bytes += adaptation.prompt_params * nbytes(dtype)
        trainable_params += adaptation.prompt_params
        tensors.append(TrainableTensor((adaptation.prompt_params,), dtype))
    if not plan.training:
        return Static(
            base, consts, trainable_bytes, 0, 0, 0, 0, 0, trainable_params, False, max(per_layer.values(), default=0)
        )
    grads = sum(t.numel * nbytes(t.dtype) for t in tensors)
    opt = optimizer_memory(plan.optimizer, plan.optimizer_impl, tensors)
    # DeepSpeed's mixed-precision optimizer steps fp32 master weights, so there its states are fp32.
    opt32 = optimizer_memory(plan.optimizer, plan.optimizer_impl, [TrainableTensor(t.shape, "fp32") for t in tensors])
    return Static(
        base_weights=base,
        quantization_constants=consts,
        trainable_weights=trainable_bytes,
        gradients=grads,
        optimizer_states=opt.states,
        optimizer_step_scratch=opt.step_temporaries,
        master_weights=0,
        optimizer_states_fp32=opt32.states,
        trainable_params=trainable_params,
        paged_optimizer=opt.paged,
        largest_layer_params=max(per_layer.values(), default=0),
    )


def _short(dtype: str) -> str:
    from peftaudit.memory.dtypes import short

    return short(dtype)


def _in_saved(p: ParameterRecord, adaptation: Adaptation) -> bool:
    return any(p.module == s.path or p.module.startswith(s.path + ".") for s in adaptation.saved)


def _quantized(quant: str, p: ParameterRecord, plan: TrainingPlan) -> tuple[int, int]:
    if quant in ("nf4", "fp4"):
        return nf4_bytes(p.numel, double_quant=plan.double_quant)
    if quant == "int8":
        return int8_bytes(p.numel, p.shape[0])
    return fp8_bytes(p.shape[0], p.shape[1])


# --- the step ----------------------------------------------------------------------------------------

_PROFILES: dict[int, tuple[weakref.ref[Inventory], dict[tuple[Any, ...], Any]]] = {}


_NOT_IN_PROFILE = {
    "batch_size",
    "seq_len",
    "gpus",
    "gpus_per_node",
    "sharding",
    "offload",
    "cuda_context_bytes",
    "allocator_fraction",
    "optimizer_impl",
}
_PROFILE_FIELDS = tuple(f.name for f in dataclass_fields(TrainingPlan) if f.name not in _NOT_IN_PROFILE)


def _profile_key(plan: TrainingPlan) -> tuple[Any, ...]:
    """Plan fields that change the recorded step (batch, sequence and scale-out do not)."""
    return tuple(getattr(plan, name) for name in _PROFILE_FIELDS)


def _cached(inventory: Inventory, key: tuple[Any, ...]) -> dict[tuple[Any, ...], Any]:
    entry = _PROFILES.get(id(inventory))
    if entry is None or entry[0]() is not inventory:
        store: dict[tuple[Any, ...], Any] = {}
        key_id = id(inventory)
        profiles = _PROFILES  # the closure keeps the dict, which may outlive module globals at exit
        ref = weakref.ref(inventory, lambda _r: profiles.pop(key_id, None))
        _PROFILES[key_id] = (ref, store)
        return store
    return entry[1]


def _prepare(
    inventory: Inventory, plan: TrainingPlan
) -> tuple[Adaptation, ModelLayout, Static, StepProfile, list[PlanWarning], int]:
    from peftaudit.plugins import memory_methods

    key = _profile_key(plan)
    store = _cached(inventory, key)
    hit = store.get(key)
    if hit is not None:
        return hit
    method = memory_methods()[plan.method]
    adaptation = method.adapt(inventory, plan)
    block = main_block(inventory)
    shape, warnings = shape_of(inventory, block)
    layout = ModelLayout(inventory, plan, adaptation, shape, block)
    static = static_memory(inventory, plan, adaptation, layout)
    adapter_dtype = plan.weight_dtype if plan.adapter_dtype == "auto" else plan.adapter_dtype

    def make_ctx() -> Context:
        return Context(
            compute=plan.compute_dtype,
            autocast=plan.autocast,
            adapter_dtype=adapter_dtype,
            dropout=plan.dropout,
            training=plan.training,
        )

    ids = layer_indices(inventory, block)

    def record(layout: ModelLayout, shape: Shape) -> StepProfile:
        signature = _layer_signatures(layout, ids)
        return record_step(
            shape,
            layout,
            make_ctx,
            layer_ids=ids,
            layer_key=signature.__getitem__,
            attention=plan.attention,
            checkpointing=plan.gradient_checkpointing and plan.training,
            input_grad=adaptation.virtual_tokens > 0,
            loss=plan.loss,
            virtual=adaptation.virtual_tokens,
            accumulate=plan.gradient_accumulation > 1,
            training=plan.training,
        )

    try:
        profile = record(layout, shape)
    except (KeyError, PlanError):
        # A layout no program reads (fused qkv_proj, encoder-decoder, other expert layouts):
        # replay a Llama-shaped layer of the same size instead, and say so.
        generic = replace(shape, family="llama", experts=0, qk_norm=False)
        profile = record(SyntheticLayout(inventory, plan, adaptation, generic, block), generic)
        if not any(w.code == "approximate-activations" for w in warnings):
            warnings.append(
                PlanWarning(
                    "approximate-activations",
                    f"no layer program reads this {inventory.architecture}'s layers: activations use a "
                    "Llama-shaped layer of the same size",
                )
            )
    warnings = warnings + _warnings(inventory, plan, adaptation)
    result = (adaptation, layout, static, profile, warnings, inventory.total)
    store[key] = result
    return result


def _layer_signatures(layout: ModelLayout, ids: list[int]) -> dict[int, Any]:
    """What makes layers differ for the programs (adapter paths name the layer; shapes do not)."""
    roles = sorted({role for (layer, role) in layout._roles if layer is not None})
    sig: dict[int, Any] = {}
    for i in ids:
        specs = tuple(_spec_key(layout.linear(i, r)) for r in (*roles, "router"))
        weights = tuple(
            layout.weight(i, r) for r in ("input_norm", "post_norm", "ln_1", "ln_2", "attention_norm", "output_norm")
        )
        experts: tuple[Any, ...] = ()
        if layout.shape.experts:
            experts = tuple(layout.expert_weight(i, n) for n in ("gate_up_proj", "down_proj"))
        sig[i] = (specs, weights, experts)
    return sig


def _spec_key(spec: Any) -> Any:
    if spec is None or spec.adapter is None:
        return spec
    a = spec.adapter
    return (replace(spec, adapter=None), a.kind, a.rank, a.in_features, a.out_features, a.num_experts, a.feedforward)


def _plan_warnings(plan: TrainingPlan) -> list[PlanWarning]:
    """Warnings that depend on the scale-out fields (not cached with the recorded step)."""
    if plan.sharding == "zero3" and plan.gpus == 1 and plan.offload == "none":
        return [
            PlanWarning(
                "zero3-single-gpu", "ZeRO-3 on one GPU with nothing offloaded saves no memory; it only adds gathers"
            )
        ]
    return []


def _warnings(inventory: Inventory, plan: TrainingPlan, adaptation: Adaptation) -> list[PlanWarning]:
    """Warnings about the model under the method (cached with the recorded step)."""
    out: list[PlanWarning] = []
    if adaptation.quantization in ("nf4", "fp4", "int8") and any(
        p.kind == "experts" and len(p.shape) == 3 for p in inventory.parameters
    ):
        out.append(
            PlanWarning(
                "experts-not-quantized",
                "bitsandbytes quantizes nn.Linear layers only; this model's fused expert weights stay 16-bit",
            )
        )
    if plan.gradient_checkpointing and not plan.training:
        out.append(
            PlanWarning("checkpointing-without-training", "gradient checkpointing has no effect without training")
        )
    if adaptation.quantization is not None and plan.precision in ("fp32", "bf16-mixed", "fp16-mixed"):
        out.append(
            PlanWarning(
                "quantized-with-fp32",
                f"a {adaptation.quantization} base with {plan.precision} precision keeps unquantized weights in fp32",
            )
        )
    return out


def estimate(inventory: Inventory, plan: TrainingPlan | None = None) -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step of ``inventory`` under ``plan``."""
    plan = plan or TrainingPlan()
    plan.validate()
    adaptation, layout, static, profile, warnings, total_params = _prepare(inventory, plan)
    virtual = adaptation.virtual_tokens
    seq = plan.seq_len + virtual
    tokens = float(plan.batch_size * seq)
    tokens_seq = tokens * seq
    result = walk(profile, tokens, tokens_seq, backward=plan.training)
    shard = sharding.per_gpu(plan, static, layout)
    cat = {name: i for i, name in enumerate(CATEGORIES)}

    # Static part alive in the forward/backward passes.
    grads_during = shard.gradients if plan.gradient_accumulation > 1 else 0
    base_static = {
        "base_weights": shard.base_weights,
        "quantization_constants": shard.quantization_constants,
        "trainable_weights": shard.trainable_weights,
        "optimizer_states": shard.optimizer_states,
        "master_weights": shard.master_weights,
        "gradients": grads_during + shard.persistent_grad_buffers,
        "weight_copies": shard.gathered_weights,
    }
    candidates: dict[str, dict[str, float]] = {}
    for phase, (_, parts) in result.phases.items():
        comp = {k: float(v) for k, v in base_static.items()}
        for name in ("activations", "logits_and_loss", "weight_copies", "temporaries"):
            comp[name] = comp.get(name, 0.0) + parts[cat[name]]
        grads = parts[cat["gradients"]] * shard.gradient_fraction
        if plan.gradient_accumulation > 1:
            grads = 0.0  # already counted in full above; backward only adds in place
        comp["gradients"] += grads
        candidates[phase] = comp
    if plan.training:
        step = {k: float(v) for k, v in base_static.items()}
        step["gradients"] = float(shard.gradients + shard.persistent_grad_buffers)
        step["temporaries"] = float(shard.optimizer_step_scratch)
        step["weight_copies"] = 0.0
        candidates["optimizer step"] = step
    phase_peaks = {phase: int(sum(c.values())) for phase, c in candidates.items()}
    peak_phase = max(candidates, key=lambda p: (sum(candidates[p].values()), -PHASES.index(p)))
    comp = candidates[peak_phase]
    allocated = sum(comp.values())
    components = {name: round(comp.get(name, 0.0)) for name in COMPONENTS}
    components["cuda_context"] = int(plan.cuda_context_bytes)
    components["allocator_margin"] = round(allocated * plan.allocator_fraction)
    total = sum(components.values())
    return MemoryEstimate(
        method=plan.method,
        total_bytes=total,
        components=components,
        peak_phase=peak_phase,
        activations_per_layer=tuple(round(v) for v in result.per_layer),
        phase_peaks=phase_peaks,
        trainable_params=static.trainable_params,
        total_params=total_params,
        plan=plan.to_dict(),
        warnings=tuple(warnings) + tuple(_plan_warnings(plan)) + tuple(shard.warnings),
    )


__all__ = ["COMPONENTS", "COMPONENT_HELP", "PHASES", "MemoryEstimate", "PlanError", "estimate", "static_memory"]
