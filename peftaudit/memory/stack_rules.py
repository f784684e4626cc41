"""Stack rules: what an older transformers/peft release does differently, memory-wise.

The estimate models the installed stack (transformers 5, peft 0.21) unless the plan names
another (``--stack transformers==4.44,peft==0.12``, :mod:`peftaudit.memory.stack`). Each
:class:`StackRule` here is one behaviour that moved the traced peak between releases
(``benchmarks/results/stack_traces.md``, recorded in ``tests/memory/data/stack_traces.json``),
with the release range it holds for, the model families it concerns, and where it is in the
code at the tags. :func:`active_rules` names the rules a plan's stack applies to a model; the
estimate then

* reads the model through :func:`inventory_view` (the modules the old release builds, so the
  method's adapters, the quantized weights and the static memory are that release's), and
* derives the step from a trace of the installed transformers with the model rebuilt the
  old way (:func:`apply_to_model`), its profile stored under the rule names
  (:mod:`peftaudit.memory.derived.store`).

Rules:

``moe-experts-per-expert`` (transformers < 5.0; Mixtral, Qwen2-MoE, Qwen3-MoE)
    4.x builds each expert as its own MLP of ``nn.Linear`` layers and the router as an
    ``nn.Linear`` (:data:`PER_EXPERT`); 5.x fuses the experts into two 3-D parameters and the
    router into a ``*TopKRouter``. bitsandbytes quantizes and peft's ``all-linear`` adapts
    ``nn.Linear`` layers: under 4.x QLoRA stores the experts (and the router) in 4 bits, and
    LoRA puts one rank-r adapter on every expert's every layer and on the router, where 5.x
    keeps the experts 16-bit and adapts the fused parameters (peft keeps their merged weight
    for the backward pass: +80 % at 1k tokens for Mixtral LoRA, 3x for QLoRA).

``kv-expanded-before-sdpa`` (transformers < 4.54, or torch < 2.5; all of 4.x for the families
in :data:`KV_EXPANDED_UNTIL_5`; SDPA attention, grouped-query models)
    The SDPA path ran ``repeat_kv`` on the keys and values before
    ``scaled_dot_product_attention``, which then keeps the copies at full head count for the
    backward pass; 4.54 added ``use_gqa_in_sdpa`` (``enable_gqa=True`` when there is no mask).
    +12 MiB per Llama-3-8B layer per 1k tokens (+0.5 % to +1.1 % of the traced peaks).

``rotary-cache-per-layer`` (transformers < 4.45, Mixtral < 4.48)
    Qwen2, Qwen2-MoE, StarCoder2, Falcon, Phi, StableLM, GPT-NeoX and Mixtral built a rotary
    embedding in every attention module, each with ``cos_cached``/``sin_cached`` buffers of
    ``max_position_embeddings x rotary dim`` in the load dtype: 16 MiB per Mixtral layer.

``dora-eye-held`` (peft < 0.19; DoRA)
    ``DoraLinearLayer.forward`` made ``x_eye = torch.eye(in_features)`` (in the input's dtype, fp32
    after peft's input cast) as a local of forward, so the identity matrix, lora_A's autocast copy of
    it, ``lora_weight`` and ``W.to(x.dtype)`` all live until the norm is taken and the forward
    returns; 0.19 moved the eye into ``get_lora_weight``. +560 MiB at a Llama-3-8B ``down_proj``,
    +8 % on the traced 1k-token DoRA step. The trace runs 0.17's forward (:func:`tracing`).

``dora-base-recomputed`` (peft < 0.14; DoRA)
    Before 0.14 DoRA's forward recomputed the base output, ``F.linear(x, W.to(x.dtype))``, instead
    of reusing the base layer's result; under autocast that keeps a half-precision copy of every
    adapted weight for the backward pass. With ``dora-eye-held``: +22 % on the traced step. The
    trace runs 0.12's forward.

``gemma2-sdpa`` (transformers < 5.21; Gemma 2 with ``attention="sdpa"``, the default)
    Gemma 2 ran SDPA (its ``_supports_sdpa`` was true; 4.44 built ``Gemma2SdpaAttention`` and later
    releases' ``sdpa_attention_forward`` ignored ``softcap``), dropping the attention logits'
    soft-capping; 5.21 refuses SDPA for it and the step is eager's. -18 % on the traced Gemma-2-9B
    LoRA step at 4k tokens. The trace allows SDPA and ignores ``softcap`` as those releases did.

``adalora-ranknum-frozen`` (peft < 0.21; AdaLoRA)
    AdaLoRA's ``ranknum`` (a 1-element parameter per adapted module) stays frozen; 0.21 trains it, one
    more trainable parameter per module (MetaMathQA's AdaLoRA run on peft 0.19 records 56 fewer on
    Llama-3.2-3B than 0.21 builds). Counts only (:mod:`peftaudit.memory.adapters`).

Measured and left without a rule (``benchmarks/results/stack_traces.md``): gradient checkpointing's
reentrant default (transformers 4.x), the default attention implementation of the other text
families (SDPA throughout), peft's fp32 adapters (``autocast_adapter_dtype``, since peft 0.12) and
``prepare_model_for_kbit_training``'s upcast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any

from peftaudit.inventory import Inventory, ModuleRecord, ParameterRecord

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.plan import PlanWarning, TrainingPlan
    from peftaudit.memory.stack import SoftwareStack


@dataclass(frozen=True)
class PerExpert:
    """How transformers 4.x names one family's per-expert layers, and which fused slice each is.

    transformers 5 loads a 4.x checkpoint by stacking ``experts.N.<gate>`` and ``experts.N.<up>``
    into ``experts.gate_up_proj`` (gate rows first) and ``experts.N.<down>`` into
    ``experts.down_proj`` (``conversion_mapping.py``): the inverse is the 4.x model.
    """

    expert_class: str
    """4.x's class of one expert (``MixtralBlockSparseTop2MLP``)."""
    gate: str
    up: str
    down: str
    order: tuple[str, ...]
    """The three layers in the order the 4.x ``__init__`` creates them (module and parameter order)."""
    norm_from_config: bool
    """Whether the top-k routing weights are renormalized only when ``config.norm_topk_prob``
    (Qwen-MoE); Mixtral always renormalizes."""


#: Families whose 4.x sparse MoE block is ``gate`` (``nn.Linear``) + ``experts`` (``nn.ModuleList``
#: of MLPs), with the 4.x names. Sources: ``modeling_mixtral.py``, ``modeling_qwen2_moe.py`` and
#: ``modeling_qwen3_moe.py`` at v4.57.6 (``MixtralBlockSparseTop2MLP``: w1, w2, w3;
#: ``Qwen2MoeMLP``/``Qwen3MoeMLP``: gate_proj, up_proj, down_proj), and the ``mixtral`` and
#: ``qwen2_moe`` (which ``qwen3_moe`` maps to) entries of v5's ``conversion_mapping.py``.
PER_EXPERT: dict[str, PerExpert] = {
    "mixtral": PerExpert("MixtralBlockSparseTop2MLP", "w1", "w3", "w2", ("w1", "w2", "w3"), norm_from_config=False),
    "qwen2_moe": PerExpert(
        "Qwen2MoeMLP", "gate_proj", "up_proj", "down_proj", ("gate_proj", "up_proj", "down_proj"), True
    ),
    "qwen3_moe": PerExpert(
        "Qwen3MoeMLP", "gate_proj", "up_proj", "down_proj", ("gate_proj", "up_proj", "down_proj"), True
    ),
}


@dataclass(frozen=True)
class StackRule:
    """One memory-relevant behaviour of a release range, with its source."""

    name: str
    """Stable name (it keys stored profiles): ``moe-experts-per-expert``."""
    summary: str
    source: str
    """Where it is: the release, pull request or code at the tag."""
    applies: Callable[[SoftwareStack, Inventory, TrainingPlan], bool]
    traced: bool = True
    """Whether the rule changes the traced step (the model the trace builds, or the libraries it runs);
    ``False``: it changes only what :func:`inventory_view` counts (buffers), not the step profile."""


def _moe_per_expert(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    return (
        stack.before("transformers", "5.0")
        and (inventory.model_type or "") in PER_EXPERT
        and any(_fused_experts(inventory))
    )


MOE_PER_EXPERT = StackRule(
    name="moe-experts-per-expert",
    summary="transformers 4.x builds each MoE expert (and the router) from nn.Linear layers: "
    "bitsandbytes quantizes them and peft's all-linear adapts each one",
    source="https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/mixtral/"
    "modeling_mixtral.py (MixtralBlockSparseTop2MLP, MixtralSparseMoeBlock: nn.Linear gate, "
    "nn.ModuleList experts); fused "
    "MixtralExperts/MixtralTopKRouter and the w1+w3 -> gate_up_proj WeightConverter in transformers 5 "
    "(src/transformers/conversion_mapping.py)",
    applies=_moe_per_expert,
)


#: Model types whose 4.x code kept an SDPA attention class of its own (``Qwen2MoeSdpaAttention``), which
#: runs ``repeat_kv`` before SDPA in every 4.x release: ``class .*SdpaAttention`` with
#: ``repeat_kv(key_states`` in the 4.53.3, 4.54.1 and 4.57.6 wheels (text models of this list).
KV_EXPANDED_UNTIL_5: frozenset[str] = frozenset(
    {"qwen2_moe", "stablelm", "olmoe", "phimoe", "dbrx", "jamba", "nemotron", "diffllama"}
)


def _kv_expanded(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    dims = inventory.dims
    grouped = dims.num_key_value_heads is not None and dims.num_key_value_heads < (dims.num_attention_heads or 0)
    # use_gqa_in_sdpa (4.54-4.57) also wants torch 2.5 (SDPA's enable_gqa).
    expands = (
        stack.before("transformers", "4.54")
        or stack.before("torch", "2.5")
        or (stack.before("transformers", "5.0") and (inventory.model_type or "") in KV_EXPANDED_UNTIL_5)
    )
    return expands and plan.attention == "sdpa" and grouped


KV_EXPANDED = StackRule(
    name="kv-expanded-before-sdpa",
    summary="transformers before 4.54 expands grouped keys and values to every head (repeat_kv) "
    "before SDPA, which keeps the expanded copies for the backward pass",
    source="https://github.com/huggingface/transformers/blob/v4.53.3/src/transformers/integrations/sdpa_attention.py "
    "(repeat_kv whenever the module has num_key_value_groups); use_gqa_in_sdpa (torch >= 2.5, no mask) in "
    "https://github.com/huggingface/transformers/blob/v4.54.1/src/transformers/integrations/sdpa_attention.py; "
    "Qwen2MoeSdpaAttention.forward (repeat_kv) in "
    "https://github.com/huggingface/transformers/blob/v4.57.6/src/transformers/models/qwen2_moe/modeling_qwen2_moe.py",
    applies=_kv_expanded,
)

#: Model types that built rotary caches per attention module, and the first release without them
#: (``register_buffer("cos_cached"`` in the 4.44.2, 4.45.2, 4.47.1 and 4.48.3 wheels).
ROTARY_CACHE_UNTIL: dict[str, str] = {
    "mixtral": "4.48",
    "qwen2": "4.45",
    "qwen2_moe": "4.45",
    "starcoder2": "4.45",
    "falcon": "4.45",
    "phi": "4.45",
    "stablelm": "4.45",
    "gpt_neox": "4.45",
}


def _rotary_per_layer(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    until = ROTARY_CACHE_UNTIL.get(inventory.model_type or "")
    config = inventory.config or {}
    return (
        until is not None
        and stack.before("transformers", until)
        and not config.get("alibi")  # Falcon with ALiBi has no rotary embedding
        and bool(inventory.dims.max_position_embeddings)
    )


ROTARY_PER_LAYER = StackRule(
    name="rotary-cache-per-layer",
    summary="transformers before 4.45 (Mixtral before 4.48) kept cos/sin caches of every position in "
    "each attention module's rotary embedding",
    source="https://github.com/huggingface/transformers/blob/v4.44.2/src/transformers/models/mixtral/"
    "modeling_mixtral.py (MixtralRotaryEmbedding._set_cos_sin_cache, one per MixtralAttention; "
    "likewise qwen2, qwen2_moe, "
    "starcoder2, falcon, phi, stablelm, gpt_neox at v4.44.2, and mixtral until v4.47.1)",
    applies=_rotary_per_layer,
    traced=False,
)


def _dora_eye_held(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    return plan.method == "dora" and stack.before("peft", "0.19")


DORA_EYE_HELD = StackRule(
    name="dora-eye-held",
    summary="peft before 0.19 keeps DoRA's identity matrix (in x in, in the adapter dtype) and lora_A's "
    "half-precision copy of it alive through every DoRA layer's forward",
    source="https://github.com/huggingface/peft/blob/v0.17.1/src/peft/tuners/lora/dora.py "
    "(DoraLinearLayer.forward: x_eye = torch.eye(...) a local of forward); moved into get_lora_weight, "
    "freed before the norm, by https://github.com/huggingface/peft/pull/2661 (v0.19.0)",
    applies=_dora_eye_held,
)


def _dora_base_recomputed(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    return plan.method == "dora" and stack.before("peft", "0.14")


DORA_BASE_RECOMPUTED = StackRule(
    name="dora-base-recomputed",
    summary="peft before 0.14 recomputes each DoRA layer's base output, F.linear(x, W.to(x.dtype)), and "
    "under autocast keeps its half-precision copy of W for the backward pass",
    source="https://github.com/huggingface/peft/blob/v0.12.0/src/peft/tuners/lora/dora.py "
    "(DoraLinearLayer.forward); the base result is reused since https://github.com/huggingface/peft/pull/2122 "
    "(v0.14.0)",
    applies=_dora_base_recomputed,
)


def _gemma2_sdpa(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    return inventory.model_type == "gemma2" and plan.attention == "sdpa" and stack.before("transformers", "5.21")


GEMMA2_SDPA = StackRule(
    name="gemma2-sdpa",
    summary="transformers before 5.21 runs Gemma 2 with SDPA (its default attention) and drops the "
    "attention logits' soft-capping; 5.21 refuses SDPA for Gemma 2, which then trains eager",
    source="_supports_sdpa = True in "
    "https://github.com/huggingface/transformers/blob/v5.20.2/src/transformers/models/gemma2/modeling_gemma2.py "
    "(and in v4.44.2-v5.20.2; 4.44 built Gemma2SdpaAttention, which ignores attn_logit_softcapping, and "
    "sdpa_attention_forward ignored the softcap argument until 5.21); _supports_sdpa = False "
    "('sdpa does not support softcapping') at v5.21.0",
    applies=_gemma2_sdpa,
)


def _adalora_ranknum_frozen(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> bool:
    return plan.method == "adalora" and stack.before("peft", "0.21")


ADALORA_RANKNUM_FROZEN = StackRule(
    name="adalora-ranknum-frozen",
    summary="peft before 0.21 keeps AdaLoRA's ranknum (one value per adapted module) frozen; 0.21 trains it",
    source="https://github.com/huggingface/peft/blob/v0.20.0/src/peft/tuners/tuners_utils.py "
    "(BaseTuner._mark_only_adapters_as_trainable freezes every parameter whose name lacks the 'lora_' "
    "prefix, ranknum included); https://github.com/huggingface/peft/pull/3490 (commit 4ddb88b4, after "
    "v0.20.0) selects adapter parameters structurally and no longer freezes it: ranknum trains wherever "
    "_move_adapter_to_device_of_base_layer copies it to the base layer's device or dtype (re-registered as a "
    "new Parameter, requires_grad=True): a GPU or half-precision base",
    applies=_adalora_ranknum_frozen,
    traced=False,
)

#: Every rule, in the order they are applied.
RULES: tuple[StackRule, ...] = (
    MOE_PER_EXPERT,
    KV_EXPANDED,
    ROTARY_PER_LAYER,
    DORA_EYE_HELD,
    DORA_BASE_RECOMPUTED,
    GEMMA2_SDPA,
    ADALORA_RANKNUM_FROZEN,
)
_BY_NAME = {rule.name: rule for rule in RULES}


def active_rules(inventory: Inventory, plan: TrainingPlan) -> tuple[str, ...]:
    """Names of the rules the plan's stack applies to this model (``()`` for the installed stack)."""
    if not plan.stack:
        return ()
    from peftaudit.memory.stack import stack_of

    return rules_for(stack_of(plan), inventory, plan)


def rules_for(stack: SoftwareStack, inventory: Inventory, plan: TrainingPlan) -> tuple[str, ...]:
    """Names of the rules ``stack`` applies to this model under ``plan``."""
    return tuple(rule.name for rule in RULES if rule.applies(stack, inventory, plan))


def rule(name: str) -> StackRule:
    """The rule called ``name``."""
    return _BY_NAME[name]


def traced(names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``names`` that change the traced step (they key a derived profile)."""
    return tuple(name for name in names if _BY_NAME[name].traced)


def stack_warnings(inventory: Inventory, plan: TrainingPlan) -> list[PlanWarning]:
    """What the plan's stack changes that no rule models for this model (``stack-not-modelled``)."""
    if not plan.stack:
        return []
    from peftaudit.memory.plan import PlanWarning
    from peftaudit.memory.stack import stack_of

    stack = stack_of(plan)
    fused = any(p.kind == "experts" and len(p.shape) == 3 for p in inventory.parameters)
    if fused and stack.before("transformers", "5.0") and (inventory.model_type or "") not in PER_EXPERT:
        return [
            PlanWarning(
                "stack-not-modelled",
                f"transformers 4.x may build this {inventory.model_type} model's experts as per-expert "
                "nn.Linear layers (quantized and adapted one by one); the estimate models transformers 5's "
                f"fused experts (per-expert experts are modelled for {', '.join(sorted(PER_EXPERT))})",
            )
        ]
    return []


# --- moe-experts-per-expert: the inventory view ---------------------------------------------


def _fused_experts(inventory: Inventory) -> list[str]:
    """Paths of transformers 5 fused experts modules (``...mlp.experts``) with a router sibling."""
    names = {p.name: p for p in inventory.parameters}
    out = []
    for m in inventory.modules:
        fused_up = names.get(f"{m.path}.gate_up_proj")
        fused_down = names.get(f"{m.path}.down_proj")
        parent = m.path.rpartition(".")[0]
        router = names.get(f"{parent}.gate.weight")
        if (
            fused_up is not None
            and fused_down is not None
            and len(fused_up.shape) == 3
            and len(fused_down.shape) == 3
            and router is not None
            and len(router.shape) == 2
        ):
            out.append(m.path)
    return out


def inventory_view(inventory: Inventory, names: tuple[str, ...], weight_dtype: str = "bf16") -> Inventory:
    """``inventory`` as the rules' release builds the model (the inventory itself when none changes it).

    ``moe-experts-per-expert``: every fused experts module becomes 4.x's ``nn.ModuleList`` of
    per-expert MLPs (``mlp.experts.3.w1``) and its router an ``nn.Linear`` (``mlp.gate``), each
    record as :func:`~peftaudit.inventory.take_inventory` takes it from that model
    (:func:`apply_to_model`; a test checks the two agree). Paths keep transformers 5's container
    (``mlp``, where Mixtral 4.x said ``block_sparse_moe``): target names match by their last part.

    ``rotary-cache-per-layer``: every attention module gains its rotary embedding's
    ``cos_cached`` and ``sin_cached`` buffers, in ``weight_dtype`` (the load dtype they were
    made in: ``torch.get_default_dtype()`` while the model is built).
    """
    if MOE_PER_EXPERT.name in names:
        inventory = _unfused(inventory, PER_EXPERT[inventory.model_type or ""], _fused_experts(inventory))
    if ROTARY_PER_LAYER.name in names:
        inventory = _with_rotary_caches(inventory, weight_dtype)
    return inventory


def _with_rotary_caches(inventory: Inventory, weight_dtype: str) -> Inventory:
    from peftaudit.architecture import ModuleRole
    from peftaudit.inventory import BufferRecord
    from peftaudit.units import SHORT_DTYPES

    config = inventory.config or {}
    rope_parameters = config.get("rope_parameters")
    rope: dict[str, Any] = rope_parameters if isinstance(rope_parameters, dict) else {}
    factor = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or config.get("rotary_pct") or 1.0
    head_dim = inventory.dims.head_dim or 0
    positions = inventory.dims.max_position_embeddings or 0
    shape = (positions, int(float(factor) * head_dim))
    dtype = SHORT_DTYPES.get(weight_dtype, weight_dtype)
    attention = sorted(
        {
            m.path.rpartition(".")[0]
            for m in inventory.modules
            if m.layer is not None and m.role in (ModuleRole.ATTENTION_Q, ModuleRole.ATTENTION_QKV)
        }
    )
    caches = tuple(
        BufferRecord(f"{path}.rotary_emb.{name}", shape, dtype, shape[0] * shape[1], persistent=False)
        for path in attention
        for name in ("cos_cached", "sin_cached")
    )
    return replace(inventory, buffers=inventory.buffers + caches)


def _unfused(inventory: Inventory, spec: PerExpert, fused: list[str]) -> Inventory:
    from peftaudit.architecture import ModuleRole, classify_module
    from peftaudit.plugins import architecture_rules

    rules = architecture_rules()
    model_type = inventory.model_type
    params = {p.name: p for p in inventory.parameters}
    modules = {m.path: m for m in inventory.modules}
    routers = {f"{path.rpartition('.')[0]}.gate" for path in fused}

    def role(path: str, type_name: str) -> Any:
        return classify_module(path, _named(type_name)(), model_type, rules)

    def kind(r: Any) -> str:
        return "experts" if r == ModuleRole.EXPERTS else "router" if r == ModuleRole.ROUTER else "weight"

    new_params: list[ParameterRecord] = []
    for p in inventory.parameters:
        if p.module in routers and p.name == f"{p.module}.weight":
            new_params.append(replace(p, module_type="Linear", kind=kind(role(p.module, "Linear"))))
        elif p.module in fused:
            if p.name != f"{p.module}.gate_up_proj":
                continue  # down_proj: emitted with gate_up_proj, expert by expert
            down = params[f"{p.module}.down_proj"]
            experts, inter2, hidden = p.shape
            inter = inter2 // 2
            for e in range(experts):
                for leaf in spec.order:
                    source = down if leaf == spec.down else p
                    shape = (hidden, inter) if leaf == spec.down else (inter, hidden)
                    path = f"{p.module}.{e}.{leaf}"
                    new_params.append(
                        replace(
                            source,
                            name=f"{path}.weight",
                            module=path,
                            module_type="Linear",
                            shape=shape,
                            numel=shape[0] * shape[1],
                            kind=kind(role(path, "Linear")),
                            tied_with=(),
                        )
                    )
        else:
            new_params.append(p)

    new_modules: list[ModuleRecord] = []
    for m in inventory.modules:
        if m.path in routers:
            experts, hidden = params[f"{m.path}.weight"].shape
            new_modules.append(
                replace(
                    m,
                    type="Linear",
                    role=role(m.path, "Linear"),
                    is_linear=True,
                    in_features=hidden,
                    out_features=experts,
                )
            )
        elif m.path in fused:
            up = params[f"{m.path}.gate_up_proj"]
            experts, inter2, hidden = up.shape
            inter = inter2 // 2
            act = modules.get(f"{m.path}.act_fn")
            new_modules.append(replace(m, type="ModuleList", role=role(m.path, "ModuleList"), own_params=0))
            for e in range(experts):
                path = f"{m.path}.{e}"
                new_modules.append(
                    replace(m, path=path, type=spec.expert_class, role=role(path, spec.expert_class), own_params=0)
                )
                for leaf in spec.order:
                    out_f, in_f = (hidden, inter) if leaf == spec.down else (inter, hidden)
                    leaf_path = f"{path}.{leaf}"
                    new_modules.append(
                        replace(
                            m,
                            path=leaf_path,
                            type="Linear",
                            role=role(leaf_path, "Linear"),
                            is_linear=True,
                            in_features=in_f,
                            out_features=out_f,
                            own_params=in_f * out_f,
                        )
                    )
                if act is not None:  # each 4.x expert has its own activation module
                    act_path = f"{path}.act_fn"
                    new_modules.append(replace(act, path=act_path, role=role(act_path, act.type)))
        elif m.path.rpartition(".")[0] in fused and m.path.rpartition(".")[2] == "act_fn":
            continue  # the fused module's activation: one per expert above
        else:
            new_modules.append(m)
    return replace(inventory, parameters=tuple(new_params), modules=tuple(new_modules))


@cache
def _named(type_name: str) -> type:
    """A class called ``type_name``: what the architecture rules read of a module."""
    return type(type_name, (), {})


# --- applying the rules to a model the trace runs -------------------------------------------


def apply_to_model(model: Any, names: tuple[str, ...], model_type: str | None) -> None:
    """Rebuild ``model`` (transformers 5, on meta) in place as the rules' release builds it."""
    if MOE_PER_EXPERT.name in names:
        from peftaudit.memory.tracing.per_expert import unfuse

        unfuse(model, PER_EXPERT[model_type or ""])


@contextlib.contextmanager
def tracing(names: tuple[str, ...]) -> Iterator[None]:
    """What the rules change in the installed libraries while a trace runs.

    ``kv-expanded-before-sdpa``: transformers' ``use_gqa_in_sdpa`` answers no, so
    ``sdpa_attention_forward`` runs ``repeat_kv`` as 4.53 and earlier did.

    ``moe-experts-per-expert``: peft rewrites MoE targets to the fused experts only under
    transformers 5 (``BaseTuner.inject_adapter``: ``if is_transformers_ge_v5 and ...``
    ``convert_peft_config_for_transformers``); under 4.x ``all-linear`` and ``w1,w2,w3`` adapt
    the per-expert layers, so the trace runs peft as it runs there.
    """
    saved: list[tuple[Any, str, Any]] = []
    if KV_EXPANDED.name in names:
        # Before use_gqa_in_sdpa (4.54) the SDPA path expanded every grouped key and value.
        import transformers.integrations.sdpa_attention as sdpa_attention

        saved.append((sdpa_attention, "use_gqa_in_sdpa", sdpa_attention.use_gqa_in_sdpa))
        sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    if MOE_PER_EXPERT.name in names:
        import peft.tuners.tuners_utils as tuners_utils

        saved.append((tuners_utils, "is_transformers_ge_v5", tuners_utils.is_transformers_ge_v5))
        tuners_utils.is_transformers_ge_v5 = False
    if DORA_EYE_HELD.name in names:
        from peft.tuners.lora import dora

        forward = _dora_forward_0_12 if DORA_BASE_RECOMPUTED.name in names else _dora_forward_0_14
        saved.append((dora.DoraLinearLayer, "forward", dora.DoraLinearLayer.forward))
        dora.DoraLinearLayer.forward = forward  # type: ignore[method-assign]
    if GEMMA2_SDPA.name in names:
        # SDPA as transformers < 5.21 runs it for Gemma 2: allowed, the soft-capping argument ignored.
        from transformers.modeling_utils import AttentionInterface
        from transformers.models.gemma2 import modeling_gemma2

        pretrained = modeling_gemma2.Gemma2PreTrainedModel
        saved.append((pretrained, "_supports_sdpa", pretrained.__dict__.get("_supports_sdpa", False)))
        pretrained._supports_sdpa = True
        mapping: dict[str, Any] = AttentionInterface._global_mapping
        sdpa: Callable[..., Any] = mapping["sdpa"]

        def sdpa_ignoring_softcap(*args: Any, softcap: Any = None, **kwargs: Any) -> Any:
            return sdpa(*args, **kwargs)

        mapping["sdpa"] = sdpa_ignoring_softcap
        saved.append((_Item(mapping, "sdpa"), "value", sdpa))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class _Item:
    """``mapping[key]`` as an attribute, so :func:`tracing` restores it like the others."""

    def __init__(self, mapping: dict[str, Any], key: str) -> None:
        self.__dict__["_target"] = (mapping, key)

    def __setattr__(self, name: str, value: Any) -> None:
        mapping, key = self.__dict__["_target"]
        mapping[key] = value


def _dora_forward_0_14(
    self: Any, x: Any, *, lora_A: Any, lora_B: Any, scaling: float, base_layer: Any, base_result: Any = None, **_: Any
) -> Any:
    """``DoraLinearLayer.forward`` of peft 0.14-0.18 (the code at v0.17.1): ``x_eye`` lives until it returns."""
    import torch
    import torch.nn.functional as F
    from peft.tuners.lora import dora

    x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=x.dtype)
    lora_weight = lora_B(lora_A(x_eye)).T
    magnitude = self.weight
    weight: Any = dora.dequantize_module_weight(base_layer)
    weight = weight.to(x.dtype)
    weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        bias = base_layer.bias
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, dora.transpose(weight, self.fan_in_fan_out))
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def _dora_forward_0_12(
    self: Any, x: Any, *, lora_A: Any, lora_B: Any, scaling: float, base_layer: Any, base_result: Any = None, **_: Any
) -> Any:
    """``DoraLinearLayer.forward`` of peft 0.12-0.13 (the code at v0.12.0): the base output is recomputed."""
    import torch
    import torch.nn.functional as F
    from peft.tuners.lora import dora

    del base_result  # 0.12 had no such argument: it always recomputes
    lora_result = lora_B(lora_A(x))
    x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=x.dtype)
    lora_weight = lora_B(lora_A(x_eye)).T
    magnitude = self.weight
    weight: Any = dora.dequantize_module_weight(base_layer)
    weight = weight.to(x.dtype)
    weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)
    return (mag_norm_scale - 1) * (F.linear(x, dora.transpose(weight, self.fan_in_fan_out))) + (
        mag_norm_scale * lora_result * scaling
    )


def peft_converts_moe_targets(inventory: Inventory, plan: TrainingPlan) -> bool:
    """Whether peft rewrites this MoE model's LoRA targets to its fused experts (``_convert_peft_config_moe``).

    Only under transformers 5 (:func:`tracing` says where). Under a 4.x stack a family
    :data:`PER_EXPERT` models has no fused experts left (:func:`inventory_view`) and peft adapts
    its per-expert layers; one it does not model keeps transformers 5's experts, and the rewrite.
    """
    if not plan.stack:
        return True
    from peftaudit.memory.stack import stack_of

    return not stack_of(plan).before("transformers", "5.0") or bool(_fused_experts(inventory))


__all__ = [
    "ADALORA_RANKNUM_FROZEN",
    "DORA_BASE_RECOMPUTED",
    "DORA_EYE_HELD",
    "GEMMA2_SDPA",
    "KV_EXPANDED",
    "KV_EXPANDED_UNTIL_5",
    "MOE_PER_EXPERT",
    "PER_EXPERT",
    "ROTARY_CACHE_UNTIL",
    "ROTARY_PER_LAYER",
    "RULES",
    "PerExpert",
    "StackRule",
    "active_rules",
    "apply_to_model",
    "inventory_view",
    "peft_converts_moe_targets",
    "rule",
    "rules_for",
    "stack_warnings",
    "traced",
    "tracing",
]
