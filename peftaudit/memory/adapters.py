"""peft's module adapters beyond LoRA: AdaLoRA, LoHa, LoKr, VeRA, OFT and BOFT, shaped as peft 0.21 shapes them.

Like :mod:`peftaudit.memory.targets`, everything here reads the inventory only: which modules a
config selects is :mod:`peftaudit.matching` (peft's ``check_target_module_exists``, with
``layers_to_transform``/``layers_pattern``), and this module adds what each tuner then creates
(peft 0.21.2, ``src/peft/tuners/<method>/``):

* ``adalora`` (``adalora/layer.py:AdaLoraLayer.update_layer``): ``lora_A (init_r, in)``,
  ``lora_E (init_r, 1)``, ``lora_B (out, init_r)`` and ``ranknum (1,)`` per module. ``ranknum`` is
  created frozen but trains since peft 0.21 (:func:`adalora_trains_ranknum`). The rank
  allocator (``RankAllocator.update_ipt``) keeps three fp32 statistics of every A, E and B
  (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``): counted with the optimizer states
  (:mod:`peftaudit.memory.analytic.static`).
* ``loha`` (``loha/layer.py:LoHaLayer.create_adapter_parameters``): ``hada_w1_a``,
  ``hada_w2_a (out, r)`` and ``hada_w1_b``, ``hada_w2_b (r, in)``: ``2r(in + out)``.
* ``lokr`` (``lokr/layer.py:LoKrLayer.update_layer``, ``factorization``): in and out split by
  :func:`factorization`; the left factor ``lokr_w1 (out_l, in_m)`` is decomposed into
  ``lokr_w1_a (out_l, r)`` + ``lokr_w1_b (r, in_m)`` only with ``decompose_both`` and
  ``r < max(out_l, in_m) / 2``; the right factor ``lokr_w2 (out_k, in_n)`` whenever
  ``r < max(out_k, in_n) / 2``.
* ``vera`` (``vera/layer.py:VeraLayer.update_layer``, ``vera/model.py:VeraModel._find_dim``):
  ``vera_lambda_b (out,)`` and ``vera_lambda_d (r,)`` per module, and once per model the shared
  random projections ``vera_A (r, max in)`` and ``vera_B (max out, r)`` over the targeted modules:
  buffers in the adapter dtype (fp32 unless ``adapter_dtype="auto"``).
* ``oft`` (``oft/layer.py:OFTLayer.update_layer``, ``adjust_oft_parameters``): block size ``b``
  (given, or ``in / r`` for a given block count ``r``; a size that does not divide ``in`` is
  adjusted to the nearest divisor), ``oft_R.weight (r, b(b-1)/2)`` (one row with
  ``block_share``) and the non-persistent int64 index buffers ``rows`` and ``cols``
  (``b(b-1)/2`` each, ``OFTRotationModule.__init__``). Embeddings rotate their embedding dimension.
* ``boft`` (``boft/layer.py:BOFTLayer.update_layer``): ``boft_R (f, blocks, b, b)``,
  ``boft_s (out, 1)`` and the non-persistent fp32 permutations ``boft_P (f, in, in)`` for
  butterfly factor ``f``. peft runs ``f > 1`` only with its CUDA extension ``fbd_cuda``
  (JIT-built with ninja and nvcc); without it peft quietly uses ``f = 1``
  (``get_fbd_cuda``). The estimate models the extension (the factor as given).

Default targets (``targets="default"``) are peft's per-architecture mappings
(``peft/utils/constants.py``), for the families :data:`DEFAULT_LORA_TARGETS` lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from peftaudit.inventory import Inventory, ModuleRecord
from peftaudit.matching import expand_targets, module_targeted, pattern_value
from peftaudit.memory.methods import Adaptation, _lora_biases
from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.memory.targets import DEFAULT_LORA_TARGETS, ModuleAdapter, saved_modules

#: ``TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`` (peft/utils/constants.py) for the families
#: :data:`DEFAULT_LORA_TARGETS` lists (AdaLoRA's has no mistral, mixtral, phi or falcon entry).
DEFAULT_ADALORA_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt_neox": ("query_key_value",),
    "llama": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
}
#: ``TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING``: LoRA's, but phi's attention only.
DEFAULT_VERA_TARGETS: dict[str, tuple[str, ...]] = {**DEFAULT_LORA_TARGETS, "phi": ("q_proj", "v_proj")}
#: Each method's default targets; LoHa, LoKr, OFT and BOFT copy LoRA's mapping.
DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "adalora": DEFAULT_ADALORA_TARGETS,
    "loha": DEFAULT_LORA_TARGETS,
    "lokr": DEFAULT_LORA_TARGETS,
    "vera": DEFAULT_VERA_TARGETS,
    "oft": DEFAULT_LORA_TARGETS,
    "boft": DEFAULT_LORA_TARGETS,
}

#: The module types each tuner wraps (its ``layers_mapping``/``_get_tuner_layer_class``), as
#: :func:`_module_class` names them. ``conv`` (torch's Conv1d/Conv2d) is wrapped by some of them
#: but not modelled here.
_WRAPS: dict[str, tuple[str, ...]] = {
    "adalora": ("linear", "conv1d-hf"),
    "loha": ("linear",),
    "lokr": ("linear",),
    "vera": ("linear", "conv1d-hf"),
    "oft": ("linear", "embedding"),
    "boft": ("linear",),
}
_PEFT_NAMES = {
    "adalora": "AdaLoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "vera": "VeRA",
    "oft": "OFT",
    "boft": "BOFT",
}
_WRAPS_TEXT = {
    "adalora": "torch's Linear and Conv2d and transformers' Conv1D",
    "loha": "torch's Linear, Conv1d and Conv2d",
    "lokr": "torch's Linear, Conv1d and Conv2d",
    "vera": "torch's Linear and transformers' Conv1D",
    "oft": "torch's Linear, Conv2d and Embedding",
    "boft": "torch's Linear and Conv2d",
}


# --- shape rules ------------------------------------------------------------------------------


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n == dimension``: peft's LoKr rule.

    A port of ``peft/tuners/lokr/layer.py:factorization`` (itself LyCORIS'): ``factor`` when it
    divides ``dimension``; else the divisor pair closest to the square root with ``m`` at most
    ``factor`` (no bound for -1).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """The divisor of ``in_features`` peft uses for an OFT block size or count that is not one
    (``peft/tuners/oft/layer.py:OFTLayer.adjust_oft_parameters``): the nearer of the next
    divisor up and down, the lower on a tie; ``in_features`` for a value above it."""
    if params < in_features:
        higher = params
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (params - lower) <= (higher - params) else higher


def loha_shapes(in_f: int, out_f: int, r: int) -> tuple[tuple[int, ...], ...]:
    """``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` of a Linear layer."""
    return ((out_f, r), (r, in_f), (out_f, r), (r, in_f))


def lokr_shapes(in_f: int, out_f: int, r: int, factor: int, decompose_both: bool) -> tuple[tuple[int, ...], ...]:
    """LoKr's Kronecker factors of a Linear layer (``LoKrLayer.update_layer``, ``create_adapter_parameters``)."""
    in_m, in_n = factorization(in_f, factor)
    out_l, out_k = factorization(out_f, factor)
    shapes: list[tuple[int, ...]] = []
    if decompose_both and r < max(out_l, in_m) / 2:
        shapes += [(out_l, r), (r, in_m)]  # lokr_w1_a, lokr_w1_b
    else:
        shapes.append((out_l, in_m))  # lokr_w1
    if r < max(out_k, in_n) / 2:
        shapes += [(out_k, r), (r, in_n)]  # lokr_w2_a, lokr_w2_b
    else:
        shapes.append((out_k, in_n))  # lokr_w2
    return tuple(shapes)


def oft_blocks(in_f: int, block_size: int, blocks: int) -> tuple[int, int]:
    """``(r, b)``: OFT's block count and size for a layer rotating ``in_f`` features (``update_layer``)."""
    if blocks == 0:
        b = block_size
        if in_f % b != 0 or b > in_f:
            b = adjust_oft_parameters(in_f, b)
        return in_f // b, b
    r = blocks
    if in_f % r != 0 or r > in_f:
        r = adjust_oft_parameters(in_f, r)
    return r, in_f // r


def boft_blocks(path: str, in_f: int, block_size: int, blocks: int, butterfly: int) -> tuple[int, int]:
    """``(blocks, block size)`` of a BOFT layer, refusing what ``BOFTLayer.update_layer`` refuses."""
    n = butterfly - 1  # peft's boft_n_butterfly_factor - 1 ("to be consistent with the paper notation")
    if block_size == 0:
        if in_f % blocks:
            raise PlanError(f"BOFT: {path} has {in_f} input features, not divisible by {blocks} blocks")
        if n and (n > (blocks.bit_length() - 1) or blocks % (2**n)):
            raise PlanError(
                f"BOFT: {blocks} blocks do not allow butterfly factor {butterfly} (blocks must be a multiple of {2**n})"
            )
        block_size = in_f // blocks
    else:
        if in_f % block_size:
            raise PlanError(f"BOFT: {path} has {in_f} input features, not divisible by block size {block_size}")
        if n and in_f % (block_size * 2**n):
            raise PlanError(
                f"BOFT: {path} has {in_f} input features, not a multiple of block size {block_size} "
                f"x 2^{n} (butterfly factor {butterfly})"
            )
        blocks = in_f // block_size
    if n and (blocks % 2 or block_size % 2):
        raise PlanError(
            f"BOFT: butterfly factor {butterfly} needs an even number of blocks of an even size; "
            f"{path} gets {blocks} blocks of {block_size}"
        )
    return blocks, block_size


# --- which modules ---------------------------------------------------------------------------


def _module_class(module: ModuleRecord) -> str:
    """How peft's tuners tell modules apart: ``linear`` (``nn.Linear`` and subclasses), ``conv1d-hf``
    (transformers' ``Conv1D``), ``embedding``, ``conv`` (torch's convolutions) or ``other``."""
    if module.type == "Conv1D":
        return "conv1d-hf"
    if module.is_linear:
        return "linear"
    if module.type == "Embedding" or module.type.endswith("Embedding"):
        return "embedding"
    if module.type in ("Conv1d", "Conv2d"):
        return "conv"
    return "other"


def _embedding_dims(inventory: Inventory, path: str) -> tuple[int, int]:
    for p in inventory.parameters:
        if len(p.shape) == 2 and (p.module == path or any(n.rpartition(".")[0] == path for n in p.tied_with)):
            return p.shape[0], p.shape[1]
    raise PlanError(f"embedding '{path}' has no weight")


def targeted(inventory: Inventory, plan: TrainingPlan, method: str) -> list[ModuleRecord]:
    """The modules ``get_peft_model`` adapts with ``method`` under ``plan``, refusing what peft refuses."""
    label = _PEFT_NAMES[method]
    model_type = inventory.model_type or ""
    targets: Any = plan.targets
    if method == "adalora" and isinstance(targets, str) and targets != "default" and plan.layers_to_transform:
        # AdaLoraConfig.__post_init__: a string target_modules ("all-linear" too) with layers_to_transform
        raise PlanError("AdaLoRA cannot combine a string target (a regex or all-linear) with layers to transform")
    if targets == "default":
        defaults = DEFAULT_TARGETS[method]
        if model_type not in defaults:
            raise PlanError(f"peft has no default {label} targets for model type '{model_type}'; give --targets")
        targets = defaults[model_type]
    names = expand_targets(inventory, targets)
    found: list[ModuleRecord] = []
    for module in inventory.modules:
        if not module.path or not module_targeted(
            module.path,
            names,
            exclude=plan.exclude,
            modules_to_save=plan.modules_to_save,
            layers_to_transform=plan.layers_to_transform or None,
            layers_pattern=plan.layers_pattern or None,
        ):
            continue
        kind = _module_class(module)
        if kind not in _WRAPS[method]:
            where = f"target '{module.path}' is a {module.type}"
            if kind == "conv":
                raise PlanError(f"{where}: peft's {label} wraps it, but the estimate models {label} on linear layers")
            if kind == "conv1d-hf":
                raise PlanError(f"{where} (transformers' own layer): peft's {label} wraps {_WRAPS_TEXT[method]} only")
            raise PlanError(
                f"{where}: peft's {label} wraps {_WRAPS_TEXT[method]} modules (give the module's linear children)"
            )
        found.append(module)
    if not found:
        shown = repr(targets) if isinstance(targets, str) else repr(list(targets))
        raise PlanError(f"{label} targets {shown} match no module of this {inventory.architecture}")
    return found


def _check_options(plan: TrainingPlan, method: str) -> None:
    """Refuse plan fields the method's peft config does not have (peft raises on them)."""
    label = _PEFT_NAMES[method]
    if plan.target_parameters:
        raise PlanError(f"{label} cannot adapt parameters directly (target_parameters is LoRA's); drop them")
    if plan.rank_pattern and method in ("adalora", "vera", "oft", "boft"):
        what = "its rank_pattern is a saved budget mask" if method == "adalora" else "its config has no rank_pattern"
        raise PlanError(f"{label} takes no per-module ranks ({what}); drop rank_pattern")
    if plan.exclude and method == "vera":
        raise PlanError("VeRA's config has no exclude_modules; give targets that leave those modules out")
    if plan.lora_bias != "none" and method in ("loha", "lokr"):
        raise PlanError(f"{label}'s config has no bias option; lora_bias must be 'none'")


# --- the methods ------------------------------------------------------------------------------


def adalora_trains_ranknum(inventory: Inventory, plan: TrainingPlan) -> bool:
    """Whether peft trains AdaLoRA's ``ranknum`` (peft >= 0.21; the ``adalora-ranknum-frozen`` stack rule)."""
    from peftaudit.memory.stack_rules import ADALORA_RANKNUM_FROZEN, active_rules

    return ADALORA_RANKNUM_FROZEN.name not in active_rules(inventory, plan)


def _adapter_dtype(plan: TrainingPlan) -> str:
    """The dtype peft leaves adapter buffers in: fp32 (``autocast_adapter_dtype``) or the base's (``auto``)."""
    return plan.weight_dtype if plan.adapter_dtype == "auto" else "fp32"


def _adalora(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    ranknum = ((1,),) if adalora_trains_ranknum(inventory, plan) else ()
    r = plan.rank
    out = []
    for m in modules:
        in_f, out_f = m.in_features or 0, m.out_features or 0
        shapes = ((r, in_f), (r, 1), (out_f, r), *ranknum)  # lora_A, lora_E, lora_B, ranknum
        out.append(ModuleAdapter(m.path, "adalora", r, in_f, out_f, shapes=shapes))
    return out


def _loha(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    rank_pattern = dict(plan.rank_pattern)
    out = []
    for m in modules:
        in_f, out_f = m.in_features or 0, m.out_features or 0
        r = pattern_value(rank_pattern, m.path, plan.rank)
        out.append(ModuleAdapter(m.path, "loha", r, in_f, out_f, shapes=loha_shapes(in_f, out_f, r)))
    return out


def _lokr(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    rank_pattern = dict(plan.rank_pattern)
    out = []
    for m in modules:
        in_f, out_f = m.in_features or 0, m.out_features or 0
        r = pattern_value(rank_pattern, m.path, plan.rank)
        shapes = lokr_shapes(in_f, out_f, r, plan.lokr_factor, plan.lokr_decompose_both)
        out.append(ModuleAdapter(m.path, "lokr", r, in_f, out_f, shapes=shapes))
    return out


def _vera(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    r = plan.rank
    return [
        ModuleAdapter(m.path, "vera", r, m.in_features or 0, m.out_features or 0, shapes=((m.out_features or 0,), (r,)))
        for m in modules
    ]


def _oft(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    out = []
    for m in modules:
        if _module_class(m) == "embedding":
            out_f, in_f = _embedding_dims(inventory, m.path)  # rotates the embedding dimension
        else:
            in_f, out_f = m.in_features or 0, m.out_features or 0
        r, b = oft_blocks(in_f, plan.oft_block_size, plan.oft_blocks)
        n = b * (b - 1) // 2
        shapes = ((1 if plan.block_share else r, n),)
        buffers = (((n,), "int64"), ((n,), "int64"))  # OFTRotationModule's rows, cols
        out.append(ModuleAdapter(m.path, "oft", r, in_f, out_f, shapes=shapes, buffers=buffers))
    return out


def _boft(inventory: Inventory, plan: TrainingPlan, modules: list[ModuleRecord]) -> list[ModuleAdapter]:
    f = plan.boft_butterfly
    out = []
    for m in modules:
        in_f, out_f = m.in_features or 0, m.out_features or 0
        size = 0 if plan.boft_blocks else plan.boft_block_size  # a block count wins (plan.boft_blocks)
        blocks, b = boft_blocks(m.path, in_f, size, plan.boft_blocks, f)
        shapes = ((f, blocks, b, b), (out_f, 1))  # boft_R, boft_s
        buffers = (((f, in_f, in_f), "fp32"),)  # boft_P, made fp32 by torch.empty and never cast
        out.append(ModuleAdapter(m.path, "boft", blocks, in_f, out_f, shapes=shapes, buffers=buffers))
    return out


_BUILDERS: dict[str, Callable[[Inventory, TrainingPlan, list[ModuleRecord]], list[ModuleAdapter]]] = {
    "adalora": _adalora,
    "loha": _loha,
    "lokr": _lokr,
    "vera": _vera,
    "oft": _oft,
    "boft": _boft,
}


def module_adapters(inventory: Inventory, plan: TrainingPlan, method: str) -> tuple[ModuleAdapter, ...]:
    """The adapters ``get_peft_model`` creates for ``method`` (one of :data:`DEFAULT_TARGETS`) under ``plan``."""
    _check_options(plan, method)
    return tuple(_BUILDERS[method](inventory, plan, targeted(inventory, plan, method)))


def vera_projections(
    adapters: tuple[ModuleAdapter, ...], plan: TrainingPlan
) -> tuple[tuple[tuple[int, ...], str], ...]:
    """VeRA's shared ``vera_A (r, max in)`` and ``vera_B (max out, r)`` (``VeraModel._init_vera_A_vera_B``)."""
    max_in = max(a.in_features for a in adapters)
    max_out = max(a.out_features for a in adapters)
    dtype = _adapter_dtype(plan)
    return (((plan.rank, max_in), dtype), ((max_out, plan.rank), dtype))


class PeftAdapterMethod:
    """One of peft's module adapters on a frozen base (:mod:`peftaudit.memory.adapters`)."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        adapters = module_adapters(inventory, plan, self.name)
        shared = vera_projections(adapters, plan) if self.name == "vera" else ()
        return Adaptation(
            self.name,
            adapters=adapters,
            trainable=_lora_biases(inventory, plan, adapters),
            saved=saved_modules(inventory, plan),
            shared_buffers=shared,
        )


#: The methods, registered by :mod:`peftaudit.builtin.methods`.
ADAPTER_METHODS: tuple[PeftAdapterMethod, ...] = (
    PeftAdapterMethod("adalora", "AdaLoRA: SVD-shaped LoRA whose rank budget is pruned during training"),
    PeftAdapterMethod("loha", "LoHa: low-rank Hadamard product adapters (LyCORIS)"),
    PeftAdapterMethod("lokr", "LoKr: low-rank Kronecker product adapters (LyCORIS)"),
    PeftAdapterMethod("vera", "VeRA: trained scaling vectors on shared frozen random projections"),
    PeftAdapterMethod("oft", "OFT: orthogonal block rotations of each adapted layer's input"),
    PeftAdapterMethod("boft", "BOFT: butterfly-factorised orthogonal rotations of each adapted layer's input"),
)


def peft_config_kwargs(plan: TrainingPlan) -> tuple[str, dict[str, Any]]:
    """``(peft config class name, keyword arguments)`` that build ``plan``'s method in peft (for the trace).

    AdaLoRA's ``total_step`` is required (peft 0.21 refuses ``None``) and changes no shape or
    step: the schedule only decides when the allocator masks singular values, so a placeholder
    of 1000 stands in.
    """
    method = plan.method
    targets: Any = plan.targets
    if targets == "default":
        targets = None
    elif isinstance(targets, tuple):
        targets = list(targets)
    common: dict[str, Any] = {
        "target_modules": targets,
        "modules_to_save": list(plan.modules_to_save) or None,
        "layers_to_transform": list(plan.layers_to_transform) or None,
        "layers_pattern": list(plan.layers_pattern) or None,
    }
    if method != "vera":
        common["exclude_modules"] = list(plan.exclude) or None
    bias = {"adalora": "lora_only", "vera": "vera_only", "oft": "oft_only", "boft": "boft_only"}
    if method in bias and plan.lora_bias != "none":
        common["bias"] = "all" if plan.lora_bias == "all" else bias[method]
    rank_pattern: Mapping[str, int] = dict(plan.rank_pattern)
    kwargs: dict[str, Any]
    if method == "adalora":
        kwargs = {
            "init_r": plan.rank,
            "lora_alpha": plan.lora_alpha,
            "lora_dropout": plan.dropout,
            "use_rslora": plan.use_rslora,
            "total_step": 1000,
        }
        return "AdaLoraConfig", {**common, **kwargs}
    if method in ("loha", "lokr"):
        kwargs = {"r": plan.rank, "alpha": plan.lora_alpha, "rank_dropout": plan.dropout, "rank_pattern": rank_pattern}
        if method == "lokr":
            kwargs |= {"decompose_factor": plan.lokr_factor, "decompose_both": plan.lokr_decompose_both}
        return ("LoHaConfig" if method == "loha" else "LoKrConfig"), {**common, **kwargs}
    if method == "vera":
        return "VeraConfig", {**common, "r": plan.rank, "vera_dropout": plan.dropout}
    if method == "oft":
        sizes = {"r": plan.oft_blocks, "oft_block_size": 0} if plan.oft_blocks else {"r": 0}
        sizes.setdefault("oft_block_size", plan.oft_block_size)
        kwargs = {**sizes, "block_share": plan.block_share, "module_dropout": plan.dropout}
        return "OFTConfig", {**common, **kwargs}
    if method == "boft":
        sizes = {"boft_block_num": plan.boft_blocks, "boft_block_size": 0} if plan.boft_blocks else {}
        sizes.setdefault("boft_block_size", plan.boft_block_size)
        sizes.setdefault("boft_block_num", 0)
        kwargs = {**sizes, "boft_n_butterfly_factor": plan.boft_butterfly, "boft_dropout": plan.dropout}
        return "BOFTConfig", {**common, **kwargs}
    raise PlanError(f"'{method}' is not one of peft's module adapters modelled here")


__all__ = [
    "ADAPTER_METHODS",
    "DEFAULT_ADALORA_TARGETS",
    "DEFAULT_TARGETS",
    "DEFAULT_VERA_TARGETS",
    "PeftAdapterMethod",
    "adalora_trains_ranknum",
    "adjust_oft_parameters",
    "boft_blocks",
    "factorization",
    "loha_shapes",
    "lokr_shapes",
    "module_adapters",
    "oft_blocks",
    "peft_config_kwargs",
    "targeted",
    "vera_projections",
]
