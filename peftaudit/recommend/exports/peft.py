"""peft's own formats: ``LoraConfig(...)`` as Python, and ``adapter_config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftaudit.recommend.exports import Export, header
from peftaudit.recommend.recipe import LoraRecipe
from peftaudit.render.json import dumps


@dataclass(frozen=True)
class PeftPython:
    """``peft.LoraConfig(...)`` as Python source."""

    name: str = "peft"
    description: str = "peft LoraConfig as Python (plus a BitsAndBytesConfig for QLoRA)"
    filename: str = "lora_config.py"

    def export(self, recipe: LoraRecipe) -> Export:
        lines = [f"# {line}" for line in header(recipe, "peft")]
        if recipe.quantization:
            lines += [
                "import torch",
                "from transformers import BitsAndBytesConfig",
                "",
            ]
        lines += ["from peft import LoraConfig", ""]
        if recipe.quantization:
            lines += [
                "# QLoRA: load the base model with quantization_config=bnb_config",
                "bnb_config = BitsAndBytesConfig(",
                "    load_in_4bit=True,",
                f"    bnb_4bit_quant_type={recipe.quantization!r},",
                "    bnb_4bit_use_double_quant=True,",
                "    bnb_4bit_compute_dtype=torch.bfloat16,",
                ")",
                "",
            ]
        if recipe.gradient_checkpointing:
            lines += ["# the memory budget needs gradient checkpointing: model.gradient_checkpointing_enable()", ""]
        lines.append("lora_config = LoraConfig(")
        for key, value in recipe.lora_config_kwargs().items():
            lines.append(f"    {key}={value!r},")
        lines.append(")")
        return Export(self.name, "\n".join(lines) + "\n", self.filename, recipe)


@dataclass(frozen=True)
class PeftJson:
    """``adapter_config.json``, as ``LoraConfig.from_pretrained`` reads it."""

    name: str = "peft-json"
    description: str = "peft adapter_config.json (LoraConfig.from_pretrained reads it)"
    filename: str = "adapter_config.json"

    def export(self, recipe: LoraRecipe) -> Export:
        data: dict[str, Any] = {"peft_type": "LORA", "base_model_name_or_path": recipe.model_id}
        data.update(recipe.lora_config_kwargs())
        data["inference_mode"] = False
        return Export(self.name, dumps(data) + "\n", self.filename, recipe)
