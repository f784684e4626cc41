"""The analytic estimate against the trace oracle: within 10 % of the allocated peak.

Each case builds a tiny real architecture on the meta device, estimates it
analytically, then runs two real training steps of it with peft and torch on
fake tensors (``peftaudit.memory.tracing``) and compares the allocated peaks.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from memory_models import LLAMA2_7B, build

from peftaudit.memory import TrainingPlan, estimate, trace

TOLERANCE = 0.10
BASE = {"seq_len": 256, "batch_size": 2}


def _compare(inventory_of, arch: str, **plan_fields: Any) -> tuple[float, Any, Any]:
    plan = TrainingPlan(**{**BASE, **plan_fields})
    analytic = estimate(inventory_of(arch), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(arch), plan)
    assert traced.source == "trace" and traced.allocated_bytes > 0
    return analytic.allocated_bytes / traced.allocated_bytes - 1.0, analytic, traced


CORE = [
    (arch, method, precision, ckpt)
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "mixtral", "qwen2_moe")
    for method in ("lora", "full", "qlora")
    for precision in ("bf16", "bf16-mixed", "fp32")
    for ckpt in (False, True)
]


@pytest.mark.parametrize(("arch", "method", "precision", "ckpt"), CORE)
def test_core_matrix(inventory_of, arch: str, method: str, precision: str, ckpt: bool) -> None:
    err, analytic, traced = _compare(
        inventory_of, arch, method=method, precision=precision, gradient_checkpointing=ckpt
    )
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)
    assert analytic.trainable_params == traced.trainable_params


METHODS = [
    (method, precision, ckpt)
    for method in ("dora", "ia3", "lora-8bit", "prompt-tuning", "freeze")
    for precision in ("bf16", "fp32")
    for ckpt in (False, True)
]


@pytest.mark.parametrize(("method", "precision", "ckpt"), METHODS)
def test_other_methods(inventory_of, method: str, precision: str, ckpt: bool) -> None:
    err, analytic, traced = _compare(
        inventory_of, "llama", method=method, precision=precision, gradient_checkpointing=ckpt
    )
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


def test_prompt_tuning_embeddings_stay_fp32(inventory_of) -> None:
    """peft builds the prompt embedding in float32 and never casts it to a bf16 model's dtype
    (peft_model.py:_setup_prompt_encoder): its weight, gradient and AdamW moments are float32."""
    plan = TrainingPlan(method="prompt-tuning", seq_len=64, batch_size=1, num_virtual_tokens=8)
    analytic = estimate(inventory_of("llama"), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build("llama"), plan)
    assert analytic.components["trainable_weights"] == traced.components["trainable_weights"] == 8 * 256 * 4
    assert abs(analytic.components["optimizer_states"] - traced.components["optimizer_states"]) < 64
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1.0) <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_eager_attention(inventory_of, arch: str, method: str, ckpt: bool) -> None:
    err, analytic, traced = _compare(inventory_of, arch, method=method, attention="eager", gradient_checkpointing=ckpt)
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


@pytest.mark.parametrize(
    "fields",
    [
        {"precision": "fp16"},
        {"precision": "bf16-true"},
        {"precision": "fp16-mixed"},
        {"optimizer": "adamw", "optimizer_impl": "foreach"},
        {"optimizer": "adamw", "optimizer_impl": "for-loop"},
        {"optimizer": "sgd"},
        {"optimizer": "sgd_momentum"},
        {"optimizer": "adafactor"},
        {"optimizer": "adamw_8bit"},
        {"optimizer": "paged_adamw_8bit"},
        {"optimizer": "lion"},
        {"gradient_accumulation": 2},
        {"dropout": 0.1},
        {"optimizer": "none"},
        {"method": "qlora", "kbit_upcast": True},
        {"method": "qlora", "quant_type": "fp4", "double_quant": False},
        {"base_dtype": "fp8"},
        {"modules_to_save": ("lm_head",), "rank_pattern": {"q_proj": 4}},
        {"targets": ("q_proj", "v_proj"), "lora_bias": "all"},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_plan_options(inventory_of, fields: dict[str, Any], method: str) -> None:
    if method == "full" and any(k in fields for k in ("modules_to_save", "targets", "base_dtype", "method")):
        pytest.skip("an adapter option")
    fields = {"method": method, **fields}
    err, analytic, traced = _compare(inventory_of, "llama", **fields)
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


def test_trace_reports_categories_that_add_up(inventory_of) -> None:
    _, analytic, traced = _compare(inventory_of, "llama", method="lora")
    assert sum(traced.components.values()) == traced.total_bytes
    # Frozen weights and adapters are identified the same way by both (buffers: within a KiB).
    assert abs(traced.components["base_weights"] - analytic.components["base_weights"]) < 1024
    for name in ("trainable_weights", "optimizer_states"):
        assert abs(traced.components[name] - analytic.components[name]) < 1024, name


@pytest.mark.slow
def test_seven_billion_lora_trace(measurements: dict[str, Any], inventory_of) -> None:
    """A whole Llama-2-7B-shaped LoRA step: the trace reproduces the peak recorded in
    ../shared/reference/measured-memory.md (13.09 GiB), and the analytic estimate agrees with it.
    (How long the trace takes is measured by benchmarks/bench_estimate.py, not here.)"""
    ckpt = next(m for m in measurements["simulated"] if m["id"] == "trace-7b-lora16-qkvo-ckpt")
    plan = TrainingPlan(**ckpt["plan"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(LLAMA2_7B), plan)
    assert traced.allocated_bytes / 2**30 == pytest.approx(ckpt["measured"], rel=0.01)
    analytic = estimate(inventory_of(LLAMA2_7B), plan)
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1) < 0.01


def test_sharded_plans_are_refused_by_the_trace() -> None:
    from peftaudit.memory import PlanError

    with pytest.raises(PlanError, match="one GPU"):
        trace(build("llama"), TrainingPlan(sharding="zero3", gpus=2))


def test_trace_sets_grouped_experts_where_experts_read_it_only() -> None:
    """The trace runs experts with transformers' grouped kernel (its GPU default) and leaves every other
    config alone: a BERT config told "grouped experts" could not build a BERT again (its class refuses)."""
    import torch
    from memory_models import CONFIGS

    small = TrainingPlan(seq_len=8, batch_size=1)
    bert = build({**CONFIGS["bert"], "num_hidden_layers": 1})
    config, cls = bert.config, type(bert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace(bert, small)
    with torch.device("meta"):
        cls(config)  # "BertForMaskedLM does not support setting experts implementation" when it was set
    mixtral = build({**CONFIGS["mixtral"], "num_hidden_layers": 1})
    mixtral.config._experts_implementation = "eager"  # as from_pretrained(..., experts_implementation="eager")
    experts = [m for m in mixtral.modules() if type(m).__name__ == "MixtralExperts"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace(mixtral, small)
    assert experts and all(m.config._experts_implementation == "grouped_mm" for m in experts)
