"""Built-in config exporters: peft (Python and adapter_config.json), axolotl, LLaMA-Factory, TRL.

Rank and alpha are always written: their defaults differ (peft r=8 alpha=8,
TRL 16/32, LLaMA-Factory 8/16, axolotl none). Keys are the ones each project
documents (checked in tests against peft 0.21, axolotl 0.21, LLaMA-Factory
0.9.5 and TRL 1.16); what a format cannot say is dropped from the effective
recipe with a warning, never silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from peftaudit import hookimpl
from peftaudit._version import __version__
from peftaudit.recommend.exports import Export, ExportError, names_regex, to_yaml
from peftaudit.recommend.recipe import LoraRecipe
from peftaudit.render.json import dumps


def _header(recipe: LoraRecipe, tool: str) -> list[str]:
    return [
        f"{tool} LoRA config for {recipe.model_id}, written by peftaudit {__version__}",
        f"task: {recipe.task}; method: {recipe.method}; rank and alpha are explicit on purpose",
    ]


def _without_patterns(recipe: LoraRecipe) -> LoraRecipe:
    return recipe.with_hyper(replace(recipe.hyper, rank_pattern=(), alpha_pattern=()))


def _pattern_warning(tool: str, recipe: LoraRecipe) -> str:
    ranks = ", ".join(f"{k}: {v}" for k, v in recipe.hyper.rank_pattern)
    return (
        f"{tool} has no rank_pattern: the per-expert ranks ({ranks}) are dropped and the experts train at "
        f"rank {recipe.hyper.rank} (more parameters than recommended); use --export peft to keep them"
    )


@dataclass(frozen=True)
class PeftPython:
    """``peft.LoraConfig(...)`` as Python source."""

    name: str = "peft"
    description: str = "peft LoraConfig as Python (plus a BitsAndBytesConfig for QLoRA)"
    filename: str = "lora_config.py"

    def export(self, recipe: LoraRecipe) -> Export:
        lines = [f"# {line}" for line in _header(recipe, "peft")]
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


@dataclass(frozen=True)
class Axolotl:
    """An axolotl YAML fragment (model and adapter keys; add datasets and training keys)."""

    name: str = "axolotl"
    description: str = "axolotl YAML (adapter keys; add your datasets and training keys)"
    filename: str = "axolotl.yml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        data: dict[str, Any] = {"base_model": recipe.model_id}
        if recipe.trust_remote_code:
            data["trust_remote_code"] = True
        data["adapter"] = recipe.method
        if recipe.quantization:
            data["load_in_4bit"] = True
        data["lora_r"] = h.rank
        data["lora_alpha"] = h.alpha
        data["lora_dropout"] = h.dropout
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
        return Export(self.name, to_yaml(data, _header(recipe, "axolotl")), self.filename, recipe, tuple(warnings))


#: LLaMA-Factory's training stage for each task.
_LLAMA_FACTORY_STAGES = {"instruct": "sft", "cpt": "pt", "rl": "dpo"}


@dataclass(frozen=True)
class LlamaFactory:
    """A LLaMA-Factory YAML fragment (``llamafactory-cli train``; add dataset and template)."""

    name: str = "llama-factory"
    description: str = "LLaMA-Factory YAML (model and LoRA keys; add dataset, template and output_dir)"
    filename: str = "llama_factory.yaml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        stage = _LLAMA_FACTORY_STAGES.get(recipe.task)
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
        if h.rank_pattern:
            warnings.append(_pattern_warning("LLaMA-Factory", recipe))
            effective = _without_patterns(effective)
        if t.fan_in_fan_out:
            warnings.append("LLaMA-Factory has no fan_in_fan_out key: peft sets it for the Conv1D layers itself")
        data: dict[str, Any] = {"model_name_or_path": recipe.model_id}
        if recipe.trust_remote_code:
            data["trust_remote_code"] = True
        if recipe.quantization:
            data["quantization_bit"] = 4
        data["stage"] = stage
        data["do_train"] = True
        data["finetuning_type"] = "lora"
        data["lora_rank"] = h.rank
        data["lora_alpha"] = h.alpha
        data["lora_dropout"] = h.dropout
        # Comma-separated names, matched by peft like a list (no regular expressions here).
        data["lora_target"] = ",".join(t.names)
        if t.modules_to_save:
            data["additional_target"] = ",".join(t.modules_to_save)
        if h.use_rslora:
            data["use_rslora"] = True
        header = _header(recipe, "LLaMA-Factory")
        if recipe.task == "rl":
            header.append("stage dpo shown; LLaMA-Factory also has ppo and kto stages")
        return Export(self.name, to_yaml(data, header), self.filename, effective, tuple(warnings))


@dataclass(frozen=True)
class Trl:
    """A TRL config file (``trl sft --config FILE``): ModelConfig's PEFT keys."""

    name: str = "trl"
    description: str = "TRL YAML for `trl sft --config` (ModelConfig's use_peft and lora_* keys)"
    filename: str = "trl.yaml"

    def export(self, recipe: LoraRecipe) -> Export:
        t, h = recipe.targets, recipe.hyper
        warnings: list[str] = []
        effective = recipe
        if h.rank_pattern:
            warnings.append(_pattern_warning("TRL", recipe))
            effective = _without_patterns(effective)
        if t.fan_in_fan_out:
            warnings.append("TRL has no fan_in_fan_out key: peft sets it for the Conv1D layers itself")
        # TRL turns a one-element list into a string, which peft reads as a regular expression:
        # write a single target (or a pattern) as a regex that matches like peft's list.
        if t.pattern is not None:
            modules: list[str] = [t.pattern]
        elif len(t.names) == 1:
            modules = [names_regex(t.names)]
        else:
            modules = list(t.names)
        data: dict[str, Any] = {"model_name_or_path": recipe.model_id}
        if recipe.trust_remote_code:
            data["trust_remote_code"] = True
        data["use_peft"] = True
        data["lora_r"] = h.rank
        data["lora_alpha"] = h.alpha
        data["lora_dropout"] = h.dropout
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
        header = [*_header(recipe, "TRL"), "use with: trl sft --config trl.yaml --dataset_name ... --output_dir ..."]
        return Export(self.name, to_yaml(data, header), self.filename, effective, tuple(warnings))


BUILTIN_EXPORTERS = (PeftPython(), PeftJson(), Axolotl(), LlamaFactory(), Trl())


@hookimpl
def peftaudit_register_exporters(register: Callable[[object], None]) -> None:
    for exporter in BUILTIN_EXPORTERS:
        register(exporter)
