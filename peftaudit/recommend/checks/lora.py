"""LoRA settings the model or the targets make wrong: fan_in_fan_out, dropout on fused experts."""

from __future__ import annotations

from collections.abc import Iterator

from peftaudit.recommend.checks import CheckContext, check
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.targets import compact_paths

#: Module classes LoRA wraps besides Linear/Conv1D (peft's dispatchers).
ADAPTABLE_TYPES = frozenset({"Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention"})


@check("lora.fan-in-fan-out", "Conv1D layers (GPT-2) store weights as (in, out) and need fan_in_fan_out")
def fan_in_fan_out(ctx: CheckContext) -> Iterator[Finding]:
    conv = [m.path for m in ctx.inventory.modules if m.is_linear and m.type == "Conv1D"]
    if ctx.targets is None:
        if conv:
            yield Finding(
                "lora.fan-in-fan-out",
                "info",
                f"{len(conv)} Conv1D layers store their weight as (in, out)",
                fix="set fan_in_fan_out=True when targeting them (axolotl: lora_fan_in_fan_out: true); peft "
                "sets it itself with a warning, which LLaMA-Factory and TRL, having no such key, rely on",
                modules=tuple(compact_paths(conv)),
            )
        return
    adapted = ctx.adapted
    if adapted is None:
        return
    paths = set(adapted.module_paths)
    hit = [p for p in conv if p in paths]
    if hit and not ctx.targets.fan_in_fan_out:
        yield Finding(
            "lora.fan-in-fan-out",
            "warning",
            f"the targets include {len(hit)} Conv1D layers but fan_in_fan_out is not set",
            fix="set fan_in_fan_out=True (axolotl: lora_fan_in_fan_out: true); otherwise peft overrides it "
            "with a warning and tools that read adapter_config.json before peft fixes it merge transposed",
            modules=tuple(compact_paths(hit)),
        )
    linear = [m.path for m in ctx.inventory.modules if m.path in paths and m.is_linear and m.type != "Conv1D"]
    if ctx.targets.fan_in_fan_out and linear:
        yield Finding(
            "lora.fan-in-fan-out",
            "warning",
            f"fan_in_fan_out=True, but {len(linear)} targets are nn.Linear layers stored as (out, in)",
            fix="set fan_in_fan_out=False (peft resets it with a warning for nn.Linear)",
            modules=tuple(compact_paths(linear)),
        )


@check("lora.dropout", "LoRA dropout on fused experts, which peft rejects")
def dropout(ctx: CheckContext) -> Iterator[Finding]:
    if ctx.targets is not None and ctx.targets.parameters and ctx.dropout > 0:
        yield Finding(
            "lora.dropout-experts",
            "error",
            f"lora_dropout={ctx.dropout:g} with target_parameters: peft's ParamWrapper raises",
            fix="set lora_dropout=0 (one dropout applies to every target), or drop target_parameters",
            modules=tuple(ctx.targets.parameters),
        )
