"""A checkpoint's own quantization: how its frozen base weights are stored.

Pre-quantized uploads (``*-bnb-4bit``, GPTQ, AWQ, compressed-tensors, FP8)
carry a ``quantization_config`` in config.json, and ``from_pretrained`` loads
their layers packed whatever the training method asks for: LoRA on a
``*-bnb-4bit`` upload is QLoRA. :func:`checkpoint_quantization` reads that
block the way transformers' quantizers do (which modules stay unquantized
included), and :func:`resolve` decides what the estimate stores:

* the checkpoint's format, for frozen weights (``source="checkpoint"``);
* the plan's dtype where the fine-tuning recipes dequantize first: gpt-oss's
  MXFP4 experts (transformers cannot train them; OpenAI's cookbook loads
  ``Mxfp4Config(dequantize=True)``) and DeepSeek-V3's FP8 weights (DeepSeek
  converts them to bf16 with ``fp8_cast_bf16.py``) (``source="dequantized"``);
* ``--base-dtype``, which always wins (``source="override"``).

Parameter counts stay logical (as published); only the bytes follow the format.
The byte layouts themselves live in :mod:`peftaudit.memory.dtypes`, shared with
plan-driven quantization (QLoRA), so there is one rule per format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from peftaudit.errors import ConfigError
from peftaudit.memory.dtypes import awq_bytes, fp8_bytes, gptq_bytes, int8_bytes, nf4_bytes, packed_int_bytes
from peftaudit.memory.plan import PlanWarning, TrainingPlan
from peftaudit.memory.result import BaseStorage

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory, ModuleRecord
    from peftaudit.memory.methods import Adaptation

#: Where fine-tuning recipes dequantize the checkpoint first, and the recipe that says so.
MXFP4_RECIPE = "https://cookbook.openai.com/articles/gpt-oss/fine-tune-transfomers"
DEEPSEEK_FP8_RECIPE = "https://github.com/deepseek-ai/DeepSeek-V3#6-how-to-run-locally"
#: transformers keeps FP8 weights only on GPUs that run FP8 matmuls (compute capability 8.9+).
FP8_NOTE = "transformers dequantizes FP8 weights to bf16 on GPUs below compute capability 8.9 (A100, V100, T4)"


@dataclass(frozen=True)
class WeightFormat:
    """How one quantized weight is stored: its layout and the numbers the layout needs."""

    layout: str
    """``bnb4``, ``bnb8``, ``fp8``, ``gptq``, ``awq`` or ``packed`` (compressed-tensors)."""
    kind: str
    """The weight kind layer programs see (:data:`~peftaudit.memory.dtypes.QUANTIZED_KINDS`)."""
    bits: int
    group_size: int = 0
    """Input features per scale (GPTQ, AWQ, compressed-tensors ``group``); 0 or -1: one per row."""
    strategy: str = "group"
    """compressed-tensors scale strategy: ``group``, ``channel``, ``tensor`` or ``block``."""
    block: tuple[int, int] | None = None
    """FP8 (and compressed-tensors ``block``): rows x columns per scale; ``None`` one per tensor."""
    double_quant: bool = False
    zero_points: bool = False

    def storage(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(weight bytes, constant bytes) of one ``out x in`` weight in this format."""
        numel = out_features * in_features
        if self.layout == "bnb4":
            return nf4_bytes(numel, double_quant=self.double_quant)
        if self.layout == "bnb8":
            return int8_bytes(numel, out_features)
        if self.layout == "fp8":
            return fp8_bytes(out_features, in_features, self.block)
        if self.layout == "gptq":
            return gptq_bytes(out_features, in_features, bits=self.bits, group_size=self.group_size)
        if self.layout == "awq":
            return awq_bytes(out_features, in_features, bits=self.bits, group_size=self.group_size)
        scales = self._scales(out_features, in_features)
        return packed_int_bytes(out_features, in_features, bits=self.bits, scales=scales, zero_points=self.zero_points)

    def _scales(self, out_features: int, in_features: int) -> int:
        if self.strategy == "tensor":
            return 1
        if self.strategy == "channel" or self.group_size <= 0:
            return out_features
        if self.strategy == "block" and self.block is not None:
            return -(-out_features // self.block[0]) * -(-in_features // self.block[1])
        return out_features * -(-in_features // self.group_size)


@dataclass(frozen=True)
class CheckpointQuantization:
    """A checkpoint's ``quantization_config``, read as transformers' quantizer reads it."""

    quant_method: str
    """As the config names it: ``bitsandbytes``, ``gptq``, ``awq``, ``compressed-tensors``, ``fp8``, ``mxfp4``."""
    label: str
    """What the format is, in a few words (``bitsandbytes nf4, double quant``)."""
    groups: tuple[tuple[tuple[str, ...], WeightFormat], ...] = ()
    """(targets, format) pairs; targets ``("Linear",)`` is every linear layer not skipped.
    Empty when the estimate assumes the weights dequantized."""
    skip: tuple[str, ...] | None = None
    """transformers' ``modules_to_not_convert`` patterns; ``None``: its defaults (output head, tied)."""
    default_skips: bool = False
    """Add the defaults even when ``skip`` is given (AWQ does)."""
    ignore: tuple[str, ...] = ()
    """compressed-tensors ``ignore`` (names or ``re:`` patterns)."""
    blocks_only: bool = False
    """GPTQ quantizes the repeated blocks' linear layers only."""
    block_modules: tuple[str, ...] = ()
    """GPTQ ``modules_in_block_to_quantize``, flattened (empty: every linear in a block)."""
    experts: bool = False
    """Fused 3-D expert weights are stored quantized too (transformers' ``FP8Experts``)."""
    dequantized: str | None = None
    """Why the estimate assumes the weights dequantized (a fine-tuning recipe), if it does."""
    reference: str | None = None
    """The recipe or document that backs the assumption."""

    @property
    def kind(self) -> str | None:
        """The weight kind frozen quantized layers run as; ``None`` when dequantized."""
        return self.groups[0][1].kind if self.groups and self.dequantized is None else None

    def formats(self, inventory: Inventory) -> dict[str, WeightFormat]:
        """Linear module path -> format, for every module this checkpoint stores quantized.

        A live model's parameters say it themselves (bitsandbytes ``Params4bit``/``Int8Params``,
        which the inventory counts at their true size); otherwise the config's rules decide.
        """
        if self.kind is None:
            return {}
        live = {p.module for p in inventory.parameters if p.quantization is not None}
        if live:
            fmt = self.groups[0][1]
            return {m.path: fmt for m in inventory.modules if m.path in live and m.is_linear}
        defaults = _default_skips(inventory)
        skips = list(self.skip or ())
        use_defaults = self.skip is None or self.default_skips
        out: dict[str, WeightFormat] = {}
        for m in inventory.modules:
            if not m.path or not m.is_linear:
                continue
            if use_defaults and m.path in defaults:
                continue
            if skips and not _converts(m.path, skips):
                continue
            if self.blocks_only and (m.layer is None or not _in_block(m.path, self.block_modules)):
                continue
            if self.ignore and _ct_matches(m, self.ignore):
                continue
            found = next((f for targets, f in self.groups if _ct_matches(m, targets)), None)
            if found is not None:
                out[m.path] = found
        return out

    def expert_formats(self, inventory: Inventory) -> dict[str, WeightFormat]:
        """Fused 3-D expert parameter name -> format, when the format stores experts quantized."""
        if self.kind is None or not self.experts:
            return {}
        fmt = self.groups[0][1]
        skips = list(self.skip or ())
        return {
            p.name: fmt
            for p in inventory.parameters
            if p.kind == "experts" and len(p.shape) == 3 and (not skips or _converts(p.module, skips))
        }


@dataclass(frozen=True)
class ResolvedBase:
    """What the estimate stores frozen base weights as, and the line that says why."""

    adaptation: Adaptation
    """The method's adaptation, its ``quantization`` replaced by the checkpoint's kind."""
    checkpoint: CheckpointQuantization | None
    """The checkpoint's format when frozen weights follow it, else ``None`` (plan rules)."""
    quantization: CheckpointQuantization | None
    """The checkpoint's quantization as read, whatever the estimate does with it."""
    source: str | None
    """``checkpoint``, ``dequantized``, ``override`` or ``None`` (no quantization_config)."""
    warnings: tuple[PlanWarning, ...] = ()


def resolve(inventory: Inventory, plan: TrainingPlan, adaptation: Adaptation) -> ResolvedBase:
    """Apply the checkpoint's quantization to the method's adaptation (``--base-dtype`` wins)."""
    raw = inventory.quantization_config
    quant = checkpoint_quantization(raw, inventory.model_type)
    if quant is None:
        if isinstance(raw, Mapping):
            method = raw.get("quant_method")
            warning = PlanWarning(
                "checkpoint-quantization-not-modelled",
                f"the checkpoint's quantization_config (quant_method {method!r}) is not modelled: its frozen "
                "weights are estimated at the plan's dtype; give --base-dtype for the storage it uses",
            )
            return ResolvedBase(adaptation, None, None, None, (warning,))
        return ResolvedBase(adaptation, None, None, None)
    if not quant.groups and quant.dequantized is None:
        return ResolvedBase(adaptation, None, None, None)  # nothing stored quantized (activation-only schemes)
    if plan.base_dtype is not None:
        return ResolvedBase(adaptation, None, quant, "override")
    if quant.kind is None:
        return ResolvedBase(adaptation, None, quant, "dequantized")
    return ResolvedBase(replace(adaptation, quantization=quant.kind), quant, quant, "checkpoint")


def checkpoint_quantization(config: Any, model_type: str | None = None) -> CheckpointQuantization | None:
    """Read a ``quantization_config``; ``None`` when there is none or its method is not modelled.

    Raises :class:`~peftaudit.errors.ConfigError` for a block that is not what its method
    documents (``bits: "x"``), as transformers would refuse to load it.
    """
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ConfigError(f"config.json quantization_config must be an object, got {_show(config)}")
    method = config.get("quant_method")
    if method is None and (config.get("load_in_4bit") or config.get("load_in_8bit")):
        method = "bitsandbytes"  # configs written before quant_method existed
    if not isinstance(method, str):
        raise ConfigError(f"config.json quantization_config.quant_method must be a string, got {_show(method)}")
    reader = _READERS.get(method.lower())
    if reader is None:
        return None
    return reader(_Fields(config, method), model_type)


# --- readers, one per quant_method ----------------------------------------------------------------


class _Fields:
    """Typed access to a quantization_config, naming the bad key in one line."""

    def __init__(self, config: Mapping[str, Any], method: str) -> None:
        self.config = config
        self.method = method

    def _bad(self, key: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"config.json quantization_config.{key} ({self.method}) must be {want}, got {_show(value)}")

    def integer(self, key: str, default: int, *, allowed: Sequence[int] | None = None, keys: Sequence[str] = ()) -> int:
        name, value = self._get(key, keys)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or (allowed is not None and value not in allowed):
            want = f"one of {', '.join(map(str, allowed))}" if allowed else "an integer"
            raise self._bad(name, value, want)
        return value

    def flag(self, key: str, default: bool, *, keys: Sequence[str] = ()) -> bool:
        name, value = self._get(key, keys)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(name, value, "true or false")
        return value

    def names(self, key: str) -> tuple[str, ...] | None:
        value = self.config.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "a list of module names")
        return tuple(value)

    def choice(self, key: str, default: str, allowed: Sequence[str]) -> str:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in allowed:
            raise self._bad(key, value, f"one of {', '.join(allowed)}")
        return value.lower()

    def _get(self, key: str, keys: Sequence[str]) -> tuple[str, Any]:
        for name in (key, *keys):
            if self.config.get(name) is not None:
                return name, self.config[name]
        return key, None


def _bitsandbytes(f: _Fields, _model_type: str | None) -> CheckpointQuantization:
    four = f.flag("load_in_4bit", False, keys=("_load_in_4bit",))
    eight = f.flag("load_in_8bit", False, keys=("_load_in_8bit",))
    if four == eight:
        raise ConfigError("config.json quantization_config (bitsandbytes) must load in exactly one of 4-bit and 8-bit")
    skip = f.names("llm_int8_skip_modules")
    _check_patterns(skip, "llm_int8_skip_modules")
    if eight:
        return CheckpointQuantization(
            "bitsandbytes", "bitsandbytes LLM.int8", ((_ALL, WeightFormat("bnb8", "int8", 8)),), skip=skip
        )
    # transformers' BitsAndBytesConfig defaults: fp4, no double quantization.
    quant_type = f.choice("bnb_4bit_quant_type", "fp4", ("nf4", "fp4"))
    double = f.flag("bnb_4bit_use_double_quant", False)
    label = f"bitsandbytes {quant_type}" + (", double quant" if double else "")
    fmt = WeightFormat("bnb4", quant_type, 4, double_quant=double)
    return CheckpointQuantization("bitsandbytes", label, ((_ALL, fmt),), skip=skip)


def _gptq(f: _Fields, _model_type: str | None) -> CheckpointQuantization:
    bits = f.integer("bits", 4, allowed=(2, 3, 4, 8))
    group = f.integer("group_size", 128)
    if group == 0 or group < -1:
        raise f._bad("group_size", group, "a positive integer or -1")
    blocks = f.config.get("modules_in_block_to_quantize")
    names: tuple[str, ...] = ()
    if blocks is not None:
        flat = (
            [n for part in blocks for n in (part if isinstance(part, list) else [part])]
            if isinstance(blocks, list)
            else None
        )
        if flat is None or not all(isinstance(n, str) for n in flat):
            raise f._bad("modules_in_block_to_quantize", blocks, "a list of lists of module names")
        names = tuple(flat)
    head = f.flag("lm_head", False)
    fmt = WeightFormat("gptq", "int", bits, group)
    label = f"GPTQ {bits}-bit, " + (f"group {group}" if group > 0 else "per channel")
    quant = CheckpointQuantization("gptq", label, ((_ALL, fmt),), blocks_only=True, block_modules=names)
    if head:  # lm_head=True quantizes the output head as well: not blocks-only for it
        quant = replace(quant, blocks_only=False, skip=(), default_skips=False)
    return quant


def _awq(f: _Fields, _model_type: str | None) -> CheckpointQuantization:
    bits = f.integer("bits", 4, allowed=(4,), keys=("w_bit",))
    group = f.integer("group_size", 128, keys=("q_group_size",))
    skip = f.names("modules_to_not_convert")
    _check_patterns(skip, "modules_to_not_convert")
    fmt = WeightFormat("awq", "int", bits, group, zero_points=f.flag("zero_point", True))
    label = f"AWQ {bits}-bit, " + (f"group {group}" if group > 0 else "per channel")
    return CheckpointQuantization("awq", label, ((_ALL, fmt),), skip=skip or (), default_skips=True)


def _fp8(f: _Fields, model_type: str | None) -> CheckpointQuantization:
    block_value = f.config.get("weight_block_size")
    block: tuple[int, int] | None = None
    if block_value is not None:
        if not (
            isinstance(block_value, list)
            and len(block_value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block_value)
        ):
            raise f._bad("weight_block_size", block_value, "two positive integers")
        block = (block_value[0], block_value[1])
    skip = f.names("modules_to_not_convert")
    _check_patterns(skip, "modules_to_not_convert")
    fmt = WeightFormat("fp8", "fp8", 8, block=block)
    label = "FP8 e4m3, " + (f"{block[0]}x{block[1]} blocks" if block else "one scale per tensor")
    quant = CheckpointQuantization("fp8", label, ((_ALL, fmt),), skip=skip, experts=True, reference=None)
    if (model_type or "").startswith("deepseek_v3"):
        return replace(
            quant,
            dequantized="DeepSeek-V3's FP8 weights are converted to bf16 before fine-tuning (its "
            "fp8_cast_bf16.py), and " + FP8_NOTE,
            reference=DEEPSEEK_FP8_RECIPE,
        )
    return quant


def _mxfp4(f: _Fields, _model_type: str | None) -> CheckpointQuantization:
    skip = f.names("modules_to_not_convert")
    _check_patterns(skip, "modules_to_not_convert")
    return CheckpointQuantization(
        "mxfp4",
        "MXFP4 experts",
        skip=skip,
        dequantized="transformers cannot train MXFP4 weights; OpenAI's fine-tuning recipe loads the model "
        "with Mxfp4Config(dequantize=True)",
        reference=MXFP4_RECIPE,
    )


def _compressed_tensors(f: _Fields, _model_type: str | None) -> CheckpointQuantization:
    groups_value = f.config.get("config_groups")
    if not isinstance(groups_value, Mapping) or not groups_value:
        raise f._bad("config_groups", groups_value, "an object of quantization groups")
    groups: list[tuple[tuple[str, ...], WeightFormat]] = []
    labels: list[str] = []
    for name, group in groups_value.items():
        if not isinstance(group, Mapping):
            raise f._bad(f"config_groups.{name}", group, "an object")
        weights = group.get("weights")
        if weights is None:
            continue  # activation-only group: weights stay as they are
        if not isinstance(weights, Mapping):
            raise f._bad(f"config_groups.{name}.weights", weights, "an object")
        w = _Fields(weights, f"compressed-tensors {name}.weights")
        bits = w.integer("num_bits", 8, allowed=(2, 3, 4, 8))
        kind = w.choice("type", "int", ("int", "float"))
        strategy = w.choice("strategy", "tensor", ("tensor", "channel", "group", "tensor_group", "block"))
        group_size = w.integer("group_size", 0) if strategy in ("group", "tensor_group") else 0
        block_value = weights.get("block_structure")
        block = None
        if isinstance(block_value, list) and len(block_value) == 2 and all(isinstance(v, int) for v in block_value):
            block = (int(block_value[0]), int(block_value[1]))
        fmt = WeightFormat(
            "packed",
            "fp8" if kind == "float" else "int",
            bits,
            group_size,
            strategy="group" if strategy == "tensor_group" else strategy,
            block=block,
            zero_points=not w.flag("symmetric", True),
        )
        targets = _names_of(group.get("targets"), f, f"config_groups.{name}.targets") or ("Linear",)
        groups.append((targets, fmt))
        labels.append(f"{kind}{bits} {strategy}" + (f" {group_size}" if group_size else ""))
    ignore = _names_of(f.config.get("ignore"), f, "ignore") or ()
    label = "compressed-tensors " + ", ".join(dict.fromkeys(labels))
    quant = CheckpointQuantization("compressed-tensors", label, tuple(groups), skip=(), ignore=ignore)
    if f.flag("dequantize", False) or f.config.get("run_compressed") is False:
        return replace(quant, dequantized="its quantization_config asks to dequantize at load time")
    return quant


_ALL: tuple[str, ...] = ("Linear",)
_READERS = {
    "bitsandbytes": _bitsandbytes,
    "gptq": _gptq,
    "awq": _awq,
    "fp8": _fp8,
    "mxfp4": _mxfp4,
    "compressed-tensors": _compressed_tensors,
}


# --- which modules are converted -----------------------------------------------------------------


def _default_skips(inventory: Inventory) -> set[str]:
    """transformers' ``get_keys_to_not_convert``: the output embedding, tied weights, the last parameter."""
    from peftaudit.memory.targets import output_head_path

    skips = {output_head_path(inventory) or ""}
    for p in inventory.parameters:
        if p.tied_with:
            skips.add(p.module)
            skips.update(n.rpartition(".")[0] for n in p.tied_with)
    if inventory.parameters:
        skips.add(inventory.parameters[-1].module)
    return skips


def _converts(path: str, patterns: Sequence[str]) -> bool:
    """transformers' ``should_convert_module``: skipped when a pattern matches from the start
    (at a module boundary), as a regular expression, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", path) or path.endswith(key) for key in patterns)


def _in_block(path: str, names: tuple[str, ...]) -> bool:
    return not names or any(path.endswith("." + n) or path == n for n in names)


def _ct_matches(module: ModuleRecord, targets: Sequence[str]) -> bool:
    """compressed-tensors' target matching: a class name, an exact name, or ``re:`` + a regex."""
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], module.path):
                return True
        elif target in (module.type, module.path) or (target == "Linear" and module.is_linear):
            return True
    return False


def _names_of(value: Any, f: _Fields, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise f._bad(key, value, "a list of names")
    for v in value:
        if v.startswith("re:"):
            _check_patterns((v[3:],), key)
    return tuple(value)


def _check_patterns(patterns: Sequence[str] | None, key: str) -> None:
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"config.json quantization_config.{key}: {pattern!r} is not a pattern ({exc})") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def base_storage(
    resolved: ResolvedBase,
    plan: TrainingPlan,
    method_quantization: str | None,
    *,
    total_params: int,
    quantized_params: int,
    packed_bytes: int,
    constant_bytes: int,
    dequantized_trained: int,
    dense_dtype: str,
) -> BaseStorage | None:
    """The estimate's line about a checkpoint's quantization; ``None`` for a checkpoint without one."""
    quant = resolved.quantization
    if quant is None or resolved.source is None:
        return None
    where = f"the checkpoint's quantization_config ({quant.label})"
    if resolved.source == "override":
        note = f"--base-dtype {plan.base_dtype} overrides {where}: frozen weights are estimated as {plan.base_dtype}"
    elif resolved.source == "dequantized":
        note = (
            f"{where} is not kept for training: {quant.dequantized}; this estimate assumes the weights "
            f"dequantized to {dense_dtype}"
        )
    elif quantized_params == 0:
        note = f"{where} packs weights that all train here: this estimate assumes them dequantized to {dense_dtype}"
    else:
        note = (
            f"base weights follow {where}: {_count(quantized_params)} of {_count(total_params)} parameters "
            f"stored packed ({_gib(packed_bytes)} GiB + {_gib(constant_bytes)} GiB of constants), the rest "
            f"(embeddings, output head, norms, skipped modules) at {dense_dtype}"
        )
        if method_quantization not in (None, quant.kind):
            note += f"; {plan.method} cannot quantize a pre-quantized checkpoint again"
        if dequantized_trained and quantized_params:
            note += (
                f"; the {_count(dequantized_trained)} parameters that train are estimated dequantized to "
                f"{dense_dtype} (packed weights cannot train)"
            )
        if quant.kind == "fp8":
            note += f"; {FP8_NOTE} (--base-dtype bf16 estimates that)"
    return BaseStorage(
        source=resolved.source,
        quant_method=quant.quant_method,
        format=quant.label,
        quantized_params=quantized_params,
        packed_bytes=packed_bytes,
        constant_bytes=constant_bytes,
        note=note,
        reference=quant.reference,
    )


def _count(n: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


__all__ = [
    "CheckpointQuantization",
    "ResolvedBase",
    "WeightFormat",
    "base_storage",
    "checkpoint_quantization",
    "resolve",
]
