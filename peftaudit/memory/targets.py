"""Which adapters peft creates for a config, decided the way peft 0.21 decides it.

Everything here reads the :class:`~peftaudit.inventory.Inventory` only, so the
adapter shapes (and so the trainable parameter count) are known without
building a ``PeftModel``. Which paths a config selects (``target_modules``,
``all-linear``, ``exclude_modules``, ``modules_to_save``, ``rank_pattern``,
``target_parameters``) is :mod:`peftaudit.matching`, the one copy of peft's
matching rules; this module adds what peft builds on them:

* ``target_parameters`` adapt a parameter directly (``ParamWrapper``): a 3-D
  ``(experts, a, b)`` parameter gets ``lora_A`` of ``(r * experts, in)`` and
  ``lora_B`` of ``(out, r * experts)``.
* For MoE models whose experts transformers 5 fused into 3-D parameters, peft
  rewrites the config (``_convert_peft_config_moe``): the old expert names map to
  the fused parameters, and a fused ``gate_up_proj`` gets twice the rank. Only
  under transformers 5 (:func:`~peftaudit.memory.stack_rules.peft_converts_moe_targets`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from peftaudit.inventory import Inventory, ModuleRecord, ParameterRecord
from peftaudit.matching import (
    all_linear,
    is_all_linear,
    module_targeted,
    parameter_targeted,
    pattern_value,
    saved,
    targets_match,
)
from peftaudit.memory.dtypes import nbytes
from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.memory.stack_rules import peft_converts_moe_targets

#: peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` for the families we model.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "falcon": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "opt": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
}

#: peft's IA3 targets and the feed-forward subset (input-scaled rather than output-scaled).
DEFAULT_IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
}

# peft 0.21 + transformers 5: model types whose fused experts peft re-targets, by base pattern
# (transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN restricted to the two patterns
# peft maps, _MOE_TARGET_MODULE_MAPPING). qwen2_moe itself has no base pattern, so peft leaves
# its experts alone.
_MOE_BASE: dict[str, str] = {
    "mixtral": "mixtral",
    "minimax": "mixtral",
    "qwen3_moe": "qwen2_moe",
    "olmoe": "qwen2_moe",
    "deepseek_v3": "qwen2_moe",
    "qwen3_next": "qwen2_moe",
    "ernie4_5_moe": "qwen2_moe",
    "glm4_moe": "qwen2_moe",
    "dots1": "qwen2_moe",
    "hunyuan_v1_moe": "qwen2_moe",
    "flex_olmo": "qwen2_moe",
}
_MOE_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
_MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}

#: Module classes LoRA can wrap (peft dispatches these; bitsandbytes layers are Linear subclasses).
_LORA_MODULE_TYPES = ("Linear", "Conv1D", "Embedding", "Linear4bit", "Linear8bitLt")


@dataclass(frozen=True)
class ModuleAdapter:
    """One adapter peft would create: on a module, or on a parameter (``parameter``)."""

    path: str
    """Module path in the base model (``model.layers.0.self_attn.q_proj``)."""
    kind: str
    """``lora``, ``dora``, ``lora_embedding`` or ``ia3``; peft's other module adapters
    (:mod:`peftaudit.memory.adapters`): ``adalora``, ``loha``, ``lokr``, ``vera``, ``oft``, ``boft``."""
    rank: int
    in_features: int
    out_features: int
    num_experts: int = 1
    parameter: str | None = None
    """For ``target_parameters``: the adapted parameter's local name (``gate_up_proj``)."""
    feedforward: bool = False
    """IA3: scale the input (feed-forward modules) instead of the output."""
    dora: bool = False
    """A DoRA embedding adapter (it has a magnitude vector too)."""
    a_blocks: int = 1
    """BD-LoRA: ``lora_A`` is block-diagonal with this many blocks, stored ``(r, in // a_blocks)``
    (peft ``tuners/lora/variants.py:BlockDiagonalLinear``)."""
    b_blocks: int = 1
    """BD-LoRA: ``lora_B`` is block-diagonal, stored ``(out, r // b_blocks)`` (``BlockDiagonalLinear``'s
    weight is ``(out_features, in_features // nblocks)`` with ``in_features`` = r)."""
    train_b: bool = True
    """``False`` under LoRA init ``mica``: ``lora_B`` is a frozen weight (stored, never trained)."""
    shapes: tuple[tuple[int, ...], ...] = ()
    """The trainable tensors' shapes, for the kinds whose shapes :mod:`peftaudit.memory.adapters` works
    out (LoHa's four factors, LoKr's Kronecker factors, OFT's and BOFT's rotations...); empty for the
    LoRA family and IA3, whose shapes follow from the fields above."""
    buffers: tuple[tuple[tuple[int, ...], str], ...] = ()
    """Buffers the adapter adds to its module, as ``(shape, dtype)`` (OFT's ``rows``/``cols`` int64
    index buffers, BOFT's fp32 permutations ``boft_P``): stored on the GPU, never trained."""

    def tensors(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the trainable tensors peft creates for this adapter (one gradient and one set of
        optimizer states each)."""
        if self.shapes:
            return self.shapes
        if self.kind == "ia3":
            return ((self.in_features if self.feedforward else self.out_features,),)
        r = self.rank * self.num_experts
        out: list[tuple[int, ...]] = [(r, self.in_features // self.a_blocks)]
        if self.train_b:
            out.append(self._lora_b())
        if self.kind == "dora" or self.dora:
            out.append((self.out_features,))  # lora_magnitude_vector
        return tuple(out)

    def frozen_tensors(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of adapter weights peft creates but does not train (``lora_B`` under ``mica``)."""
        if self.shapes or self.kind == "ia3" or self.train_b:
            return ()
        return (self._lora_b(),)

    def _lora_b(self) -> tuple[int, int]:
        return (self.out_features, self.rank * self.num_experts // self.b_blocks)

    @property
    def params(self) -> int:
        """Trainable parameters this adapter adds, exactly as peft allocates them."""
        return sum(math.prod(shape) for shape in self.tensors())

    @property
    def frozen_params(self) -> int:
        """Adapter weights that do not train (:meth:`frozen_tensors`)."""
        return sum(math.prod(shape) for shape in self.frozen_tensors())

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the buffers this adapter adds to its module (:attr:`buffers`)."""
        return buffers_bytes(self.buffers)

    @property
    def layer_key(self) -> str:
        """The path with the layer index replaced by ``*``, to group identical layers."""
        return re.sub(r"\.\d+\.", ".*.", self.path, count=1)


def buffers_bytes(buffers: Iterable[tuple[tuple[int, ...], str]]) -> int:
    """Bytes of buffers given as ``(shape, dtype)`` pairs (``fp32``, ``bf16``, ``fp16``, ``int64``...)."""
    return sum(math.prod(shape) * nbytes(dtype) for shape, dtype in buffers)


@dataclass(frozen=True)
class SavedModule:
    """A module peft trains in full as a copy (``modules_to_save``)."""

    path: str
    params: int


def lora_adapters(inventory: Inventory, plan: TrainingPlan, *, kind: str = "lora") -> tuple[ModuleAdapter, ...]:
    """The adapters ``get_peft_model(model, LoraConfig(...))`` creates for ``plan``.

    Besides the targets: ``layers_to_transform``/``layers_pattern`` keep the adapters of some
    layers (:func:`peftaudit.matching.module_targeted`); BD-LoRA (``bdlora_a``/``bdlora_b``,
    peft's ``use_bdlora``) makes ``lora_A`` or ``lora_B`` block-diagonal on the modules whose path
    contains one of the names (``BdLoraLinearVariant.init``: ``pattern in target_name``); the
    ``mica`` init freezes ``lora_B`` (``MiCALinearVariant``/``MiCAEmbeddingVariant``).

    Raises :class:`PlanError` when a target matches nothing or matches a module
    LoRA cannot wrap, or for an option peft refuses on it, as peft does.
    """
    targets: str | tuple[str, ...] = plan.targets
    model_type = inventory.model_type or ""
    if plan.layers_to_transform and isinstance(targets, str) and targets != "default":
        # LoraConfig.__post_init__ refuses it: peft filters layers of name lists only.
        raise PlanError(
            "peft refuses layers_to_transform with targets given as one string ('all-linear' or a regular "
            "expression); give the targets as names"
        )
    if targets == "default":
        if model_type not in DEFAULT_LORA_TARGETS:
            raise PlanError(f"peft has no default LoRA targets for model type '{model_type}'; give --targets")
        targets = DEFAULT_LORA_TARGETS[model_type]
    rank_pattern = dict(plan.rank_pattern)
    target_parameters = list(plan.target_parameters)
    modules = {m.path: m for m in inventory.modules if m.path}
    if is_all_linear(targets):
        names: str | set[str] = set(all_linear(inventory))
    elif isinstance(targets, str):
        names = targets
    else:
        names = set(targets)

    base = _MOE_BASE.get(model_type)
    if base is not None and peft_converts_moe_targets(inventory, plan):
        names, target_parameters, rank_pattern = _convert_moe(
            inventory, names, target_parameters, rank_pattern, base, plan
        )

    # A LoRA variant (peft's LoraVariant): BD-LoRA or MiCA. peft finds no variant class for them
    # combined with DoRA, on an embedding, or on a parameter, and refuses.
    bdlora = bool(plan.bdlora_a or plan.bdlora_b)
    variant = "BD-LoRA" if bdlora else "the mica init" if plan.lora_init == "mica" else None
    if bdlora and plan.lora_init == "mica":
        raise PlanError("peft has no LoRA variant combining BD-LoRA and the mica init; use one or the other")
    if variant is not None and kind == "dora":
        raise PlanError(f"peft has no DoRA variant with {variant}; use one or the other")
    layers = plan.layers_to_transform or None
    pattern = plan.layers_pattern or None
    adapters: list[ModuleAdapter] = []
    for path, module in modules.items():
        if not module_targeted(
            path,
            names,
            exclude=plan.exclude,
            modules_to_save=plan.modules_to_save,
            layers_to_transform=layers,
            layers_pattern=pattern,
        ):
            continue
        # Subclasses of nn.Linear (Falcon's FalconLinear) are linear to peft too.
        if not module.is_linear and module.type not in _LORA_MODULE_TYPES:
            raise PlanError(
                f"target '{path}' is a {module.type}; LoRA wraps Linear, Conv1D and Embedding "
                "modules only (give the module's linear children instead)"
            )
        r = pattern_value(rank_pattern, path, plan.rank)
        train_b = plan.lora_init != "mica"
        if module.type == "Embedding":
            if bdlora:
                raise PlanError(f"peft's BD-LoRA wraps linear layers only; target '{path}' is an embedding")
            num, dim = _embedding_shape(inventory, path)
            _check_mica(plan, path, r, num, dim)
            adapters.append(ModuleAdapter(path, "lora_embedding", r, num, dim, dora=kind == "dora", train_b=train_b))
            continue
        in_f, out_f = module.in_features or 0, module.out_features or 0
        _check_mica(plan, path, r, in_f, out_f)
        a_blocks, b_blocks = _bdlora_blocks(plan, path, r, in_f, out_f)
        adapters.append(
            ModuleAdapter(path, kind, r, in_f, out_f, a_blocks=a_blocks, b_blocks=b_blocks, train_b=train_b)
        )

    if target_parameters:
        if kind == "dora":
            raise PlanError("DoRA cannot adapt parameters directly (peft's ParamWrapper); drop target_parameters")
        if variant is not None:
            raise PlanError(f"peft cannot adapt parameters directly (ParamWrapper) with {variant}")
        if plan.dropout > 0:
            raise PlanError("peft's target_parameters do not support LoRA dropout; set dropout to 0")
        found = _param_adapters(inventory, target_parameters, rank_pattern, plan.rank)
        # A name the user gave that matches no parameter is a typo, as an unknown target module is.
        adapted = [f"{a.path}.{a.parameter}" for a in found]
        missing = [t for t in plan.target_parameters if not any(parameter_targeted(k, (t,)) for k in adapted)]
        if missing:
            raise PlanError(
                f"target_parameters {missing} match no parameter of this {inventory.architecture} "
                "(give parameter names or their ends, e.g. mlp.experts.gate_up_proj)"
            )
        adapters.extend(found)

    if not adapters:
        raise PlanError(
            f"LoRA targets {_describe(plan.targets)} match no module of this {inventory.architecture}"
            + (f" in layers {list(plan.layers_to_transform)}" if plan.layers_to_transform else "")
            + (
                f" (and target_parameters {list(plan.target_parameters)} no parameter)"
                if plan.target_parameters
                else ""
            )
        )
    return tuple(adapters)


def _bdlora_blocks(plan: TrainingPlan, path: str, rank: int, in_f: int, out_f: int) -> tuple[int, int]:
    """``(a_blocks, b_blocks)`` of a linear adapter under BD-LoRA (1, 1 without it).

    peft matches each name as a substring of the module's full path. Under its default
    ``match_strict`` a target matching neither list is refused; a plan cannot say whether the config
    was strict, so such a target gets a plain LoRA, which is what a lenient config builds.
    """
    in_a = any(name in path for name in plan.bdlora_a)
    in_b = any(name in path for name in plan.bdlora_b)
    if in_a and in_b:
        raise PlanError(f"BD-LoRA: target '{path}' matches both the block-diagonal A and B names")
    if not (in_a or in_b):
        return 1, 1
    n = plan.bdlora_blocks
    # BlockDiagonalLinear(in, out, nblocks) needs both sides divisible by nblocks.
    sides = (in_f, rank) if in_a else (rank, out_f)
    if any(side % n for side in sides):
        factor = "lora_A" if in_a else "lora_B"
        raise PlanError(
            f"BD-LoRA: {factor} of '{path}' is {sides[0]} x {sides[1]} (in x out), not divisible into {n} blocks"
        )
    return (n, 1) if in_a else (1, n)


def _check_mica(plan: TrainingPlan, path: str, rank: int, in_f: int, out_f: int) -> None:
    # MiCA takes the last r left singular vectors of the base weight (layer.py mica_init).
    if plan.lora_init == "mica" and rank > min(in_f, out_f):
        raise PlanError(f"the mica init needs rank <= min(in, out); '{path}' is {in_f} x {out_f}, rank {rank}")


def ia3_adapters(inventory: Inventory, plan: TrainingPlan) -> tuple[ModuleAdapter, ...]:
    """IA3 scaling vectors on peft's default IA3 targets (or ``plan.targets`` when given as names); inputs
    scaled on the feed-forward ones (``plan.feedforward_modules``, else peft's default for the architecture)."""
    model_type = inventory.model_type or ""
    defaults = DEFAULT_IA3_TARGETS.get(model_type)
    if plan.targets == "default" or is_all_linear(plan.targets) or not isinstance(plan.targets, tuple):
        if defaults is None:
            raise PlanError(f"peft has no default IA3 targets for model type '{model_type}'; give --targets")
        names: tuple[str, ...] = defaults[0]
    else:
        names = plan.targets
    # peft's _prepare_adapter_config: feed-forward modules not given are the architecture's default.
    if plan.feedforward_modules is not None:
        feedforward = plan.feedforward_modules
    elif defaults is None:
        raise PlanError(
            f"peft has no default IA3 feed-forward modules for model type '{model_type}'; give --feedforward-modules"
        )
    else:
        feedforward = defaults[1]
    adapters = []
    for module in inventory.modules:
        if not module.path or not module.is_linear:
            continue
        if not module_targeted(module.path, names, exclude=plan.exclude, modules_to_save=plan.modules_to_save):
            continue
        ff = targets_match(feedforward, module.path)
        adapters.append(
            ModuleAdapter(module.path, "ia3", 0, module.in_features or 0, module.out_features or 0, feedforward=ff)
        )
    if not adapters:
        raise PlanError(f"IA3 targets {list(names)} match no linear module of this {inventory.architecture}")
    return tuple(adapters)


def saved_modules(inventory: Inventory, plan: TrainingPlan) -> tuple[SavedModule, ...]:
    """``modules_to_save``: each matching module (``path.endswith(name)``) and its parameter count."""
    if not plan.modules_to_save:
        return ()
    found: list[SavedModule] = []
    paths = [m.path for m in inventory.modules if m.path]
    chosen = [p for p in paths if saved(p, plan.modules_to_save)]
    # A module inside an already chosen module is part of that copy.
    chosen = [p for p in chosen if not any(p != q and p.startswith(q + ".") for q in chosen)]
    for path in chosen:
        count = sum(p.numel for p in _params_under(inventory, path))
        found.append(SavedModule(path, count))
    missing = [n for n in plan.modules_to_save if not any(s.path.endswith(n) for s in found)]
    if missing:
        raise PlanError(f"modules_to_save {missing} match no module of this {inventory.architecture}")
    return tuple(found)


# --- helpers --------------------------------------------------------------------------------


def _embedding_shape(inventory: Inventory, path: str) -> tuple[int, int]:
    for p in inventory.parameters:
        if p.module == path or any(n.rpartition(".")[0] == path for n in p.tied_with):
            return p.shape[0], p.shape[1]
    raise PlanError(f"embedding '{path}' has no weight")


def _params_under(inventory: Inventory, path: str) -> Iterable[ParameterRecord]:
    for p in inventory.parameters:
        names = (p.name, *p.tied_with)
        if any(n.startswith(path + ".") for n in names):
            yield p


def _param_adapters(
    inventory: Inventory, target_parameters: list[str], rank_pattern: Mapping[str, int], rank: int
) -> list[ModuleAdapter]:
    adapters = []
    targets = sorted(set(target_parameters))
    for p in inventory.parameters:
        key = p.name
        if not parameter_targeted(key, targets):
            continue
        r = pattern_value(rank_pattern, key, rank)
        if len(p.shape) == 3:
            experts, a, b = p.shape
        elif len(p.shape) == 2:
            experts, a, b = 1, p.shape[1], p.shape[0]
        else:
            raise PlanError(f"target parameter '{key}' has {len(p.shape)} dimensions; peft adapts 2-D and 3-D ones")
        adapters.append(ModuleAdapter(p.module, "lora", r, a, b, num_experts=experts, parameter=key.rpartition(".")[2]))
    return adapters


def _leaf_names(inventory: Inventory, names: str | set[str]) -> set[str]:
    """Resolve a regex or a set of paths to the leaf names it matches (peft's MoE conversion)."""
    if isinstance(names, str):
        keys = [m.path for m in inventory.modules if m.path] + [p.name for p in inventory.parameters]
        return {k.rpartition(".")[2] for k in keys if re.fullmatch(names, k)}
    return {n.rpartition(".")[2] for n in names}


def _convert_moe(
    inventory: Inventory,
    names: str | set[str],
    target_parameters: list[str],
    rank_pattern: dict[str, int],
    base: str,
    plan: TrainingPlan,
) -> tuple[str | set[str], list[str], dict[str, int]]:
    mapping = _MOE_MAPPING[base]
    fused = _MOE_FUSED[base]
    if isinstance(names, str):
        resolved = _leaf_names(inventory, names)
        # Probe the pre-fusion names inside the fused parameters' containers.
        containers: dict[str, set[str]] = {}
        for p in inventory.parameters:
            container, _, leaf = p.name.rpartition(".")
            containers.setdefault(leaf, set()).add(container)
        for old, new in mapping.items():
            if old in resolved:
                continue
            if any(re.fullmatch(names, f"{c}.{old}") for c in containers.get(new, ())):
                resolved.add(old)
        if not resolved:
            return names, target_parameters, rank_pattern
        name_set = resolved
    elif is_all_linear(plan.targets):
        name_set = _leaf_names(inventory, names) | set(mapping)
    else:
        name_set = set(names)

    new_params = set(target_parameters)
    remaining: set[str] = set()
    matched: dict[str, set[str]] = {n: set() for n in fused}
    for target in name_set:
        hit = next(((old, new) for old, new in mapping.items() if target == old or target.endswith("." + old)), None)
        if hit is None:
            remaining.add(target)
            continue
        new_params.add(hit[1])
        if hit[1] in fused:
            matched[hit[1]].add(hit[0])
    for new, required in fused.items():
        present = matched.get(new, set())
        if 0 < len(present) < len(required):
            missing = ", ".join(sorted(set(required) - present))
            raise PlanError(
                f"peft cannot adapt {', '.join(sorted(present))} without {missing}: both are fused into {new}"
            )
        if len(present) == len(required) > 1:
            rank_pattern = {**rank_pattern, rf".*\.{re.escape(new)}": plan.rank * len(required)}
    return remaining, sorted(new_params), rank_pattern


def _describe(targets: str | tuple[str, ...]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))


def module_by_path(inventory: Inventory) -> dict[str, ModuleRecord]:
    """Module records keyed by path (root excluded)."""
    return {m.path: m for m in inventory.modules if m.path}
