"""Training objectives in the analytic estimate: rows, reference model, reward head, GRPO's cache.

Each number comes from outside peftaudit's rules: TRL 1.16's trainers (what they run), peft's
``get_peft_model`` (what trains), transformers' own ``DynamicCache`` (what generation keeps) and
the model's own parameters (what a reference copy weighs). The traces of TRL's trainers are
compared with the estimate in ``test_memory_objectives_trace.py``.
"""

from __future__ import annotations

import pytest
from memory_models import CONFIGS

from peftaudit.inventory import take_inventory
from peftaudit.memory import PlanError, TrainingPlan, estimate
from peftaudit.memory.objectives import kv_cache_bytes, objective_step, reward_model_config
from peftaudit.sources.build import build_from_config

# memory_models' tiny Llama (2 layers, GQA, untied head) as a causal LM with a context and an end token.
CONFIG = {
    **CONFIGS["llama"],
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 512,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def llama():  # type: ignore[no-untyped-def]
    return take_inventory(build_from_config(CONFIG, model_id="tiny-llama"))


@pytest.fixture(scope="module")
def reward_model():  # type: ignore[no-untyped-def]
    config = reward_model_config(CONFIG)
    assert config is not None
    return build_from_config(config, model_id="tiny-llama-rm")


def test_rows_per_micro_batch_follow_trl() -> None:
    # DPO/ORPO/SimPO/reward collators stack chosen then rejected; GRPO's per_device_train_batch_size
    # is prompts x num_generations; KTO trains one completion per example.
    base = TrainingPlan(batch_size=3, seq_len=256)
    assert objective_step(base).rows == 3
    for pairs in ("dpo", "orpo", "simpo", "reward"):
        assert objective_step(base.with_(objective=pairs)).rows == 6
    assert objective_step(base.with_(objective="kto")).rows == 3
    grpo = objective_step(base.with_(objective="grpo", generations=4, completion_len=64, gradient_accumulation=2))
    assert (grpo.rows, grpo.prompt, grpo.completion, grpo.generation_rows) == (12, 192, 64, 24)
    assert grpo.scored_per_row == 64


def test_reference_model_follows_trl_defaults() -> None:
    # DPOTrainer: the PEFT model with adapters disabled, else a second model unless precomputed;
    # GRPOConfig.beta defaults to 0.0 (no reference model).
    assert objective_step(TrainingPlan(objective="dpo")).reference == "adapters-off"
    assert objective_step(TrainingPlan(objective="dpo", method="full")).reference == "copy"
    assert objective_step(TrainingPlan(objective="kto", method="full", precompute_ref=True)).reference == "none"
    assert objective_step(TrainingPlan(objective="orpo", method="full")).reference == "none"
    assert objective_step(TrainingPlan(objective="grpo", method="full")).reference == "none"
    assert objective_step(TrainingPlan(objective="grpo", method="full", beta=0.04)).reference == "copy"


def test_full_dpo_holds_a_reference_copy_the_size_of_the_model(llama) -> None:  # type: ignore[no-untyped-def]
    import torch

    model = build_from_config(CONFIG, model_id="tiny-llama")
    # bf16 weights, as DPOTrainer loads the reference, and the buffers (rotary inverse frequencies, fp32).
    weights = sum(p.numel() * 2 for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    plan = TrainingPlan(method="full", objective="dpo", batch_size=2, seq_len=128)
    full = estimate(llama, plan)
    assert full.components["reference_weights"] == weights
    assert torch.bfloat16.itemsize == 2
    # Precomputed reference log-probs: no copy and no reference pass.
    pre = estimate(llama, plan.with_(precompute_ref=True))
    assert pre.components["reference_weights"] == 0
    assert "reference forward" not in pre.phase_peaks
    assert pre.total_bytes < full.total_bytes
    # PEFT: the same weights with adapters disabled.
    lora = estimate(llama, plan.with_(method="lora"))
    assert lora.components["reference_weights"] == 0 and "reference forward" in lora.phase_peaks


def test_pairs_run_twice_the_rows(llama) -> None:  # type: ignore[no-untyped-def]
    sft = estimate(llama, TrainingPlan(batch_size=4, seq_len=128))
    orpo = estimate(llama, TrainingPlan(objective="simpo", batch_size=2, seq_len=128))
    per_layer = sft.activations_per_layer
    assert orpo.activations_per_layer[1:-1] == per_layer[1:-1]  # 2 pairs = 4 sequences through each layer


@pytest.mark.slow  # the sequence classifier's step is traced (derived), ~8 s
def test_reward_model_trains_its_score_head_as_peft_does(reward_model) -> None:  # type: ignore[no-untyped-def]
    import copy

    from peft import LoraConfig, get_peft_model

    assert type(reward_model).__name__ == "LlamaForSequenceClassification"
    assert reward_model.config.num_labels == 1 and reward_model.score.weight.shape == (1, 256)
    inventory = take_inventory(reward_model)
    plan = TrainingPlan(objective="reward", batch_size=2, seq_len=128)
    peft_model = get_peft_model(
        copy.deepcopy(reward_model), LoraConfig(r=16, target_modules="all-linear", task_type="SEQ_CLS")
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert estimate(inventory, plan).trainable_params == trainable


def test_reward_needs_a_sequence_classifier(llama) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlanError, match="load it as its ForSequenceClassification class"):
        estimate(llama, TrainingPlan(objective="reward"))


def test_grpo_kv_cache_equals_transformers_cache() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in CONFIG.items() if k != "architectures"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    rows, tokens = 3, 10
    with torch.no_grad():
        cache = model(torch.ones(rows, tokens, dtype=torch.long), use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == kv_cache_bytes(rows, tokens, layers=2, kv_dim=2 * 64, compute="fp32")


def test_grpo_generation_phase_and_vllm(llama) -> None:  # type: ignore[no-untyped-def]
    plan = TrainingPlan(objective="grpo", batch_size=1, generations=4, seq_len=192, completion_len=64)
    local = estimate(llama, plan)
    assert "generation" in local.phase_peaks
    server = estimate(llama, plan.with_(generation="vllm-server"))
    assert "generation" not in server.phase_peaks
    colocated = estimate(llama, plan.with_(generation="vllm-colocate", vllm_memory=0.4))
    assert [w.code for w in colocated.warnings if w.code == "vllm-colocated"] == ["vllm-colocated"]
    assert "40%" in next(w.message for w in colocated.warnings if w.code == "vllm-colocated")
