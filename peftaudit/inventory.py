"""One walk over a module tree: a record for every parameter, buffer and module.

The walk works on any ``torch.nn.Module`` (a meta-device skeleton, a live model,
a ``PeftModel``) and never reads tensor values, so it is as fast on a 405B
skeleton as on a small model. Everything downstream (the report, the memory
estimator, the recommender) reads the :class:`Inventory` and never the module.

Counting rules, each tested against published counts and peft:

* Tied or shared parameters (one tensor reachable under several names, such as
  ``lm_head.weight`` and ``model.embed_tokens.weight``) are counted once, under
  the first name ``named_parameters()`` yields; the other names are listed in
  ``tied_with``.
* Quantized bitsandbytes parameters are counted at their true element count,
  not the packed storage count ``numel()`` reports.
* Biases are parameters named ``bias`` or ``*_bias``; everything else is a
  weight. Buffers are counted apart and never in ``total``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peftaudit.architecture import ArchitectureRules, ModuleRole, classify_module

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Parameter kinds, in the user's words. Every parameter has exactly one.
KINDS: tuple[str, ...] = (
    "weight",
    "bias",
    "norm",
    "embedding",
    "output_head",
    "experts",
    "router",
    "other",
)

_LAYER_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class ParameterRecord:
    """One parameter of the model, counted once even when tied."""

    name: str
    """Full name as ``named_parameters()`` yields it, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    module: str
    """Path of the module that owns it (``""`` for the root)."""
    module_type: str
    """Class name of the owning module, e.g. ``Linear``, ``Conv1D``, ``MixtralExperts``."""
    shape: tuple[int, ...]
    dtype: str
    numel: int
    """True element count (packed quantized storage is expanded)."""
    kind: str
    """One of :data:`KINDS`."""
    is_bias: bool
    trainable: bool
    layer: int | None = None
    """Index of the repeated block it sits in (``layers.7`` -> 7), if any."""
    block: str | None = None
    """Path of the repeated container (``model.layers``), if any."""
    tied_with: tuple[str, ...] = ()
    """Other names under which the same tensor is reachable."""
    quantization: str | None = None
    """``"4bit"`` or ``"8bit"`` for bitsandbytes parameters, else ``None``."""


@dataclass(frozen=True)
class BufferRecord:
    """A registered buffer (rotary frequencies, position ids, ...): counted apart."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    persistent: bool


@dataclass(frozen=True)
class ModuleRecord:
    """One module of the tree with what the later stages need to know about it."""

    path: str
    type: str
    role: str | None
    """Architecture role (``attention.q``, ``mlp.down``, ``router`` ...), see :class:`ModuleRole`."""
    is_linear: bool
    """An ``nn.Linear`` or transformers ``Conv1D``: what LoRA's ``all-linear`` can adapt."""
    in_features: int | None
    out_features: int | None
    own_params: int
    """Parameters owned directly by this module (tied aliases excluded)."""
    layer: int | None
    block: str | None


@dataclass(frozen=True)
class TiedGroup:
    """Names that refer to one tensor; counted once under ``names[0]``."""

    names: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class MoeInfo:
    """Mixture-of-experts facts: expert count, routing width, active parameters."""

    num_experts: int
    experts_per_token: int
    expert_params: int
    """Parameters in routed experts (fused 3-D tensors or per-expert modules)."""
    active_params: int
    """Parameters one token uses: everything but the routed experts, plus top-k of them."""


@dataclass(frozen=True)
class ModelDims:
    """Architecture numbers read from the config (text model for multimodal configs)."""

    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None


@dataclass(frozen=True)
class Inventory:
    """Every parameter, buffer and module of one model, with totals derived from them."""

    architecture: str
    model_type: str | None
    parameters: tuple[ParameterRecord, ...]
    buffers: tuple[BufferRecord, ...]
    modules: tuple[ModuleRecord, ...]
    tied_groups: tuple[TiedGroup, ...]
    dims: ModelDims = field(default_factory=ModelDims)
    moe: MoeInfo | None = None
    output_head: str | None = None
    """Path of the output embedding module (what ``get_output_embeddings()`` returns: ``lm_head``, BERT's
    ``cls.predictions.decoder``), tied or not; ``None`` when the model has none (classification models).
    peft's ``all-linear`` leaves exactly this module out (:mod:`peftaudit.matching`)."""
    quantization_config: Any = field(default=None, compare=False, repr=False)
    """The config's ``quantization_config`` as published (pre-quantized checkpoints), else ``None``.
    Counts stay logical; :mod:`peftaudit.memory.quantized` reads the storage it implies."""
    config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    """The model's config as a dict (``config.to_dict()``), when it has one: what a derived layer
    profile rebuilds a depth-reduced copy of the model from (:mod:`peftaudit.memory.derived`)."""
    keep_in_fp32: tuple[str, ...] = ()
    """The model's ``_keep_in_fp32_modules`` (transformers): float32 in fp16 loads, never quantized
    (:mod:`peftaudit.memory.keep_fp32`)."""
    keep_in_fp32_strict: tuple[str, ...] = ()
    """The model's ``_keep_in_fp32_modules_strict``: float32 in fp16 and bf16 loads."""
    supports_gradient_checkpointing: bool | None = field(default=None, compare=False)
    """Whether transformers lets this model class checkpoint its layers (``False``: ConvNeXt), as
    :func:`peftaudit.sources.load.load_resolved` found at build time, so a model read back from the
    model cache is judged without importing transformers; ``None`` (an inventory of a live module, one
    made by hand) looks the class up by name (:func:`peftaudit.memory.checkpointing.check_checkpointing`)."""

    @property
    def total(self) -> int:
        """All parameters, tied ones once, buffers excluded."""
        return sum(p.numel for p in self.parameters)

    @property
    def weights(self) -> int:
        return sum(p.numel for p in self.parameters if not p.is_bias)

    @property
    def biases(self) -> int:
        return sum(p.numel for p in self.parameters if p.is_bias)

    @property
    def buffers_total(self) -> int:
        return sum(b.numel for b in self.buffers)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.parameters if p.trainable)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def by_kind(self) -> dict[str, int]:
        """Parameter count per kind, every kind present (zero when absent)."""
        counts = dict.fromkeys(KINDS, 0)
        for p in self.parameters:
            counts[p.kind] += p.numel
        return counts

    def by_module_type(self) -> dict[str, int]:
        """Parameter count per owning module class, largest first."""
        counts: dict[str, int] = {}
        for p in self.parameters:
            counts[p.module_type] = counts.get(p.module_type, 0) + p.numel
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def module(self, path: str) -> ModuleRecord | None:
        """The module record at ``path``, if any."""
        for m in self.modules:
            if m.path == path:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        """Everything the inventory holds as JSON-ready data (:meth:`from_dict` reads it back equal).

        What the model cache stores (:mod:`peftaudit.cache`): the records' fields as they are (JSON
        writes tuples as lists and roles as their text); ``config`` and ``quantization_config`` as given.
        """
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "parameters": [dict(vars(p)) for p in self.parameters],
            "buffers": [dict(vars(b)) for b in self.buffers],
            "modules": [dict(vars(m)) for m in self.modules],
            "tied_groups": [dict(vars(g)) for g in self.tied_groups],
            "dims": dict(vars(self.dims)),
            "moe": dict(vars(self.moe)) if self.moe is not None else None,
            "output_head": self.output_head,
            "quantization_config": self.quantization_config,
            "config": dict(self.config) if self.config is not None else None,
            "keep_in_fp32": list(self.keep_in_fp32),
            "keep_in_fp32_strict": list(self.keep_in_fp32_strict),
            "supports_gradient_checkpointing": self.supports_gradient_checkpointing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inventory:
        """The inventory :meth:`to_dict` wrote (raises ``KeyError``/``TypeError`` on anything else)."""
        moe = data["moe"]
        return cls(
            architecture=data["architecture"],
            model_type=data["model_type"],
            parameters=tuple(
                ParameterRecord(**{**p, "shape": tuple(p["shape"]), "tied_with": tuple(p["tied_with"])})
                for p in data["parameters"]
            ),
            buffers=tuple(BufferRecord(**{**b, "shape": tuple(b["shape"])}) for b in data["buffers"]),
            modules=tuple(ModuleRecord(**{**m, "role": _role(m["role"])}) for m in data["modules"]),
            tied_groups=tuple(TiedGroup(names=tuple(g["names"]), numel=g["numel"]) for g in data["tied_groups"]),
            dims=ModelDims(**data["dims"]),
            moe=MoeInfo(**moe) if moe is not None else None,
            output_head=data["output_head"],
            quantization_config=data["quantization_config"],
            config=data["config"],
            keep_in_fp32=tuple(data["keep_in_fp32"]),
            keep_in_fp32_strict=tuple(data["keep_in_fp32_strict"]),
            supports_gradient_checkpointing=data["supports_gradient_checkpointing"],
        )


def take_inventory(
    model: torch.nn.Module,
    *,
    rules: ArchitectureRules | None = None,
    config: Mapping[str, Any] | None = None,
) -> Inventory:
    """Walk ``model`` once and return its :class:`Inventory`.

    ``rules`` classify modules into roles (attention, MLP, router, ...); by
    default the rules registered by plugins are used. ``config`` is the
    model's config as a dict; by default ``model.config`` is read when present.
    """
    if rules is None:
        from peftaudit.plugins import architecture_rules

        rules = architecture_rules()
    if config is None:
        config = _config_dict(model)
    model_type = config.get("model_type") if config else None

    output_head, output_weight = _output_head(model)
    blocks = _repeated_blocks(model)

    # Group every name under which a tensor is reachable, keeping first-seen order.
    names_by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        names_by_tensor.setdefault(key, []).append(name)
        tensors[key] = param

    module_types = {path: type(mod).__name__ for path, mod in model.named_modules(remove_duplicate=False)}
    modules_by_path = dict(model.named_modules(remove_duplicate=False))

    params: list[ParameterRecord] = []
    own_counts: dict[str, int] = {}
    tied: list[TiedGroup] = []
    for key, names in names_by_tensor.items():
        param = tensors[key]
        name = names[0]
        module_path, _, local = name.rpartition(".")
        owner = modules_by_path.get(module_path)
        numel, quant = _true_numel(param)
        layer, block = _locate(name, blocks)
        role = classify_module(module_path, owner, model_type, rules) if owner is not None else None
        kind = _kind(local, param, owner, role, key == output_weight)
        record = ParameterRecord(
            name=name,
            module=module_path,
            module_type=module_types.get(module_path, type(model).__name__),
            shape=tuple(int(d) for d in param.shape),
            dtype=str(param.dtype).removeprefix("torch."),
            numel=numel,
            kind=kind,
            is_bias=_is_bias(local),
            trainable=bool(param.requires_grad),
            layer=layer,
            block=block,
            tied_with=tuple(names[1:]),
            quantization=quant,
        )
        params.append(record)
        own_counts[module_path] = own_counts.get(module_path, 0) + numel
        if len(names) > 1:
            tied.append(TiedGroup(names=tuple(names), numel=numel))

    buffers = tuple(
        BufferRecord(
            name=name,
            shape=tuple(int(d) for d in buf.shape),
            dtype=str(buf.dtype).removeprefix("torch."),
            numel=int(buf.numel()),
            persistent=_is_persistent(modules_by_path, name),
        )
        for name, buf in model.named_buffers()
    )

    modules = tuple(
        _module_record(path, mod, model_type, rules, own_counts.get(path, 0), blocks)
        for path, mod in model.named_modules()
    )

    inventory = Inventory(
        architecture=type(model).__name__,
        model_type=model_type,
        parameters=tuple(params),
        buffers=buffers,
        modules=modules,
        tied_groups=tuple(tied),
        dims=_dims(config or {}),
        output_head=output_head,
        quantization_config=_quantization_config(config or {}),
        config=dict(config) if config else None,
        keep_in_fp32=_names(getattr(model, "_keep_in_fp32_modules", None)),
        keep_in_fp32_strict=_names(getattr(model, "_keep_in_fp32_modules_strict", None)),
    )
    moe = _moe_info(inventory, config or {})
    if moe is not None:
        inventory = Inventory(**{**inventory.__dict__, "moe": moe})
    return inventory


# --- helpers -----------------------------------------------------------------


_ROLES = {role.value: role for role in ModuleRole}


def _role(value: str | None) -> str | None:
    """A module role read back from JSON: the :class:`ModuleRole` it was (a plugin's own text stays text)."""
    return None if value is None else _ROLES.get(value, value)


def _config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        result = to_dict()
        return dict(result) if isinstance(result, Mapping) else {}
    return {}


def _names(value: Any) -> tuple[str, ...]:
    """A transformers class attribute listing module names (a list, a set after ``post_init``, or None)."""
    if not isinstance(value, (list, tuple, set, frozenset)):
        return ()
    return tuple(sorted(str(v) for v in value))


def _is_bias(local_name: str) -> bool:
    return local_name == "bias" or local_name.endswith("_bias")


def _true_numel(param: Any) -> tuple[int, str | None]:
    """Element count, undoing bitsandbytes' packed storage."""
    cls = type(param).__name__
    if cls == "Params4bit":
        quant_state = getattr(param, "quant_state", None)
        shape = getattr(quant_state, "shape", None)
        if shape is not None:
            return int(math.prod(shape)), "4bit"
        # Packed: two 4-bit values per byte of storage.
        return int(param.numel()) * 2 * int(param.element_size()), "4bit"
    if cls == "Int8Params":
        return int(param.numel()), "8bit"
    return int(param.numel()), None


def _output_head(model: Any) -> tuple[str | None, int | None]:
    """The output embedding's module path and the ``id`` of its weight, as peft finds the module.

    peft's ``all-linear`` excludes ``next(name for name, module in model.named_modules() if module is
    model.get_output_embeddings())``; the same lookup here, so the two cannot disagree.
    """
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None, None
    try:
        head = get()
    except (AttributeError, NotImplementedError, TypeError):
        return None, None
    if head is None:
        return None, None
    path = next((name for name, module in model.named_modules() if module is head), None)
    weight = getattr(head, "weight", None)
    return path, (id(weight) if weight is not None else None)


def _repeated_blocks(model: Any) -> dict[str, str]:
    """Map each repeated block's path (``model.layers.3``) to its container path.

    A repeated block is a numbered child of a ``ModuleList`` that itself is not
    inside another repeated block (so per-expert ``ModuleList`` entries belong
    to their decoder layer, not to a block of their own).
    """
    import torch

    blocks: dict[str, str] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if any(path == b or path.startswith(b + ".") for b in blocks):
            continue
        for child_name, _child in mod.named_children():
            if _LAYER_INDEX.match(child_name):
                blocks[f"{path}.{child_name}" if path else child_name] = path
    return blocks


def _locate(name: str, blocks: Mapping[str, str]) -> tuple[int | None, str | None]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        container = blocks.get(prefix)
        if container is not None:
            return int(parts[i - 1]), container
    return None, None


def _kind(local: str, param: Any, owner: Any, role: str | None, is_output_head: bool) -> str:
    owner_type = type(owner).__name__ if owner is not None else ""
    # A head tied to the input embedding is counted once, as the embedding it is.
    if role == ModuleRole.EMBEDDING or ("Embedding" in owner_type and "Rotary" not in owner_type):
        return "embedding"
    if is_output_head or role == ModuleRole.OUTPUT_HEAD:
        return "output_head"
    if role == ModuleRole.NORM or "Norm" in owner_type:
        return "norm"
    # Fused MoE experts are 3-D (experts, out, in); convolution kernels are too, and are plain weights.
    if role == ModuleRole.EXPERTS or (param.dim() >= 3 and "Conv" not in owner_type):
        return "experts"
    if role == ModuleRole.ROUTER or "Router" in owner_type:
        return "router"
    if _is_bias(local):
        return "bias"
    if local == "weight" or param.dim() >= 2:
        return "weight"
    return "other"


def _is_persistent(modules: Mapping[str, Any], name: str) -> bool:
    path, _, local = name.rpartition(".")
    owner = modules.get(path)
    non_persistent: set[str] = getattr(owner, "_non_persistent_buffers_set", set())
    return local not in non_persistent


def _module_record(
    path: str,
    mod: Any,
    model_type: str | None,
    rules: ArchitectureRules,
    own_params: int,
    blocks: Mapping[str, str],
) -> ModuleRecord:
    cls = type(mod).__name__
    is_linear = _is_linear(mod)
    in_f: int | None = None
    out_f: int | None = None
    if is_linear:
        if cls == "Conv1D":
            # transformers' Conv1D stores its weight as (in, out).
            in_f, out_f = int(mod.weight.shape[0]), int(mod.weight.shape[1])
        else:
            in_f, out_f = int(mod.in_features), int(mod.out_features)
    layer, block = _locate(path + ".x", blocks) if path else (None, None)
    return ModuleRecord(
        path=path,
        type=cls,
        role=classify_module(path, mod, model_type, rules),
        is_linear=is_linear,
        in_features=in_f,
        out_features=out_f,
        own_params=own_params,
        layer=layer,
        block=block,
    )


def _is_linear(mod: Any) -> bool:
    import torch

    if isinstance(mod, torch.nn.Linear):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "weight") and mod.weight.dim() == 2


def _quantization_config(config: Mapping[str, Any]) -> Any:
    # The dict config.json holds, or a quantizer's config object (live models) as a dict. The
    # memory estimator validates it, so a value that is not a mapping is kept for it to refuse.
    value = config.get("quantization_config")
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a multimodal config (``text_config``), else the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def _first_int(config: Mapping[str, Any], keys: Iterable[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _dims(config: Mapping[str, Any]) -> ModelDims:
    text = text_config(config)
    hidden = _first_int(text, ("hidden_size", "n_embd", "d_model", "dim"))
    heads = _first_int(text, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    kv = _first_int(text, ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"))
    head_dim = _first_int(text, ("head_dim", "d_kv"))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    tie = text.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    return ModelDims(
        hidden_size=hidden,
        num_layers=_first_int(text, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv if kv is not None else heads,
        head_dim=head_dim,
        intermediate_size=_first_int(
            text, ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "moe_intermediate_size")
        ),
        vocab_size=_first_int(text, ("vocab_size",)),
        max_position_embeddings=_first_int(text, ("max_position_embeddings", "n_positions", "n_ctx")),
        tie_word_embeddings=bool(tie) if isinstance(tie, bool) else None,
    )


def _moe_info(inventory: Inventory, config: Mapping[str, Any]) -> MoeInfo | None:
    text = text_config(config)
    num_experts = _first_int(text, ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))
    top_k = _first_int(text, ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k"))
    expert_params = sum(p.numel for p in inventory.parameters if p.kind == "experts")
    if not num_experts or not top_k or expert_params == 0:
        return None
    # Routed experts are a fraction of all expert parameters; shared experts
    # (DeepSeek, Qwen2-MoE) sit in modules of their own and count as always active.
    active = inventory.total - expert_params + expert_params * top_k // num_experts
    return MoeInfo(
        num_experts=num_experts,
        experts_per_token=top_k,
        expert_params=expert_params,
        active_params=active,
    )
