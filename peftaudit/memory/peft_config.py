"""A peft adapter config turned into training plan fields: ``--peft-config PATH``.

:func:`plan_fields` reads an ``adapter_config.json`` (or the adapter directory holding
one), a dict of its contents, or a live ``peft.PeftConfig``, and returns the
:class:`~peftaudit.memory.plan.TrainingPlan` fields that make the estimate size exactly
that adapter: its method (from ``peft_type``) and every field peft honours when it builds
the adapter. It reads the file as peft 0.21.2's ``PeftConfig.from_pretrained`` does
(``peft/config.py``):

* a key the file leaves out takes the config class's dataclass default
  (:data:`PEFT_DEFAULTS`, copied from peft's config files and checked against the
  installed peft by the tests);
* a key the class does not know is dropped (``_check_and_remove_unused_kwargs``: peft
  warns and goes on), and so is ``runtime_config`` (``from_json_file``);
* values that only scale or initialise (``lora_alpha``'s effect, ``alpha_pattern``,
  ``use_rslora``, ``task_type``, ``inference_mode``, PiSSA/OLoRA/EVA/... inits) are accepted;
* a field that changes what peft builds and that peftaudit does not model
  (``layer_replication``, ``lora_bias``, ``use_qalora``, KaSA/MonteCLoRA/VeLoRA/Arrow
  configs...) is refused with one line naming the file and the key, as is a ``peft_type``
  peftaudit has no method for.

Reading a path or a dict imports neither torch nor peft.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from peftaudit.memory.plan import LORA_INITS, PlanError

#: The file peft saves next to the adapter weights (``peft.utils.CONFIG_NAME``).
CONFIG_NAME = "adapter_config.json"

#: Fields every peft config has (``peft/config.py``: ``PeftConfigMixin`` and ``PeftConfig``); none
#: changes what trains. ``inference_mode`` is ignored on purpose: a saved adapter says ``true`` (peft
#: sets it when saving), and the question here is the memory of training that adapter.
_BASE_KEYS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)

#: peft 0.21.2's dataclass defaults of each config class we model (the fields of ``__init__``
#: beyond :data:`_BASE_KEYS`). A key outside its table is one peft drops when loading.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    # peft/tuners/lora/config.py LoraConfig
    "LORA": {
        "r": 8,
        "target_modules": None,
        "exclude_modules": None,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "use_dora": False,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "monteclora_config": None,
        "layer_replication": None,
        "runtime_config": {"ephemeral_gpu_offload": False},
        "lora_bias": False,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    },
    # peft/tuners/adalora/config.py AdaLoraConfig (a LoraConfig subclass: its fields, then these)
    "ADALORA": {},  # filled below
    # peft/tuners/loha/config.py LoHaConfig
    "LOHA": {
        "rank_pattern": {},
        "alpha_pattern": {},
        "r": 8,
        "alpha": 8,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "target_modules": None,
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    },
    # peft/tuners/lokr/config.py LoKrConfig
    "LOKR": {
        "rank_pattern": {},
        "alpha_pattern": {},
        "r": 8,
        "alpha": 8,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "decompose_both": False,
        "decompose_factor": -1,
        "rank_dropout_scale": False,
        "target_modules": None,
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
    },
    # peft/tuners/vera/config.py VeraConfig
    "VERA": {
        "r": 256,
        "target_modules": None,
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    },
    # peft/tuners/oft/config.py OFTConfig
    "OFT": {
        "r": 0,
        "oft_block_size": 32,
        "module_dropout": 0.0,
        "target_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "coft": False,
        "eps": 6e-05,
        "block_share": False,
        "use_cayley_neumann": True,
        "num_cayley_neumann_terms": 5,
    },
    # peft/tuners/boft/config.py BOFTConfig
    "BOFT": {
        "boft_block_size": 4,
        "boft_block_num": 0,
        "boft_n_butterfly_factor": 1,
        "target_modules": None,
        "exclude_modules": None,
        "boft_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    },
    # peft/tuners/ia3/config.py IA3Config
    "IA3": {
        "target_modules": None,
        "exclude_modules": None,
        "feedforward_modules": None,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_ia3_weights": True,
    },
    # peft/tuners/prompt_tuning/config.py PromptTuningConfig (PromptLearningConfig's fields first)
    "PROMPT_TUNING": {
        "num_virtual_tokens": None,
        "token_dim": None,
        "num_transformer_submodules": None,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    },
    # peft/tuners/prefix_tuning/config.py PrefixTuningConfig
    "PREFIX_TUNING": {
        "num_virtual_tokens": None,
        "token_dim": None,
        "num_transformer_submodules": None,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": None,
        "prefix_projection": False,
    },
    # peft/tuners/p_tuning/config.py PromptEncoderConfig
    "P_TUNING": {
        "num_virtual_tokens": None,
        "token_dim": None,
        "num_transformer_submodules": None,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": None,
        "encoder_reparameterization_type": "MLP",
        "encoder_hidden_size": None,
        "encoder_num_layers": 2,
        "encoder_dropout": 0.0,
    },
    # peft/tuners/trainable_tokens/config.py TrainableTokensConfig
    "TRAINABLE_TOKENS": {
        "token_indices": [],
        "target_modules": None,
        "init_weights": True,
    },
}
PEFT_DEFAULTS["ADALORA"] = {
    **PEFT_DEFAULTS["LORA"],
    "rank_pattern": None,
    "target_r": 8,
    "init_r": 12,
    "tinit": 0,
    "tfinal": 0,
    "deltaT": 1,
    "beta1": 0.85,
    "beta2": 0.85,
    "orth_reg_weight": 0.5,
    "total_step": None,
}

#: The method that models each peft type (``peft_type`` as peft spells it).
PEFT_METHODS: dict[str, str] = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "LOHA": "loha",
    "LOKR": "lokr",
    "VERA": "vera",
    "OFT": "oft",
    "BOFT": "boft",
    "IA3": "ia3",
    "PROMPT_TUNING": "prompt-tuning",
    "PREFIX_TUNING": "prefix-tuning",
    "P_TUNING": "p-tuning",
    "TRAINABLE_TOKENS": "trainable-tokens",
}
SUPPORTED_PEFT_TYPES: tuple[str, ...] = tuple(PEFT_METHODS)

#: LoRA (and AdaLoRA) fields that change what peft builds or how it trains and that no plan field
#: models; any value but the default is refused. ``lora_bias``: a bias on every ``lora_B``;
#: ``layer_replication``: copies of base layers; ``use_qalora``: group-pooled ``lora_A`` input;
#: ``megatron_config``: tensor-parallel LoRA layers; the ``*_config`` variants add parameters,
#: buffers or change the forward (KaSA, MonteCLoRA, VeLoRA, Arrow); aLoRA's forward runs on part
#: of the sequence.
_LORA_UNMODELLED = (
    "lora_bias",
    "layer_replication",
    "use_qalora",
    "megatron_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "arrow_config",
    "alora_invocation_tokens",
)
#: AdaLoRA builds its own layers (``tuners/adalora/model.py``): these LoRA fields are not read there
#: or make peft refuse the config; a non-default value is not the adapter the user trains.
_ADALORA_UNMODELLED = (*_LORA_UNMODELLED, "use_dora", "use_bdlora", "trainable_token_indices", "target_parameters")

#: ``init_lora_weights`` strings that are a plan :data:`~peftaudit.memory.plan.LORA_INITS` value by
#: a prefix (``pissa_niter_16``) or by another name. LoRA-GA (``lora_ga``) fits A and B to gradients:
#: starting values only, like the other data-driven inits.
_INIT_ALIASES = {"lora_ga": "default"}


def plan_fields(source: str | Path | Mapping[str, Any] | Any) -> dict[str, Any]:
    """The :class:`~peftaudit.memory.plan.TrainingPlan` fields of a peft adapter config.

    ``source``: a path to an ``adapter_config.json`` or to a directory holding one, the
    file's contents as a dict, or a ``peft.PeftConfig`` object (a live ``PeftModel``'s
    ``peft_config[name]``). The result always has ``method`` (from ``peft_type``: LoRA with
    ``use_dora`` is ``dora``), and the fields the config sets, so
    ``TrainingPlan(**plan_fields(path), seq_len=..., ...)`` is the plan for training that
    adapter. How the base is stored (QLoRA's 4-bit, 8-bit) is not in an adapter config:
    give it as ``base_dtype``.

    Raises :class:`~peftaudit.memory.plan.PlanError` (one line, naming the file and the key)
    for a file that cannot be read or is not a JSON object, a ``peft_type`` peftaudit does not
    model, or a field that changes the adapter in a way peftaudit does not model.
    """
    data, where = _load(source)
    raw_type = _plain(data.get("peft_type"))
    if raw_type is None:
        raise PlanError(f"{where} has no peft_type; it is not a peft adapter config")
    peft_type = str(raw_type).upper()
    if peft_type not in PEFT_METHODS:
        raise PlanError(f"{where}: peft type {raw_type} is not modelled; supported: {', '.join(SUPPORTED_PEFT_TYPES)}")
    defaults = PEFT_DEFAULTS[peft_type]
    # As peft loads it: the class's defaults, overridden by the keys it knows; the rest is dropped.
    values = {**defaults, **{k: _plain(v) for k, v in data.items() if k in defaults}}
    return _CONVERTERS[peft_type](_Config(values, where, peft_type))


# --- reading ---------------------------------------------------------------------------------


def _load(source: Any) -> tuple[dict[str, Any], str]:
    if isinstance(source, str | Path):
        return _read_file(Path(source))
    if isinstance(source, Mapping):
        return dict(source), "the peft config"
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict) and hasattr(source, "peft_type"):
        data = to_dict()
        return dict(data), f"the {type(source).__name__}"
    raise PlanError(f"a peft config is a path, a dict or a peft.PeftConfig, not a {type(source).__name__}")


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    file = path / CONFIG_NAME if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise PlanError(f"{path} has no {CONFIG_NAME}: give a peft adapter directory or its {CONFIG_NAME}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise PlanError(f"cannot read the peft config {file}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{file} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{file} holds a JSON {type(data).__name__}, not an object of peft config fields")
    return data, str(file)


def _plain(value: Any) -> Any:
    """JSON-like values: enums to their value, sets to sorted lists, dataclasses (BdLoraConfig) to dicts."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return value


class _Config:
    """One config's values (defaults filled in), with typed readers whose errors name file and key."""

    def __init__(self, values: dict[str, Any], where: str, peft_type: str) -> None:
        self.values = values
        self.where = where
        self.peft_type = peft_type

    def error(self, key: str, problem: str) -> PlanError:
        return PlanError(f"{self.where}: {key} {problem}")

    def is_default(self, key: str) -> bool:
        value = self.values[key]
        default = PEFT_DEFAULTS[self.peft_type][key]
        # An empty {} or [] and None mean the same to peft for these fields.
        return value == default or (not value and not default and not isinstance(value, bool | int | float))

    def refuse(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in self.values and not self.is_default(key):
                raise self.error(
                    key,
                    f"= {json.dumps(self.values[key], default=str)} changes the {self.peft_type} adapter in a way "
                    "peftaudit does not model",
                )

    def integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.values[key]
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            floor = f" >= {minimum}" if minimum is not None else ""
            raise self.error(key, f"must be an integer{floor}, got {json.dumps(value, default=str)}")
        return value

    def number(self, key: str) -> float:
        value = self.values[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(key, f"must be a number, got {json.dumps(value, default=str)}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.values[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {json.dumps(value, default=str)}")
        return value

    def names(self, key: str) -> tuple[str, ...]:
        """A list of module names (None or [] is none)."""
        value = self.values[key]
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of names, got {json.dumps(value, default=str)}")
        return tuple(value)

    def targets(self, key: str = "target_modules") -> str | tuple[str, ...]:
        """``target_modules``: None is peft's per-architecture default, a string a regular expression."""
        value = self.values[key]
        if value is None:
            return "default"
        if isinstance(value, str):
            return value
        return tuple(sorted(set(self.names(key))))

    def exclude(self) -> tuple[str, ...]:
        if isinstance(self.values.get("exclude_modules"), str):
            # peft matches a string as one regular expression over the whole path; the plan's
            # exclude is a list of names.
            raise self.error("exclude_modules", "as a regular expression is not modelled; give a list of names")
        return self.names("exclude_modules") if "exclude_modules" in self.values else ()

    def layers(self) -> dict[str, Any]:
        """``layers_to_transform`` (an int or a list) and ``layers_pattern`` (a string or a list)."""
        fields: dict[str, Any] = {}
        value = self.values.get("layers_to_transform")
        if value is not None:
            items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise self.error("layers_to_transform", f"must be layer indices, got {json.dumps(value)}")
            if items:
                fields["layers_to_transform"] = tuple(items)
        pattern = self.names("layers_pattern") if "layers_pattern" in self.values else ()
        if pattern:
            fields["layers_pattern"] = pattern
        return fields

    def rank_pattern(self, key: str = "rank_pattern") -> dict[str, int]:
        value = self.values.get(key) or {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be an object of pattern: rank, got {json.dumps(value, default=str)}")
        for pattern, rank in value.items():
            if not isinstance(rank, int) or isinstance(rank, bool):
                raise self.error(key, f"gives '{pattern}' the rank {json.dumps(rank, default=str)}; ranks are integers")
        return dict(value)

    def saved(self) -> dict[str, Any]:
        names = self.names("modules_to_save") if "modules_to_save" in self.values else ()
        return {"modules_to_save": names} if names else {}

    def selection(self, *, exclude: bool = True) -> dict[str, Any]:
        """What every tuner's module selection reads besides the targets: ``exclude_modules`` (where the
        config class has it), ``layers_to_transform``/``layers_pattern`` and ``modules_to_save``."""
        fields: dict[str, Any] = {}
        excluded = self.exclude() if exclude else ()
        if excluded:
            fields["exclude"] = excluded
        return {**fields, **self.layers(), **self.saved()}

    def no_bias(self) -> None:
        """Methods whose ``bias`` option peftaudit does not model: only ``"none"`` is estimated."""
        if self.values.get("bias", "none") != "none":
            raise self.error("bias", f"= {json.dumps(self.values['bias'])} is not modelled for {self.peft_type}")


# --- per peft type ---------------------------------------------------------------------------


def _lora(c: _Config) -> dict[str, Any]:
    c.refuse(_LORA_UNMODELLED)
    fields: dict[str, Any] = {"method": "dora" if c.flag("use_dora") else "lora"}
    fields.update(_lora_common(c))
    fields["rank"] = c.integer("r")
    if not c.is_default("rank_pattern"):
        fields["rank_pattern"] = c.rank_pattern()
    parameters = c.names("target_parameters")
    if parameters:
        fields["target_parameters"] = parameters
        if c.values["target_modules"] is None:
            # peft uses its default targets only when there are no target_parameters (lora/model.py).
            fields["targets"] = ()
    fields["lora_init"] = _lora_init(c)
    if c.values["use_bdlora"] is not None:
        fields.update(_bdlora(c))
    tokens = _trainable_token_indices(c)
    if tokens:
        fields["trainable_tokens"] = tokens
    if c.values["ensure_weight_tying"] and fields.get("modules_to_save"):
        # Ties a saved copy of the embedding to the output head's copy: the plan copies each module.
        c.refuse(("ensure_weight_tying",))
    return fields


def _lora_common(c: _Config) -> dict[str, Any]:
    """Fields LoRA and AdaLoRA read alike."""
    fields: dict[str, Any] = {
        "targets": c.targets(),
        "alpha": c.number("lora_alpha"),
        "dropout": c.number("lora_dropout"),
        "use_rslora": c.flag("use_rslora"),
    }
    bias = c.values["bias"]
    if bias not in ("none", "all", "lora_only"):
        raise c.error("bias", f"must be none, all or lora_only, got {json.dumps(bias, default=str)}")
    fields["lora_bias"] = bias
    fields.update(c.selection())
    return fields


def _lora_init(c: _Config) -> str:
    value = c.values["init_lora_weights"]
    if isinstance(value, bool):
        return "default"  # True: peft's default; False: random A and B, the same shapes
    if isinstance(value, str):
        name = value.lower()
        if name.startswith("pissa"):
            return "pissa"  # "pissa_niter_16": PiSSA by fast SVD
        if name in _INIT_ALIASES:
            return _INIT_ALIASES[name]
        if name in LORA_INITS and name != "default":
            return name
    raise c.error("init_lora_weights", f"= {json.dumps(value, default=str)} is not an initialisation peftaudit knows")


def _bdlora(c: _Config) -> dict[str, Any]:
    value = c.values["use_bdlora"]
    if not isinstance(value, dict):
        raise c.error("use_bdlora", f"must be an object (BdLoraConfig), got {json.dumps(value, default=str)}")
    sub = _Config(
        {**_BDLORA_DEFAULTS, **{k: v for k, v in value.items() if k in _BDLORA_DEFAULTS}},
        f"{c.where}: use_bdlora",
        c.peft_type,
    )
    fields: dict[str, Any] = {
        "bdlora_a": sub.names("target_modules_bd_a"),
        "bdlora_b": sub.names("target_modules_bd_b"),
        "bdlora_blocks": sub.integer("nblocks", minimum=1),
    }
    # ``match_strict`` only makes peft refuse a target matching neither list; the plan models the
    # lenient reading (such a target gets a plain LoRA), which is the same adapter when peft accepts it.
    sub.flag("match_strict")
    return fields


#: peft/tuners/lora/config.py BdLoraConfig defaults.
_BDLORA_DEFAULTS: dict[str, Any] = {
    "target_modules_bd_a": None,
    "target_modules_bd_b": None,
    "nblocks": 1,
    "match_strict": True,
}


def _trainable_token_indices(c: _Config) -> int:
    """``trainable_token_indices``: how many token rows train (peft's ``TrainableTokensWrapper``).

    A list trains those rows of the input embedding, and of the output head tied to it (one delta,
    shared: peft ties the head's layer to the embedding's). A dict names the embedding per layer;
    one layer is the same count; several layers are not modelled.
    """
    value = c.values["trainable_token_indices"]
    if value is None:
        return 0
    if isinstance(value, dict):
        if len(value) != 1:
            raise c.error(
                "trainable_token_indices",
                f"names {len(value)} layers; peftaudit models trainable tokens of one embedding",
            )
        value = next(iter(value.values()))
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise c.error("trainable_token_indices", f"must be a list of token ids, got {json.dumps(value, default=str)}")
    # Every index is a row of the delta (peft indexes the weight with the list, repeats included).
    return len(value)


def _adalora(c: _Config) -> dict[str, Any]:
    c.refuse(_ADALORA_UNMODELLED)
    fields: dict[str, Any] = {"method": "adalora"}
    fields.update(_lora_common(c))
    # AdaLoRA creates every adapter at init_r (adalora/model.py _create_and_replace); ``r`` is unused
    # and ``rank_pattern`` is the allocator's saved mask, applied only when loading trained weights.
    fields["rank"] = c.integer("init_r")
    return fields


def _lycoris(c: _Config) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": PEFT_METHODS[c.peft_type], "targets": c.targets(), "rank": c.integer("r")}
    fields["alpha"] = c.number("alpha")
    if not c.is_default("rank_pattern"):
        fields["rank_pattern"] = c.rank_pattern()
    fields.update(c.selection())
    if c.peft_type == "LOKR":
        fields["lokr_factor"] = c.integer("decompose_factor")
        fields["lokr_decompose_both"] = c.flag("decompose_both")
    return fields


def _vera(c: _Config) -> dict[str, Any]:
    c.no_bias()
    fields: dict[str, Any] = {"method": "vera", "targets": c.targets(), "rank": c.integer("r")}
    fields["dropout"] = c.number("vera_dropout")
    fields.update(c.selection(exclude=False))  # VeraConfig has no exclude_modules
    return fields


def _oft(c: _Config) -> dict[str, Any]:
    c.no_bias()
    fields: dict[str, Any] = {"method": "oft", "targets": c.targets()}
    fields["oft_blocks"] = c.integer("r", minimum=0)
    fields["oft_block_size"] = c.integer("oft_block_size", minimum=0)
    fields["block_share"] = c.flag("block_share")
    fields.update(c.selection())
    return fields


def _boft(c: _Config) -> dict[str, Any]:
    c.no_bias()
    fields: dict[str, Any] = {"method": "boft", "targets": c.targets()}
    fields["boft_block_size"] = c.integer("boft_block_size", minimum=0)
    fields["boft_blocks"] = c.integer("boft_block_num", minimum=0)
    fields["boft_butterfly"] = c.integer("boft_n_butterfly_factor", minimum=1)
    fields["dropout"] = c.number("boft_dropout")
    fields.update(c.selection())
    return fields


def _ia3(c: _Config) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": "ia3", "targets": c.targets()}
    if isinstance(c.values["target_modules"], str):
        # The plan's ia3 reads a string as "peft's defaults" (targets.ia3_adapters).
        raise c.error("target_modules", "as a string is not modelled for IA3; give a list of names")
    feedforward = c.values["feedforward_modules"]
    if isinstance(feedforward, str):
        raise c.error("feedforward_modules", "as a regular expression is not modelled; give a list of names")
    if feedforward is not None:  # None: peft's default for the architecture, as the plan's
        fields["feedforward_modules"] = c.names("feedforward_modules")
    fields.update(c.selection())
    return fields


def _virtual_tokens(c: _Config) -> int:
    if c.values["num_virtual_tokens"] is None:
        raise c.error("num_virtual_tokens", "is missing; peft needs it to build the prompt")
    if c.values.get("modules_to_save"):
        raise c.error("modules_to_save", f"with {c.peft_type} is not modelled")
    return c.integer("num_virtual_tokens", minimum=1)


def _prompt_tuning(c: _Config) -> dict[str, Any]:
    # token_dim, num_layers, num_attention_heads, num_transformer_submodules: peft fills them from the
    # model's config (utils/other.py _prepare_prompt_learning_config), so a saved file repeats the model's.
    return {"method": "prompt-tuning", "num_virtual_tokens": _virtual_tokens(c)}


def _prefix_tuning(c: _Config) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": "prefix-tuning", "num_virtual_tokens": _virtual_tokens(c)}
    fields["prefix_projection"] = c.flag("prefix_projection")
    if c.values["encoder_hidden_size"] is not None:
        fields["encoder_hidden_size"] = c.integer("encoder_hidden_size", minimum=1)
    return fields


def _p_tuning(c: _Config) -> dict[str, Any]:
    fields: dict[str, Any] = {"method": "p-tuning", "num_virtual_tokens": _virtual_tokens(c)}
    kind = c.values["encoder_reparameterization_type"]
    if not isinstance(kind, str) or kind.upper() not in ("MLP", "LSTM"):
        raise c.error("encoder_reparameterization_type", f"must be MLP or LSTM, got {json.dumps(kind, default=str)}")
    fields["prompt_encoder"] = kind.lower()
    if c.values["encoder_hidden_size"] is not None:
        fields["encoder_hidden_size"] = c.integer("encoder_hidden_size", minimum=1)
    if kind.upper() == "LSTM":
        # The MLP encoder ignores encoder_num_layers (p_tuning/model.py: exactly 2 layers, a warning).
        fields["encoder_layers"] = c.integer("encoder_num_layers", minimum=1)
    return fields


def _trainable_tokens(c: _Config) -> dict[str, Any]:
    value = c.values["token_indices"]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise c.error("token_indices", f"must be a list of token ids, got {json.dumps(value, default=str)}")
    if not value:
        raise c.error("token_indices", "is empty: no token would train")
    fields: dict[str, Any] = {"method": "trainable-tokens", "trainable_tokens": len(value)}
    if c.values["target_modules"] is not None:
        # None: the input embedding (trainable_tokens/model.py _prepare_adapter_config).
        fields["targets"] = c.targets()
    return fields


_CONVERTERS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "LORA": _lora,
    "ADALORA": _adalora,
    "LOHA": _lycoris,
    "LOKR": _lycoris,
    "VERA": _vera,
    "OFT": _oft,
    "BOFT": _boft,
    "IA3": _ia3,
    "PROMPT_TUNING": _prompt_tuning,
    "PREFIX_TUNING": _prefix_tuning,
    "P_TUNING": _p_tuning,
    "TRAINABLE_TOKENS": _trainable_tokens,
}

__all__ = ["CONFIG_NAME", "PEFT_DEFAULTS", "PEFT_METHODS", "SUPPORTED_PEFT_TYPES", "plan_fields"]
