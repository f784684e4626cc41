"""Reading a checkpoint's ``quantization_config``, one reader per ``quant_method``.

:func:`checkpoint_quantization` reads the block the way transformers' quantizers
do (which modules stay unquantized included) and refuses, with the bad key
named, a block that is not what its method documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from peftaudit.errors import ConfigError
from peftaudit.memory.quantized.formats import FP8_NOTE, CheckpointQuantization, WeightFormat

#: Where fine-tuning recipes dequantize the checkpoint first, and the recipe that says so.
MXFP4_RECIPE = "https://cookbook.openai.com/articles/gpt-oss/fine-tune-transfomers"
DEEPSEEK_FP8_RECIPE = "https://github.com/deepseek-ai/DeepSeek-V3#6-how-to-run-locally"


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
