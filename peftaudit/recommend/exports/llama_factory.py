"""LLaMA-Factory: the model and LoRA keys of a ``llamafactory-cli train`` YAML."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from peftaudit.recommend.exports import (
    Export,
    ExportError,
    header,
    lora_keys,
    model_keys,
    to_yaml,
    without_patterns_or_fan_in,
)
from peftaudit.recommend.recipe import LoraRecipe

#: LLaMA-Factory's training stage for each task.
STAGES = {"instruct": "sft", "cpt": "pt", "rl": "dpo"}


@dataclass(frozen=True)
class LlamaFactory:
    """A LLaMA-Factory YAML fragment (``llamafactory-cli train``; add dataset and template)."""

    name: str = "llama-factory"
    description: str = "LLaMA-Factory YAML (model and LoRA keys; add dataset, template and output_dir)"
    filename: str = "llama_factory.yaml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        stage = STAGES.get(recipe.task)
        if stage is None:
            raise ExportError(
                "LLaMA-Factory trains language models only (stages pt, sft, rm, ppo, dpo, kto): no "
                "sequence-classification head; use --export peft or --export trl"
            )
        if not t.names:
            raise ExportError(
                "LLaMA-Factory cannot target parameters (no target_parameters), and an empty lora_target means "
                "'all' linear layers: choose a preset with linear targets, or --export peft/axolotl/trl"
            )
        warnings: list[str] = []
        effective = recipe
        if t.parameters:
            warnings.append(
                "LLaMA-Factory has no target_parameters: the fused experts "
                f"({', '.join(t.parameters)}) stay untrained; use --export peft, axolotl or trl to train them"
            )
            effective = replace(effective, targets=replace(t, parameters=()))
        effective, dropped = without_patterns_or_fan_in(effective, "LLaMA-Factory")
        warnings += dropped
        data: dict[str, Any] = model_keys(recipe, "model_name_or_path")
        if recipe.quantization:
            data["quantization_bit"] = 4
        data["stage"] = stage
        data["do_train"] = True
        data["finetuning_type"] = "lora"
        data.update(lora_keys(recipe, "lora_rank"))
        # Comma-separated names, matched by peft like a list (no regular expressions here).
        data["lora_target"] = ",".join(t.names)
        if t.modules_to_save:
            data["additional_target"] = ",".join(t.modules_to_save)
        if h.use_rslora:
            data["use_rslora"] = True
        lines = header(recipe, "LLaMA-Factory")
        if recipe.task == "rl":
            lines.append("stage dpo shown; LLaMA-Factory also has ppo and kto stages")
        return Export(self.name, to_yaml(data, lines), self.filename, effective, tuple(warnings))
