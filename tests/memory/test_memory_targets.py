"""Adapter parameter counts: exactly what peft's get_peft_model creates (on meta-device models)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from memory_models import CONFIGS, LLAMA2_7B, build

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan
from peftaudit.memory.methods import BUILTIN_METHODS
from peftaudit.memory.targets import DEFAULT_LORA_TARGETS, lora_adapters, saved_modules

SMALL_MOE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 100,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 32,
}


def _peft_trainable(model: Any, **lora: Any) -> int:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _ours(model: Any, **lora: Any) -> int:
    targets = lora.get("target_modules")
    plan = TrainingPlan(
        rank=lora.get("r", 8),
        targets=tuple(targets) if isinstance(targets, list) else (targets or "default"),
        rank_pattern=lora.get("rank_pattern", {}),
        modules_to_save=tuple(lora.get("modules_to_save", ())),
        target_parameters=tuple(lora.get("target_parameters", ())),
        exclude=tuple(lora.get("exclude_modules", ())),
    )
    inventory = take_inventory(model)
    kind = "dora" if lora.get("use_dora") else "lora"
    return sum(a.params for a in lora_adapters(inventory, plan, kind=kind)) + sum(
        s.params for s in saved_modules(inventory, plan)
    )


CASES = [
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": r".*\.(q|k)_proj"}),
    ("llama", {"target_modules": "all-linear", "rank_pattern": {"q_proj": 4, r"layers\.1\..*": 2}}),
    ("llama", {"target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}),
    ("llama", {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True}),
    ("llama", {"target_modules": ["q_proj"], "target_parameters": ["mlp.gate_proj.weight"]}),
    ("mistral", {"target_modules": "all-linear", "r": 32}),
    ("qwen2", {"target_modules": "all-linear"}),
    ("qwen2", {"target_modules": None}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": ["c_attn"]}),
    ("bert", {"target_modules": "all-linear"}),
    ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["cls"]}),
    ("mixtral", {"target_modules": "all-linear"}),
    ("mixtral", {"target_modules": r".*\.(q_proj|w1|w3)"}),
    ("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"]}),
]


@pytest.mark.parametrize(("arch", "lora"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_adapter_counts_equal_peft(arch: str, lora: dict[str, Any]) -> None:
    lora = {"r": 8, **lora}
    ours = _ours(build(arch), **lora)
    theirs = _peft_trainable(build(arch), **lora)
    assert ours == theirs


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "gate_proj", "up_proj", "down_proj"]])
def test_moe_conversions_equal_peft(model_type: str, targets: Any) -> None:
    # peft re-targets fused experts for some MoE families only (qwen3_moe, olmoe: yes; qwen2_moe: no).
    config = {"model_type": model_type, **SMALL_MOE}
    lora = {"r": 4, "target_modules": targets}
    assert _ours(build(config), **lora) == _peft_trainable(build(config), **lora)


def test_published_llama2_7b_count() -> None:
    # peft-facts.md: Llama-2-7B, all-linear, r=16: 39,976,960 trainable parameters.
    assert _ours(build(LLAMA2_7B), r=16, target_modules="all-linear") == 39_976_960


def test_published_gpt2_count() -> None:
    # peft-facts.md: GPT-2, all-linear, r=16: 2,359,296.
    config = {"model_type": "gpt2", "bos_token_id": 50256, "eos_token_id": 50256}
    assert _ours(build(config), r=16, target_modules="all-linear") == 2_359_296


def test_published_mixtral_count() -> None:
    # peft-facts.md: Mixtral-8x7B, all-linear, r=16: 359,665,664 (fused experts via target_parameters).
    assert _ours(build({"model_type": "mixtral"}), r=16, target_modules="all-linear") == 359_665_664


@pytest.mark.slow
def test_published_counts_equal_peft_on_full_size_models() -> None:
    assert _peft_trainable(build(LLAMA2_7B), r=16, target_modules="all-linear") == 39_976_960
    assert _peft_trainable(build({"model_type": "mixtral"}), r=16, target_modules="all-linear") == 359_665_664


def test_default_targets_match_peft() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    for model_type, targets in DEFAULT_LORA_TARGETS.items():
        assert list(targets) == list(peft_defaults[model_type]), model_type


def test_builtin_methods_are_registered_through_the_hook() -> None:
    from peftaudit.memory import available_methods

    registered = available_methods()
    assert {m.name for m in BUILTIN_METHODS} <= set(registered)
    assert {"full", "freeze", "lora", "qlora", "lora-8bit", "dora", "ia3", "prompt-tuning"} <= set(registered)


def test_a_plugin_can_add_a_method(inventory_of) -> None:
    import peftaudit
    from peftaudit.memory import estimate
    from peftaudit.memory.methods import LoraMethod
    from peftaudit.plugins import register_plugin, unregister_plugin

    class HalfRankLora(LoraMethod):
        name = "half-lora"
        description = "LoRA with every rank halved"

        def adapt(self, inventory: Any, plan: TrainingPlan) -> Any:
            return super().adapt(inventory, plan.with_(rank=max(1, plan.rank // 2)))

    class Plugin:
        @peftaudit.hookimpl
        def peftaudit_register_methods(self, register: Any) -> None:
            register(HalfRankLora())

    plugin = Plugin()
    register_plugin(plugin, name="half-lora-test")
    try:
        inv = inventory_of("llama")
        half = estimate(inv, TrainingPlan(method="half-lora", rank=16, seq_len=64))
        full = estimate(inv, TrainingPlan(method="lora", rank=8, seq_len=64))
        assert half.trainable_params == full.trainable_params
        assert half.method == "half-lora"
    finally:
        unregister_plugin(plugin)
    with pytest.raises(Exception, match="unknown method"):
        TrainingPlan(method="half-lora").validate()


def test_saved_modules_count_their_parameters(inventory_of) -> None:
    inv = inventory_of("llama")
    saved = saved_modules(inv, TrainingPlan(modules_to_save=("lm_head",)))
    assert [s.path for s in saved] == ["lm_head"]
    assert saved[0].params == CONFIGS["llama"]["vocab_size"] * CONFIGS["llama"]["hidden_size"]
