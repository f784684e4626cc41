"""The recipe: one LoRA configuration, as every exporter writes it.

A :class:`LoraRecipe` is the recommendation reduced to what a training config
holds: targets, rank, alpha, dropout, rsLoRA, per-target patterns, the peft task
type and quantization. :meth:`LoraRecipe.lora_config_kwargs` is exactly what
goes into ``peft.LoraConfig(...)``; the other formats are translations of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from peftaudit.recommend.rank import LoraHyperparameters
from peftaudit.recommend.targets import TargetSpec


@dataclass(frozen=True)
class LoraRecipe:
    """Everything a LoRA training config says about the adapter."""

    model_id: str
    task: str
    """peftaudit's task: ``instruct``, ``cpt``, ``classification`` or ``rl``."""
    task_type: str | None
    """peft's ``TaskType`` (``CAUSAL_LM``, ``SEQ_CLS``, ``SEQ_2_SEQ_LM``...) or ``None``."""
    targets: TargetSpec
    hyper: LoraHyperparameters
    quantization: str | None = None
    """``"nf4"`` for QLoRA (4-bit base weights), ``None`` for LoRA on unquantized weights."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (set when the memory budget needs it)."""

    @property
    def method(self) -> str:
        return "qlora" if self.quantization else "lora"

    def with_hyper(self, hyper: LoraHyperparameters) -> LoraRecipe:
        return replace(self, hyper=hyper)

    def lora_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig``, rank and alpha always explicit.

        Keys appear in a stable order and only when they differ from peft's
        defaults, except ``r``, ``lora_alpha``, ``lora_dropout`` and
        ``target_modules``, which are always written (their defaults differ
        between peft, TRL, axolotl and LLaMA-Factory).
        """
        h = self.hyper
        t = self.targets
        kwargs: dict[str, Any] = {
            "r": h.rank,
            "lora_alpha": h.alpha,
            "lora_dropout": h.dropout,
            "target_modules": t.pattern if t.pattern is not None else list(t.names),
        }
        if t.parameters:
            kwargs["target_parameters"] = list(t.parameters)
        if t.exclude:
            kwargs["exclude_modules"] = list(t.exclude)
        if t.modules_to_save:
            kwargs["modules_to_save"] = list(t.modules_to_save)
        if t.fan_in_fan_out:
            kwargs["fan_in_fan_out"] = True
        kwargs["use_rslora"] = h.use_rslora
        if h.rank_pattern:
            kwargs["rank_pattern"] = dict(h.rank_pattern)
        if h.alpha_pattern:
            kwargs["alpha_pattern"] = dict(h.alpha_pattern)
        kwargs["bias"] = "none"
        if self.task_type:
            kwargs["task_type"] = self.task_type
        return kwargs


def task_type_for(architecture: str, config: dict[str, Any] | None = None, task: str = "instruct") -> str | None:
    """peft's ``TaskType`` for a model class (and the task, for classification on a decoder)."""
    config = config or {}
    if task == "classification" or architecture.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if architecture.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if architecture.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if architecture.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if config.get("is_encoder_decoder") else "CAUSAL_LM"
    return None
