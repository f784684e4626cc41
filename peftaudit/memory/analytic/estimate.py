"""The analytic estimate: peak memory per GPU for one model under one training plan.

:func:`estimate` is pure: an :class:`~peftaudit.inventory.Inventory` and a
:class:`~peftaudit.memory.plan.TrainingPlan` in, a frozen
:class:`MemoryEstimate` out. Its parts:

* static memory from the inventory and the method's adaptation (weights at
  their storage dtype, quantization constants, trainable weights, gradients,
  optimizer states, master weights), divided across GPUs as the sharding says
  (:mod:`~peftaudit.memory.analytic.static`, :mod:`~peftaudit.memory.analytic.sharding`);
* the activation side: the layer program registered for the model's type
  (:mod:`~peftaudit.memory.analytic.programs`) replayed on tapes for one step
  (:mod:`~peftaudit.memory.analytic.step`), which gives the peak of the forward
  and backward passes and what is alive at that moment;
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

from peftaudit.inventory import Inventory
from peftaudit.memory.allocator import reserve
from peftaudit.memory.analytic import programs, sharding
from peftaudit.memory.analytic.layout import ModelLayout, SyntheticLayout, layer_indices, main_block
from peftaudit.memory.analytic.objective_step import OutputHead, objective_phases
from peftaudit.memory.analytic.ops import Context
from peftaudit.memory.analytic.programs import LayerProgram, NoLayerProgram
from peftaudit.memory.analytic.shape import ModelShape, shape_of
from peftaudit.memory.analytic.static import Static, static_memory
from peftaudit.memory.analytic.step import StepProfile, record_step, walk, with_padding_mask
from peftaudit.memory.analytic.tape import CATEGORIES
from peftaudit.memory.checkpointing import check_inventory_checkpointing
from peftaudit.memory.derived import DerivationError, derive
from peftaudit.memory.derived.windows import reached, windows
from peftaudit.memory.galore import activations_twin, without_gradients
from peftaudit.memory.images import check_images, is_vision_model
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.objectives import check_objective, for_objective, head_kind, objective_step
from peftaudit.memory.plan import (
    OBJECTIVE_OPTIONS,
    PEFT_METHOD_NAMES,
    PLAN_DEFAULTS,
    PlanError,
    PlanWarning,
    TrainingPlan,
)
from peftaudit.memory.quantized import base_storage, resolve
from peftaudit.memory.result import COMPONENT_HELP, COMPONENTS, PHASES, BaseStorage, MemoryEstimate
from peftaudit.memory.stack import stack_of
from peftaudit.memory.stack_rules import (
    DORA_BASE_RECOMPUTED,
    DORA_EYE_HELD,
    KV_EXPANDED,
    active_rules,
    inventory_view,
    stack_warnings,
)

_PROFILES: dict[int, tuple[weakref.ref[Inventory], dict[tuple[Any, ...], Any]]] = {}
_WINDOWS = ("attention windows",)


#: Fields outside the recorded step that the static memory prepared with it reads: they key ``_prepare``
#: (foreach's scratch, AdaLoRA's allocator statistics, GaLore's low-rank states and step).
_STATIC_ONLY = ("optimizer_impl", "adalora_allocator", "galore_rank", "galore_targets", "galore_proj")
_NOT_IN_PROFILE = {
    *_STATIC_ONLY,
    "batch_size",
    "seq_len",
    "gpus",
    "gpus_per_node",
    "sharding",
    "offload",
    "cuda_context_bytes",
    "allocator_fraction",
    "expandable_segments",
    "lengths",
    # The stack changes the step only through the rules it applies to the model (stack_rules), which key it.
    "stack",
    # Options that change no tensor's shape (scaling, learning rates).
    "use_rslora",
    "lora_plus_ratio",
    # The objective's sizes and passes compose with the recorded step (objective_step.py); only the
    # objective itself changes it (its loss head).
    *OBJECTIVE_OPTIONS,
}
_PROFILE_FIELDS = tuple(f.name for f in dataclass_fields(TrainingPlan) if f.name not in _NOT_IN_PROFILE)
_OBJECTIVE_FIELDS = tuple(OBJECTIVE_OPTIONS)


def _profile_key(plan: TrainingPlan) -> tuple[Any, ...]:
    """Plan fields that change the recorded step (batch, sequence and scale-out do not)."""
    return tuple(getattr(plan, name) for name in _PROFILE_FIELDS)


def _cached(inventory: Inventory) -> dict[tuple[Any, ...], Any]:
    """What is kept per model (by identity) while it lives: prepared plan shapes, its windows."""
    entry = _PROFILES.get(id(inventory))
    if entry is None or entry[0]() is not inventory:
        store: dict[tuple[Any, ...], Any] = {}
        key_id = id(inventory)
        profiles = _PROFILES  # the closure keeps the dict, which may outlive module globals at exit
        ref = weakref.ref(inventory, lambda _r: profiles.pop(key_id, None))
        _PROFILES[key_id] = (ref, store)
        return store
    return entry[1]


@dataclass(frozen=True)
class _Prepared:
    """What one (model, plan shape) records once: the adaptation, layout, static memory and step."""

    adaptation: Adaptation
    layout: ModelLayout
    static: Static
    profile: StepProfile
    warnings: list[PlanWarning]
    total_params: int
    base_storage: BaseStorage | None
    activations_source: str
    """``program``, ``derived`` or ``stand-in`` (:data:`~peftaudit.memory.result.ACTIVATION_SOURCES`)."""


@dataclass
class _Shared:
    """What a plan shape shares with the same shape under the other gradient checkpointing setting."""

    own: Adaptation
    """What the method adapts (before a checkpoint's own quantization is applied)."""
    resolved: Any
    """:func:`peftaudit.memory.quantized.resolve`'s answer for it."""
    layout: ModelLayout
    static: Static
    signatures: dict[int, Any] | None = None
    """:func:`_layer_signatures` of ``layout``, once a program recorded a step with it."""


#: Where gradient checkpointing sits in :func:`_profile_key`.
_CHECKPOINTING = _PROFILE_FIELDS.index("gradient_checkpointing")


def _prepare(inventory: Inventory, plan: TrainingPlan, activations: str = "auto") -> _Prepared:
    from peftaudit.plugins import memory_methods

    store = _cached(inventory)
    model_windows = store.get(_WINDOWS)
    if model_windows is None:
        model_windows = store[_WINDOWS] = windows(inventory.config or {})
    # Past a sliding window the step builds the window's mask: the profile holds on one side of each.
    beyond = reached(model_windows, plan.seq_len)
    # An older stack's rules (stack_rules): the model as that release builds it, its step traced so.
    rules = active_rules(inventory, plan)
    static_only = tuple(getattr(plan, name) for name in _STATIC_ONLY)
    key = (*_profile_key(plan), beyond, activations, plan.stack, rules, *static_only)
    hit = store.get(key)
    if hit is not None:
        return hit
    user_inventory = inventory
    if rules:
        view_key = ("stack view", rules, plan.weight_dtype)
        view = store.get(view_key)
        if view is None:
            view = store[view_key] = inventory_view(inventory, rules, plan.weight_dtype)
        inventory = view
    method = memory_methods()[plan.method]
    own = method.adapt(inventory, plan)
    block = main_block(inventory)
    program = programs.lookup(inventory.model_type or "")
    shape = shape_of(inventory, program or programs.STAND_IN)
    if KV_EXPANDED.name in rules:
        shape = replace(shape, sdpa_repeats_kv=True)
    # Gradient checkpointing changes the recorded step only: what the method adapts, how weights are
    # stored, the layout and the static memory are those of the same shape with it the other way, so
    # that twin lends them when it was prepared first (the sizing searches and the report's table ask
    # for both). Only for the same adaptation: a plugin's method may adapt differently under it.
    shared_key = ("without checkpointing", *key[:_CHECKPOINTING], *key[_CHECKPOINTING + 1 :])
    found: _Shared | None = store.get(shared_key)
    if found is None or found.own != own:
        # A checkpoint's own quantization_config decides how frozen weights are stored (--base-dtype wins).
        resolved = resolve(inventory, plan, own)
        layout = ModelLayout(inventory, plan, resolved.adaptation, shape, block, checkpoint=resolved.checkpoint)
        found = store[shared_key] = _Shared(
            own, resolved, layout, static_memory(inventory, plan, resolved.adaptation, layout)
        )
    shared = found
    resolved, layout, static = shared.resolved, shared.layout, shared.static
    adaptation = resolved.adaptation
    warnings = list(resolved.warnings)
    adapter_dtype = plan.weight_dtype if plan.adapter_dtype == "auto" else plan.adapter_dtype

    # TRL's trainers pass their padded batches' attention_mask (SFT's packed batches have none).
    masked = plan.objective != "sft" and plan.attention == "sdpa"

    def make_ctx(padding_mask: bool = masked) -> Context:
        return Context(
            compute=plan.compute_dtype,
            autocast=plan.autocast,
            adapter_dtype=adapter_dtype,
            dropout=plan.dropout,
            training=plan.training,
            dora_eye_held=DORA_EYE_HELD.name in rules,
            dora_recomputes_base=DORA_BASE_RECOMPUTED.name in rules,
            padding_mask=padding_mask,
        )

    ids = layer_indices(inventory, block)

    def record(
        program: LayerProgram,
        layout: ModelLayout,
        shape: ModelShape,
        input_grad: bool | None = None,
        padding_mask: bool = masked,
    ) -> StepProfile:
        if layout is shared.layout:  # the twin's layout: its layers' signatures too
            if shared.signatures is None:
                shared.signatures = _layer_signatures(layout, ids)
            signature = shared.signatures
        else:
            signature = _layer_signatures(layout, ids)
        return record_step(
            program,
            shape,
            layout,
            lambda: make_ctx(padding_mask),
            layer_ids=ids,
            layer_key=signature.__getitem__,
            attention=plan.attention,
            checkpointing=plan.gradient_checkpointing and plan.training,
            input_grad=adaptation.virtual_tokens > 0 if input_grad is None else input_grad,
            loss=head_kind(plan),
            virtual=adaptation.virtual_tokens,
            accumulate=plan.gradient_accumulation > 1,
            training=plan.training,
        )

    profile: StepProfile | None = None
    source = "program"
    # Programs model causal attention without windows: past one, the step is derived.
    if program is not None and activations != "derived" and not any(beyond):
        try:
            profile = record(program, layout, shape)
        except NoLayerProgram:
            # A layout the program does not read (fused qkv_proj, other expert layouts): derive it.
            program = None
    if profile is None:
        source = "derived"
        try:
            fields = {**dict(zip(_PROFILE_FIELDS, _profile_key(plan), strict=True)), "windows_reached": beyond}
            traced_plan, fields = activations_twin(plan, fields)  # GaLore's activations are full training's
            # An objective's layers run as the plain step's (over its rows); its head is the tape's below.
            fields.pop("objective")
            traced_plan = traced_plan.with_(objective="sft", **{k: PLAN_DEFAULTS[k] for k in _OBJECTIVE_FIELDS})
            derived = derive(inventory, traced_plan, adaptation, fields, rules)
            profile = derived.profile
            if head_kind(plan) != "default":
                # The trace runs transformers' own loss; a fused chunked loss or an objective's loss head
                # is the tape's: the stand-in's head on this model's output head. Its layers are
                # Llama-shaped (SyntheticLayout): the real ones may be named otherwise (OPT, Phi-3,
                # experts) or hold a prompt encoder no program models. Only whether the hidden states need
                # grad reaches the head: a prefix's trained keys and values make them need it from the
                # first layer on.
                generic = replace(shape, qk_norm=False)
                head_layout = SyntheticLayout(
                    inventory, plan, adaptation, generic, block, checkpoint=resolved.checkpoint
                )
                prefix_grad = True if adaptation.prefix_tokens else None
                # Recorded without the padding mask (with_padding_mask below places it around the segments).
                head = record(programs.STAND_IN, head_layout, generic, input_grad=prefix_grad, padding_mask=False).head
                profile = replace(profile, head=head)
            if masked and derived.attention == "sdpa":
                # The traced layers ran as a plain step, without the objective's padding mask: its bytes are added.
                checkpointing = plan.gradient_checkpointing and plan.training
                profile = with_padding_mask(profile, shape, plan.compute_dtype, checkpointing=checkpointing)
            if derived.attention != plan.attention:
                warnings.append(
                    PlanWarning(
                        "attention-unsupported",
                        f"transformers does not run {inventory.architecture} with {plan.attention} attention: "
                        f"activations are those of {derived.attention} attention, which it trains with",
                    )
                )
        except DerivationError as exc:
            # Even the trace cannot run it (remote code not trusted, an operation fake tensors lack):
            # replay a Llama-shaped layer of the same size instead, and say why.
            generic = replace(shape, qk_norm=False)
            synthetic = SyntheticLayout(inventory, plan, adaptation, generic, block, checkpoint=resolved.checkpoint)
            try:
                profile = record(programs.STAND_IN, synthetic, generic)
            except Exception as stand_in:  # a stand-in that cannot apply (a vision model has no output head)
                raise PlanError(
                    f"{inventory.architecture}: no activation estimate: its step could not be traced ({exc}) "
                    f"and a Llama-shaped stand-in does not apply ({stand_in})"
                ) from None
            source = "stand-in"
            warnings.append(
                PlanWarning(
                    "approximate-activations",
                    f"activations of this {inventory.architecture} use a Llama-shaped layer of the same size: "
                    f"its step could not be traced ({exc})",
                )
            )
    if adaptation.layerwise:
        # Each gradient is stepped and freed by its parameter's own optimizer as it completes.
        profile = without_gradients(profile, static.layerwise_steps, static.tied_gradients)
    warnings = warnings + _warnings(inventory, plan, adaptation) + stack_warnings(user_inventory, plan)
    storage = base_storage(
        resolved,
        plan,
        own.quantization,
        total_params=inventory.total,
        quantized_params=static.quantized_params,
        packed_bytes=static.packed_bytes,
        constant_bytes=static.quantization_constants,
        dequantized_trained=static.dequantized_trained,
        dense_dtype=layout._dense_dtype(False),
    )
    result = _Prepared(adaptation, layout, static, profile, warnings, inventory.total, storage, source)
    store[key] = result
    return result


def _objective_candidates(
    inventory: Inventory,
    plan: TrainingPlan,
    activations: str,
    prepared: _Prepared,
    candidates: dict[str, dict[str, float]],
    base_static: dict[str, float],
    idle: dict[str, float],
    forward_end: tuple[float, ...],
    shard: Any,
) -> dict[str, dict[str, float]]:
    """The phases an objective's passes add (:mod:`~peftaudit.memory.analytic.objective_step`)."""
    step = objective_step(plan)
    layout = prepared.layout
    shape = shape_of(inventory, programs.lookup(inventory.model_type or "") or programs.STAND_IN)
    # The reference's and generation's passes: the model without gradients (a reference copy is the
    # plain model; PEFT's reference is the same model with its adapters disabled).
    twin = plan.with_(
        method=plan.method if plan.method in PEFT_METHOD_NAMES else "full",
        optimizer="none",
        gradient_checkpointing=False,
        gradient_accumulation=1,
    )
    inference = _prepare(inventory, twin, activations).profile
    head_spec = layout.linear(None, "output_head")
    head = OutputHead(
        vocab=shape.vocab,
        trainable=bool(head_spec and head_spec.trainable),
        fp32_under_autocast=bool(plan.autocast and head_spec and head_spec.dtype == "fp32"),
    )
    copy = float(shard.base_weights + shard.trainable_weights) if step.reference == "copy" else 0.0
    in_flight = plan.gradient_accumulation == 1 and not prepared.adaptation.layerwise
    return objective_phases(
        candidates,
        static=base_static,
        idle=idle,
        plan=plan,
        step=step,
        forward_end=forward_end,
        inference=inference,
        seq=plan.seq_len + prepared.adaptation.virtual_tokens,
        shape=shape,
        head=head,
        reference_weights=copy,
        gradient_fraction=shard.gradient_fraction if in_flight else 0.0,
    )


def _layer_signatures(layout: ModelLayout, ids: list[int]) -> dict[int, Any]:
    """What makes layers differ for the programs (adapter paths name the layer; shapes do not)."""
    roles = sorted({role for (layer, role) in layout._roles if layer is not None})
    sig: dict[int, Any] = {}
    for i in ids:
        specs = tuple(_spec_key(layout.linear(i, r)) for r in roles)
        weights = tuple(
            layout.weight(i, r) for r in ("input_norm", "post_norm", "ln_1", "ln_2", "attention_norm", "output_norm")
        )
        sig[i] = (specs, weights)
    return sig


def _spec_key(spec: Any) -> Any:
    if spec is None or spec.adapter is None:
        return spec
    a = spec.adapter
    return (replace(spec, adapter=None), a.kind, a.rank, a.in_features, a.out_features, a.num_experts, a.feedforward)


def _plan_warnings(inventory: Inventory, plan: TrainingPlan) -> list[PlanWarning]:
    """Warnings that depend on the fields not cached with the recorded step (scale-out, sequence)."""
    out: list[PlanWarning] = []
    context = inventory.dims.max_position_embeddings
    # A vision model's batch is images: seq-len does not apply (CLIP's 77 text positions are its own).
    if context and plan.seq_len > context and not is_vision_model(inventory.config or {}):
        out.append(
            PlanWarning(
                "seq-len-exceeds-max-positions",
                f"seq-len {plan.seq_len:,} is above this model's max_position_embeddings ({context:,}): positions "
                "past it were never trained (learned position embeddings fail outright); extend the context "
                "(RoPE scaling) or shorten the sequences",
            )
        )
    if plan.sharding == "zero3" and plan.gpus == 1 and plan.offload == "none":
        out.append(
            PlanWarning(
                "zero3-single-gpu", "ZeRO-3 on one GPU with nothing offloaded saves no memory; it only adds gathers"
            )
        )
    if plan.objective == "grpo" and plan.generation == "vllm-colocate":
        out.append(
            PlanWarning(
                "vllm-colocated",
                f"vLLM holds {plan.vllm_memory:.0%} of each GPU's memory (vllm_gpu_memory_utilization) beside this "
                "training step, which must fit in the rest",
            )
        )
    out += stack_of(plan).warnings()  # stack-unknown: a release outside the traced ones
    return out


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
    out += _rank_warnings(adaptation)
    if adaptation.quantization is not None and plan.precision in ("fp32", "bf16-mixed", "fp16-mixed"):
        out.append(
            PlanWarning(
                "quantized-with-fp32",
                f"a {adaptation.quantization} base with {plan.precision} precision keeps unquantized weights in fp32",
            )
        )
    return out


def _rank_warnings(adaptation: Adaptation) -> list[PlanWarning]:
    """LoRA ranks above a layer's smaller dimension: B @ A cannot have a higher rank than that."""
    over = [a for a in adaptation.adapters if a.kind != "ia3" and a.rank > min(a.in_features, a.out_features) > 0]
    if not over:
        return []
    worst = min(over, key=lambda a: min(a.in_features, a.out_features))
    name = f"{worst.path}.{worst.parameter}" if worst.parameter else worst.path
    ranks = sorted({a.rank for a in over})
    return [
        PlanWarning(
            "rank-exceeds-layer-dim",
            f"rank {', '.join(map(str, ranks))} is above the smaller dimension of {len(over)} adapted layer(s), "
            f"e.g. {name} ({worst.in_features} -> {worst.out_features}): their update cannot exceed rank "
            f"{min(worst.in_features, worst.out_features)}, so the extra rank only adds parameters and memory",
        )
    ]


def estimate(inventory: Inventory, plan: TrainingPlan | None = None, *, activations: str = "auto") -> MemoryEstimate:
    """Estimate the peak GPU memory of one training step of ``inventory`` under ``plan``.

    ``activations``: ``"auto"`` replays the layer program registered for the model's type
    (:mod:`peftaudit.memory.analytic.programs`) and, for any other model, a step profile
    derived from traces of a depth-reduced copy (:mod:`peftaudit.memory.derived`);
    ``"derived"`` derives it for every model (how the hand-written programs are checked).
    """
    if activations not in ("auto", "derived"):
        raise ValueError(f"activations must be 'auto' or 'derived', not {activations!r}")
    plan = plan or TrainingPlan()
    plan.validate()
    check_images(inventory.config or {}, plan, inventory.architecture)
    check_inventory_checkpointing(inventory, plan)  # the model's class or the method may refuse it
    check_objective(inventory, plan)
    plan = for_objective(inventory, plan)
    prepared = _prepare(inventory, plan, activations)
    adaptation, layout, static, profile = prepared.adaptation, prepared.layout, prepared.static, prepared.profile
    warnings, total_params = prepared.warnings, prepared.total_params
    virtual = adaptation.virtual_tokens
    seq = plan.seq_len + virtual
    # Sequences the step runs: chosen and rejected for pairs, every completion for GRPO.
    rows = objective_step(plan).rows
    result = walk(profile, rows, seq, backward=plan.training)
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
    if plan.training and not adaptation.layerwise:  # layer-wise: optimizer.step() is a no-op
        step = {k: float(v) for k, v in base_static.items()}
        step["gradients"] = float(shard.gradients + shard.persistent_grad_buffers)
        step["temporaries"] = float(shard.optimizer_step_scratch)
        step["weight_copies"] = 0.0
        candidates["optimizer step"] = step
    if plan.objective != "sft":
        alive = {k: float(v) for k, v in base_static.items()}
        idle = {**alive, "gradients": float(shard.persistent_grad_buffers)}
        candidates = _objective_candidates(
            inventory, plan, activations, prepared, candidates, alive, idle, result.forward_end, shard
        )
    phase_peaks = {phase: int(sum(c.values())) for phase, c in candidates.items()}
    peak_phase = max(candidates, key=lambda p: (sum(candidates[p].values()), -PHASES.index(p)))
    comp = candidates[peak_phase]
    components = {name: round(comp.get(name, 0.0)) for name in COMPONENTS}
    # What the caching allocator holds above the tensors, learned per plan shape from replays.
    overheads = reserve.learned(plan, components, result.per_layer)
    allocated = sum(components.values())
    components["cuda_context"] = int(plan.cuda_context_bytes)
    components["allocator_margin"] = overheads.capacity
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
        warnings=tuple(warnings) + tuple(_plan_warnings(inventory, plan)) + tuple(shard.warnings),
        base_storage=prepared.base_storage,
        activations_source=prepared.activations_source,
        reserved_bytes=allocated + overheads.reserved,
        allocator_source=overheads.source,
    )


__all__ = ["COMPONENTS", "COMPONENT_HELP", "PHASES", "MemoryEstimate", "PlanError", "estimate", "static_memory"]
