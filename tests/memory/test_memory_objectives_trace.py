"""TRL 1.16's objectives under the trace (peftaudit/memory/tracing/objectives.py), checked from outside.

Every objective runs TRL's own loss code on a tiny Llama (hidden 64, 2 layers, vocab 1000) with LoRA
and with full fine-tuning. The traced numbers are compared with what can be worked out without the
estimator: peft's own trainable counts, the reference copy's bytes (the model's, in the policy's
dtype), GRPO's KV cache (transformers' ``DynamicCache``), and the allocations of TRL's fused
log-prob head read off ``trl/kernels/chunked_logprob.py`` (lines in trl 1.16.0):

* forward (:300-378): seven fp32 statistics per scored token (:340-346), one ``mm_buf`` tile of
  ``min(N, 4096) x 32768`` in the compute dtype (:347), then the requested outputs while the tile is
  alive: ``log_z`` (+ the ``log`` it adds), ``logprobs``, ``entropy`` (+ a quotient), ``mean_logits``
  (fp32 each), ``is_top1`` (three bool vectors);
* backward (:380-465): the tile again, the fp32 ``grad_hidden`` and its cast to the hidden's dtype
  (+ the fp32 ``grad_weight`` and its cast when the head trains).
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import pytest

pytest.importorskip("trl")

from peftaudit.memory import TrainingPlan, trace
from peftaudit.memory.plan import PlanError
from peftaudit.memory.tracing import objectives
from peftaudit.memory.tracing.objectives import (
    ObjectiveTraceError,
    TracedPhases,
    require_trl,
    run_until_metrics,
    stop_at_metrics,
    traced_phases,
)

HIDDEN, LAYERS, KV_DIM, VOCAB = 64, 2, 2 * 16, 1000
SEQ, BATCH = 32, 2
GENERATIONS, COMPLETION = 2, 8
TILE_COLUMNS, TILE_ROWS = 32768, 4096  # _CHUNKED_LOGPROB_CHUNK_SIZE (trainer/utils.py), TOKEN_CHUNK_SIZE
BF16 = 2
#: Bytes per scored token of the forward's statistics and outputs at its peak, by the outputs the
#: trainer asks for (add_fused_lm_head calls: dpo_trainer.py:956-962, kto_trainer.py:967-972,
#: grpo_trainer.py:1068-1077): 7 stats + log_z + its log, logprobs, entropy + its quotient, mean_logits
#: (fp32), is_top1 and its two comparisons (bool).
HEAD_OUTPUT_BYTES = {
    ("log_probs", "entropy", "mean_logits", "is_top1"): 4 * 11 + 3,
    ("log_probs", "entropy", "mean_logits"): 4 * 11,
    ("log_probs", "entropy"): 4 * 11,
    ("log_probs",): 4 * 9,
}
POLICY_OUTPUTS = {
    "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
    "kto": ("log_probs", "entropy", "mean_logits"),
    "grpo": ("log_probs", "entropy"),
}
OBJECTIVES = ("dpo", "kto", "orpo", "simpo", "reward", "grpo")


@pytest.fixture(scope="module", autouse=True)
def _trl_trainers() -> None:
    """TRL's trainer modules import datasets and pandas (seconds): once, here, not inside a test's timing."""
    import trl.experimental.cpo
    import trl.experimental.orpo
    import trl.trainer.dpo_trainer
    import trl.trainer.grpo_trainer
    import trl.trainer.kto_trainer
    import trl.trainer.reward_trainer  # noqa: F401


def _config(**extra: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        **extra,
    )


def _model(seq_cls: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if seq_cls:
            return AutoModelForSequenceClassification.from_config(_config(num_labels=1, pad_token_id=0))
        return AutoModelForCausalLM.from_config(_config())


def _plan(objective: str, method: str, **extra: Any) -> TrainingPlan:
    fields: dict[str, Any] = {"method": method, "objective": objective, "seq_len": SEQ, "batch_size": BATCH}
    if objective == "grpo":
        fields.update(generations=GENERATIONS, completion_len=COMPLETION)
    return TrainingPlan(**{**fields, **extra})


@functools.cache
def _traced(objective: str, method: str, **extra: Any) -> TracedPhases:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return traced_phases(_model(), _plan(objective, method, **extra))


def _scored(objective: str) -> int:
    """Tokens the fused head scores per call: every position of the pairs (DPO) or completions (KTO); the
    completion tokens of each generated sequence (GRPO, labels before them are -100)."""
    if objective == "dpo":
        return 2 * BATCH * (SEQ - 1)
    if objective == "kto":
        return BATCH * (SEQ - 1)
    return BATCH * GENERATIONS * COMPLETION


def _tile(tokens: int, dtype_bytes: int = BF16) -> int:
    return min(tokens, TILE_ROWS) * TILE_COLUMNS * dtype_bytes


def _peft_trainable(objective: str, method: str) -> int:
    """Trainable parameters as peft itself counts them (LoRA r16 on every linear layer; a reward model's
    score head trains in full through the SEQ_CLS task type), or every parameter for full fine-tuning."""
    import peft

    model = _model(seq_cls=objective == "reward")
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    config = peft.LoraConfig(r=16, target_modules="all-linear", task_type="SEQ_CLS" if objective == "reward" else None)
    wrapped = peft.get_peft_model(model, config)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def _model_bytes() -> int:
    """The policy's bytes as TRL's reference copy holds them: bf16 weights, buffers as built."""
    model = _model()
    weights = sum(p.numel() for p in model.parameters()) * BF16
    return weights + sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_trace(objective: str, method: str) -> None:
    traced = _traced(objective, method)
    assert traced.trainable_params == _peft_trainable(objective, method)
    phases = set(traced.phases)
    assert {"forward", "backward", "optimizer step"} <= phases
    assert ("reference forward" in phases) == (objective in ("dpo", "kto"))
    assert ("generation" in phases) == (objective == "grpo")
    # TRL builds a second model only for full fine-tuning (dpo_trainer.py:907-927); beta 0 GRPO needs none.
    copy = method == "full" and objective in ("dpo", "kto")
    assert traced.category_peaks.get("reference_weights", 0) == (_model_bytes() if copy else 0)
    if objective in ("orpo", "simpo", "reward"):
        assert not traced.heads  # full logits (or a score head), no fused head
        assert traced.category_peaks["logits_and_loss"] > 0
        return
    tokens = _scored(objective)
    forward = [h for h in traced.heads if h.kind == "forward"]
    backward = [h for h in traced.heads if h.kind == "backward"]
    assert {h.tokens for h in traced.heads} == {tokens}
    # DPO: policy, then reference; KTO: policy KL (no grad), policy, reference KL, reference; GRPO: policy.
    # LoRA's reference is the policy with its adapters off (the same patched head); the copy's head
    # computes TRL's default outputs (dpo_trainer.py:961-962, kto_trainer.py:971-972).
    policy, reference = POLICY_OUTPUTS[objective], ("log_probs",) if copy else POLICY_OUTPUTS[objective]
    calls = {"dpo": (policy, reference), "kto": (policy, policy, reference, reference), "grpo": (policy,)}
    assert [h.transient for h in forward] == [
        _tile(tokens) + HEAD_OUTPUT_BYTES[outputs] * tokens for outputs in calls[objective]
    ]
    assert [h.phase for h in forward] == {
        "dpo": ["forward", "reference forward"],
        "kto": ["reference forward", "forward", "reference forward", "reference forward"],
        "grpo": ["forward"],
    }[objective]
    assert len(backward) == 1
    trained_head = VOCAB * HIDDEN * (4 + BF16) if method == "full" else 0
    assert backward[0].transient == _tile(tokens) + tokens * HIDDEN * (4 + BF16) + trained_head


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_kv_cache(method: str) -> None:
    """transformers' DynamicCache over the generation batch: every layer's keys and values of the prompt and
    all but the last sampled token, plus, while the last step concatenates the last layer's values
    (cache_utils.py:136-137), its previous values (one token fewer) beside the new ones."""
    traced = _traced("grpo", method)
    rows = BATCH * GENERATIONS
    tokens = SEQ - 1  # prompt + completion - 1
    slice_bytes = rows * KV_DIM * BF16  # one token's keys (or values) of one layer
    full = slice_bytes * tokens * LAYERS * 2
    assert traced.category_peaks["kv_cache"] == full + slice_bytes * (tokens - 1)
    assert "kv_cache" not in traced.components  # freed before the training step


def test_dpo_bf16_mixed() -> None:
    """fp32 weights under autocast: the head casts its hidden chunk and each weight chunk to bf16 (the
    kernel sees the trace's autocast; without the stand-in torch.mm(out=tile) fails on dtypes)."""
    traced = _traced("dpo", "lora", precision="bf16-mixed")
    tokens = _scored("dpo")
    head = next(h for h in traced.heads if h.kind == "forward" and h.phase == "forward")
    casts = tokens * HIDDEN * BF16 + VOCAB * HIDDEN * BF16
    assert head.transient == _tile(tokens) + 7 * 4 * tokens + casts
    full = _traced("dpo", "full", precision="bf16-mixed")
    assert full.category_peaks["reference_weights"] == _model_bytes() + sum(
        p.numel() for p in _model().parameters()
    ) * (4 - BF16)


def test_dpo_checkpointing_with_accumulation() -> None:
    """TRL re-enables checkpointing after its reference pass with transformers' default function; the
    second micro-batch recomputes under the trace's autocast only with keep_recompute_autocast."""
    traced = _traced("dpo", "lora", gradient_checkpointing=True, gradient_accumulation=2)
    assert len([h for h in traced.heads if h.kind == "backward"]) == 2
    assert traced.peak < _traced("dpo", "lora").peak + traced.category_peaks["gradients"]


def test_precompute_ref_drops_the_reference() -> None:
    traced = _traced("dpo", "full", precompute_ref=True)
    assert "reference forward" not in traced.phases
    assert "reference_weights" not in traced.category_peaks


def test_grpo_reference_and_vllm() -> None:
    """beta > 0: a reference copy (full fine-tuning) scores the generation batch under no_grad after
    generation; vLLM: no generation here, the policy recomputes the old log-probs instead."""
    beta = _traced("grpo", "full", beta=0.04, gradient_checkpointing=True)
    assert beta.category_peaks["reference_weights"] == _model_bytes()
    assert [h.phase for h in beta.heads if h.kind == "forward"] == ["reference forward", "forward"]
    vllm = _traced("grpo", "lora", generation="vllm-colocate")
    assert "generation" not in vllm.phases and "kv_cache" not in vllm.category_peaks
    assert [h.phase for h in vllm.heads if h.kind == "forward"] == ["reference forward", "forward"]


def test_reward_through_trace_builds_the_classifier() -> None:
    """trace() of a causal LM under the reward objective traces its sequence-classification class."""
    plan = _plan("reward", "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(_model(), plan)
    assert traced.trainable_params == _peft_trainable("reward", "lora")
    assert traced.source == "trace"


def test_reward_qlora_keeps_the_score_head_unquantized() -> None:
    """transformers keeps a classifier's last module out of 4-bit (quantizers/base.py:get_keys_to_not_convert),
    so peft's SEQ_CLS task can train a copy of it (modules_to_save)."""
    traced = _traced("reward", "qlora")
    assert traced.trainable_params == _peft_trainable("reward", "lora")


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_full_logit_objectives_refuse_virtual_tokens(objective: str) -> None:
    """TRL 1.16's ORPO/CPO losses compare the logits with the labels unsliced; prompt tuning prepends logits."""
    with pytest.raises(PlanError, match="cannot train prompt-tuning"):
        _traced(objective, "prompt-tuning")


def test_varied_lengths_are_not_traced_for_objectives() -> None:
    with pytest.raises(PlanError, match="--lengths varied is not traced for the dpo objective"):
        trace(_model(), _plan("dpo", "lora", lengths="varied"))


def test_sft_runs_no_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("an sft trace built a TRL step")

    monkeypatch.setattr(objectives, "trl_step", refuse)
    traced = traced_phases(_model(), TrainingPlan(seq_len=SEQ, batch_size=BATCH))
    assert set(traced.phases) == {"setup", "forward", "backward", "optimizer step"}


def test_sentinel_names_a_renamed_local() -> None:
    """The stubs read the trainer method's local ``loss``/``losses`` where its metrics begin; a TRL that
    renamed it gets a one-line error naming the method, the local and the pinned release."""
    stop = stop_at_metrics("DPOTrainer._compute_loss", "loss")

    def _compute_loss() -> None:
        total_loss = 1.0  # noqa: F841 - what a renamed local looks like
        stop()

    with pytest.raises(ObjectiveTraceError, match=r"DPOTrainer\._compute_loss has no local 'loss'.*trl==1\.16"):
        run_until_metrics(_compute_loss, "DPOTrainer._compute_loss")

    def _compute_loss_ok() -> None:
        loss = 2.0  # noqa: F841
        stop()

    _compute_loss_ok.__code__ = _compute_loss_ok.__code__.replace(co_name="_compute_loss")
    assert run_until_metrics(_compute_loss_ok, "DPOTrainer._compute_loss") == 2.0
    with pytest.raises(ObjectiveTraceError, match="without reaching its metrics"):
        run_until_metrics(lambda: None, "KTOTrainer._compute_loss")


def test_trl_missing_or_other_release(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ObjectiveTraceError, match=r"trl 1\.17\.0 is installed: pip install trl==1\.16\.\*"):
        require_trl("dpo")
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ObjectiveTraceError, match=r"dpo objective .* pip install trl==1\.16\.\*"):
        require_trl("dpo")
