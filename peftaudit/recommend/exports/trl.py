"""TRL: ``ModelConfig``'s PEFT keys in a config file for ``trl sft --config``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftaudit.recommend.exports import (
    Export,
    header,
    lora_keys,
    model_keys,
    names_regex,
    to_yaml,
    without_patterns_or_fan_in,
)
from peftaudit.recommend.recipe import LoraRecipe


@dataclass(frozen=True)
class Trl:
    """A TRL config file (``trl sft --config FILE``): ModelConfig's PEFT keys."""

    name: str = "trl"
    description: str = "TRL YAML for `trl sft --config` (ModelConfig's use_peft and lora_* keys)"
    filename: str = "trl.yaml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        effective, warnings = without_patterns_or_fan_in(recipe, "TRL")
        # TRL turns a one-element list into a string, which peft reads as a regular expression:
        # write a single target (or a pattern) as a regex that matches like peft's list.
        if t.pattern is not None:
            modules: list[str] = [t.pattern]
        elif len(t.names) == 1:
            modules = [names_regex(t.names)]
        else:
            modules = list(t.names)
        data: dict[str, Any] = model_keys(recipe, "model_name_or_path")
        data["use_peft"] = True
        data.update(lora_keys(recipe, "lora_r"))
        data["lora_target_modules"] = modules
        if t.parameters:
            data["lora_target_parameters"] = list(t.parameters)
        if t.modules_to_save:
            data["lora_modules_to_save"] = list(t.modules_to_save)
        data["lora_task_type"] = recipe.task_type or "CAUSAL_LM"
        data["use_rslora"] = h.use_rslora
        if recipe.quantization:
            data["load_in_4bit"] = True
            data["bnb_4bit_quant_type"] = recipe.quantization
            data["use_bnb_nested_quant"] = True
        if recipe.gradient_checkpointing:
            data["gradient_checkpointing"] = True  # a TrainingArguments key; TRL's config file takes it too
        lines = [*header(recipe, "TRL"), "use with: trl sft --config trl.yaml --dataset_name ... --output_dir ..."]
        return Export(self.name, to_yaml(data, lines), self.filename, effective, tuple(warnings))
