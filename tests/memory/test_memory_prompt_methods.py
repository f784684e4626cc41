"""Prefix tuning and p-tuning: trainable counts equal peft's, and the estimate equals the trace.

Counts are checked against ``peft.get_peft_model(...).get_nb_trainable_parameters()`` (peft 0.21.2)
on real transformers models built on the meta device, and against the counts peft's MetaMathQA
benchmark recorded for Llama-3.2-3B (github.com/huggingface/peft, commit
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, ``method_comparison/MetaMathQA/results/``:
``prefixtuning--llama-3.2-3B-lr_0.001.json``, ``prefixtuning--llama-3.2-3B-tokens50-init_prefix-lr_0.005.json``,
``ptuning--llama-3.2-3B-default.json``, ``train_info.num_trainable_params``). Activations come from the
derived profile (a trace of a depth-reduced copy), compared with a whole-model trace.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from memory_models import CONFIGS, build

from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.memory.analytic.tape import TERMS
from peftaudit.memory.derived.fit import _monomial
from peftaudit.memory.plan import PlanError
from peftaudit.plugins import memory_methods

TOLERANCE = 0.10
CATALOG = Path(__file__).parents[2] / "peftaudit" / "catalog" / "models" / "meta-llama__Llama-3.2-3B.json"
#: Qwen3 with head_dim (32) other than hidden / heads (64): peft's prefix reads ``head_dim`` for GQA.
QWEN3_HEAD_DIM = {**CONFIGS["qwen3"], "head_dim": 32}

PREFIX = [{}, {"prefix_projection": True}, {"prefix_projection": True, "encoder_hidden_size": 48}]
P_TUNING = [
    {},
    {"encoder_hidden_size": 48},
    {"prompt_encoder": "lstm", "encoder_hidden_size": 48},
    {"prompt_encoder": "lstm", "encoder_hidden_size": 16, "encoder_layers": 3},
]


def _peft_count(config: Any, method: str, options: dict[str, Any], tokens: int) -> int:
    import peft

    if method == "prefix-tuning":
        peft_config: Any = peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=tokens,
            prefix_projection=options.get("prefix_projection", False),
            encoder_hidden_size=options.get("encoder_hidden_size"),
        )
    else:
        peft_config = peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=tokens,
            encoder_reparameterization_type=options.get("prompt_encoder", "mlp").upper(),
            encoder_hidden_size=options.get("encoder_hidden_size"),
            encoder_num_layers=options.get("encoder_layers", 2),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(config), peft_config)
    return int(model.get_nb_trainable_parameters()[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "qwen3-head-dim"])
@pytest.mark.parametrize(
    ("method", "options"),
    [("prefix-tuning", o) for o in PREFIX] + [("p-tuning", o) for o in P_TUNING],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_counts_equal_peft(inventory_of, arch: str, method: str, options: dict[str, Any]) -> None:
    """llama and qwen3 have fewer KV heads than heads (GQA), mistral one; gpt2 has no num_key_value_heads."""
    config = QWEN3_HEAD_DIM if arch == "qwen3-head-dim" else arch
    plan = TrainingPlan(method=method, num_virtual_tokens=7, **options)
    adaptation = memory_methods()[method].adapt(inventory_of(config), plan)
    assert adaptation.prompt_params == _peft_count(config, method, options, 7)
    assert adaptation.prompt_params == sum(int(np.prod(s)) for s in adaptation.prompt_tensors)
    assert adaptation.adapter_params == adaptation.prompt_params


@pytest.mark.parametrize(
    ("fields", "recorded"),
    [
        ({"method": "prefix-tuning", "num_virtual_tokens": 200}, 11_468_800),  # prefixtuning--...-lr_0.001
        ({"method": "prefix-tuning", "num_virtual_tokens": 50}, 2_867_200),  # ...-tokens50-init_prefix-lr_0.005
        ({"method": "p-tuning", "num_virtual_tokens": 20}, 28_382_208),  # ptuning--llama-3.2-3B-default
    ],
)
def test_metamathqa_counts(inventory_of, fields: dict[str, Any], recorded: int) -> None:
    """peft's MetaMathQA runs on Llama-3.2-3B (peft commit 5d602fdb, see the module docstring)."""
    inventory = inventory_of(json.loads(CATALOG.read_text())["config"])
    plan = TrainingPlan(**fields)
    assert memory_methods()[fields["method"]].adapt(inventory, plan).prompt_params == recorded


def test_prefix_with_checkpointing_is_refused_as_peft_does(inventory_of) -> None:
    import peft

    model = build("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    plan = TrainingPlan(method="prefix-tuning", gradient_checkpointing=True, seq_len=32)
    with pytest.raises(PlanError, match="gradient checkpointing"):
        estimate(inventory_of("llama"), plan)


def test_refusals(inventory_of) -> None:
    # peft's causal-LM wrapper needs prepare_inputs_for_generation, which BertForMaskedLM lacks.
    import peft

    with pytest.raises(AttributeError, match="prepare_inputs_for_generation"):
        peft.get_peft_model(build("bert"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    for method in ("prefix-tuning", "p-tuning"):
        with pytest.raises(PlanError, match="causal language models"):
            estimate(inventory_of("bert"), TrainingPlan(method=method, seq_len=32))
    # peft ignores encoder_num_layers for the MLP encoder (it warns): an option that changes nothing.
    with pytest.raises(PlanError, match="LSTM"):
        estimate(inventory_of("llama"), TrainingPlan(method="p-tuning", encoder_layers=3, seq_len=32))


def test_fit_reads_sizes_that_grow_with_the_prefix() -> None:
    """K/V of ``s + v`` keys and eager scores ``b s (s + v)``: exact over the terms, not a linear guess."""
    v, seq = 20, 64

    def sizes(f: Any) -> list[float]:
        return [f(2, seq), f(4, seq), f(2, 2 * seq)]

    def value(coeffs: np.ndarray, b: int, s: int) -> float:
        terms = {"tokens": b * s, "tokens_seq": b * s * s, "one": 1, "batch": b, "seq": s, "seq_seq": s * s}
        return float(sum(c * terms[t] for c, t in zip(coeffs, TERMS, strict=True) if c))

    for f in (lambda b, s: 3 * b * (s + v), lambda b, s: 5 * b * s * (s + v), lambda b, s: 2 * (s + v) ** 2):
        worst = [0.0]
        coeffs = _monomial(sizes(f), seq, worst, offset=v)
        assert worst == [0.0]
        assert value(coeffs, 3, 1000) == pytest.approx(f(3, 1000))


def _compare(inventory_of, arch: str, **fields: Any) -> tuple[float, Any, Any]:
    plan = TrainingPlan(**{"seq_len": 128, "batch_size": 2, "num_virtual_tokens": 16, **fields})
    analytic = estimate(inventory_of(arch), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(arch), plan)
    assert analytic.trainable_params == traced.trainable_params
    # peft keeps prompt encoders in float32 (never cast to the model's dtype).
    assert analytic.components["trainable_weights"] == traced.components["trainable_weights"]
    return analytic.allocated_bytes / traced.allocated_bytes - 1.0, analytic, traced


@pytest.mark.parametrize(
    ("arch", "fields"),
    [
        ("llama", {"method": "prefix-tuning"}),
        ("llama", {"method": "prefix-tuning", "prefix_projection": True, "attention": "eager"}),
        ("llama", {"method": "p-tuning"}),
        ("llama", {"method": "p-tuning", "gradient_checkpointing": True}),
        ("gpt2", {"method": "prefix-tuning", "precision": "fp32"}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_estimate_matches_trace(inventory_of, arch: str, fields: dict[str, Any]) -> None:
    err, analytic, traced = _compare(inventory_of, arch, **fields)
    assert analytic.activations_source == "derived"
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


@pytest.mark.parametrize("ckpt", [False, True])
def test_lstm_encoder_matches_trace(inventory_of, ckpt: bool) -> None:
    """The first trace of torch's CPU LSTM in a process frees in another order than later ones: the
    derivation traces its first size again rather than give up (``derivation._derive``)."""
    err, analytic, traced = _compare(
        inventory_of, "llama", method="p-tuning", prompt_encoder="lstm", gradient_checkpointing=ckpt
    )
    assert analytic.activations_source == "derived"
    assert abs(err) <= TOLERANCE, (err, analytic.components, traced.components)


@pytest.mark.parametrize(("method", "same_head"), [("prefix-tuning", "lora"), ("p-tuning", "prompt-tuning")])
def test_chunked_loss_head(inventory_of, method: str, same_head: str) -> None:
    """The trace runs transformers' own loss only: a chunked loss's head is the tape's, the same as a
    method whose head sees the same tokens needing grad (LoRA; prompt tuning's virtual tokens too)."""
    from dataclasses import replace

    from peftaudit.memory.analytic.estimate import _prepare
    from peftaudit.memory.analytic.step import walk

    inventory = inventory_of("llama")
    plan = TrainingPlan(method=method, loss="chunked", seq_len=64, batch_size=2, num_virtual_tokens=8)
    chunked = estimate(inventory, plan)
    assert chunked.activations_source == "derived"
    assert chunked.allocated_bytes < estimate(inventory, plan.with_(loss="default")).allocated_bytes
    reference = _prepare(inventory, plan.with_(method=same_head)).profile
    head = _prepare(inventory, plan).profile.head
    tokens = plan.seq_len + (plan.num_virtual_tokens if method == "p-tuning" else 0)
    assert (
        walk(replace(reference, head=head), 2, tokens, backward=True).phases
        == walk(reference, 2, tokens, backward=True).phases
    )


def test_chunked_loss_on_layers_the_stand_in_does_not_name(inventory_of) -> None:
    """Mixtral's experts (``block_sparse_moe``) have no Llama ``mlp.gate``: the chunked head is still recorded."""
    plan = TrainingPlan(method="lora", loss="chunked", seq_len=64, batch_size=2)
    chunked = estimate(inventory_of("mixtral"), plan)
    assert chunked.activations_source == "derived"
    assert chunked.allocated_bytes < estimate(inventory_of("mixtral"), plan.with_(loss="default")).allocated_bytes
