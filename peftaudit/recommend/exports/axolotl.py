"""axolotl: the model and adapter keys of its YAML config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftaudit.recommend.exports import Export, header, lora_keys, model_keys, to_yaml
from peftaudit.recommend.recipe import LoraRecipe


@dataclass(frozen=True)
class Axolotl:
    """An axolotl YAML fragment (model and adapter keys; add datasets and training keys)."""

    name: str = "axolotl"
    description: str = "axolotl YAML (adapter keys; add your datasets and training keys)"
    filename: str = "axolotl.yml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        data: dict[str, Any] = model_keys(recipe, "base_model")
        data["adapter"] = recipe.method
        if recipe.quantization:
            data["load_in_4bit"] = True
        data.update(lora_keys(recipe, "lora_r"))
        # axolotl passes a string straight to peft, which reads it as a regular expression.
        data["lora_target_modules"] = t.pattern if t.pattern is not None else list(t.names)
        if t.parameters:
            data["lora_target_parameters"] = list(t.parameters)
        if t.fan_in_fan_out:
            data["lora_fan_in_fan_out"] = True
        if t.modules_to_save:
            data["lora_modules_to_save"] = list(t.modules_to_save)
        if h.use_rslora:
            data["peft_use_rslora"] = True
        if h.rank_pattern:
            data["lora_rank_pattern"] = dict(h.rank_pattern)
        if h.alpha_pattern:
            data["lora_alpha_pattern"] = dict(h.alpha_pattern)
        if recipe.gradient_checkpointing:
            data["gradient_checkpointing"] = True
        warnings: list[str] = []
        if recipe.task_type not in (None, "CAUSAL_LM"):
            warnings.append(f"axolotl trains causal language models; task type {recipe.task_type} is not expressed")
        return Export(self.name, to_yaml(data, header(recipe, "axolotl")), self.filename, recipe, tuple(warnings))
