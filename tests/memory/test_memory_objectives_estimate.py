"""The analytic estimate of each training objective against the trace of TRL 1.16's own step.

The trace (``test_memory_objectives_trace.py`` checks it from outside) runs TRL's loss code on a tiny
Llama; the estimate composes the recorded step with the objective's passes
(:mod:`peftaudit.memory.analytic.objective_step`). Two steps, so AdamW's states exist, as in the
other estimate-vs-trace tests.

Tolerances: 3 % (the issue's). TRL's batches carry an attention mask: both sides keep what CUDA's
memory-efficient SDPA keeps with it (the additive mask per layer, keys and values repeated to every
head; docs/memory.md "The attention mask"), which the last tests check against torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from memory_models import CONFIGS

pytest.importorskip("trl")

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.memory.objectives import reward_model_config
from peftaudit.sources.build import build_from_config

# memory_models' tiny Llama (2 layers, GQA, untied head) as a causal LM with a context and an end token.
CONFIG = {
    **CONFIGS["llama"],
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 512,
    "eos_token_id": 2,
}
GRPO = {"seq_len": 144, "completion_len": 16, "generations": 4}

CASES = [
    # (objective, method, gradient checkpointing, tolerance)
    ("dpo", "lora", False, 0.03),
    ("dpo", "full", True, 0.03),
    ("kto", "lora", True, 0.03),
    ("kto", "full", False, 0.03),
    ("orpo", "lora", False, 0.03),
    ("orpo", "full", True, 0.03),
    ("simpo", "lora", False, 0.03),
    ("simpo", "full", True, 0.03),
    ("grpo", "lora", True, 0.03),
    ("grpo", "full", False, 0.03),
    ("grpo", "lora", False, 0.03),
    ("reward", "lora", False, 0.03),
    ("reward", "full", True, 0.03),
]


@pytest.mark.slow  # 26 traces of TRL steps, ~1 s each after TRL's import
@pytest.mark.parametrize(("objective", "method", "checkpointing", "tolerance"), CASES)
def test_objective_estimate_matches_trl_trace(
    objective: str, method: str, checkpointing: bool, tolerance: float
) -> None:
    config = reward_model_config(CONFIG) if objective == "reward" else CONFIG
    assert config is not None
    shape: dict[str, Any] = GRPO if objective == "grpo" else {"seq_len": 128}
    plan = TrainingPlan(method=method, objective=objective, batch_size=2, gradient_checkpointing=checkpointing, **shape)
    analytic = estimate(take_inventory(build_from_config(config, model_id="tiny")), plan)
    traced = trace(build_from_config(config, model_id="tiny"), plan, steps=2)
    assert analytic.trainable_params == traced.trainable_params
    ratio = analytic.allocated_bytes / traced.allocated_bytes - 1
    assert abs(ratio) < tolerance, (ratio, analytic.phase_peaks, traced.phase_peaks)
    # Each phase the trace saw, the estimate has too (KTO's policy KL pass is the trace's reference phase).
    assert set(traced.phase_peaks) - {"setup"} == set(analytic.phase_peaks)


def _saved_by(run: Callable[[], Any]) -> tuple[Any, list[tuple[tuple[int, ...], Any, int]]]:
    """``run()``'s result and what autograd saves meanwhile: (shape, dtype, bytes of the storage behind it)."""
    import torch

    saved: list[tuple[tuple[int, ...], Any, int]] = []

    def pack(t: Any) -> Any:
        saved.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, saved


@pytest.mark.parametrize("length", [16, 12])
def test_masked_sdpa_stand_in_saves_what_torch_efficient_attention_saves(length: int) -> None:
    """The trace's masked SDPA (standins.memory_efficient_attention) against torch 2.13's own pieces.

    torch's ``_scaled_dot_product_efficient_attention`` and its autograd node, run on meta tensors (its
    meta kernel is the CUDA kernel's allocations), given the mask as ``scaled_dot_product_attention``
    prepares it on CUDA (attention.cpp: ``convert_boolean_attn_mask`` makes a new additive mask in the
    query's dtype; ``preprocess_mask`` pads its last dimension to a multiple of 8 when its strides are
    not, then expands it to every head): the stand-in saves the same tensors, and its additive mask
    attends as the boolean one. A length of 12 is padded to 16.
    """
    import torch
    import torch.nn.functional as F

    from peftaudit.memory.tracing.standins import additive_mask, memory_efficient_attention

    b, h, d = 2, 4, 64
    padded = -(-length // 8) * 8

    def qkv(device: str) -> list[torch.Tensor]:
        return [torch.zeros(b, h, length, d, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in "qkv"]

    mask = torch.ones(b, 1, length, length, dtype=torch.bool).tril()
    out, ours = _saved_by(lambda: memory_efficient_attention()(*qkv("cpu"), mask))
    bias = torch.empty(b, 1, length, padded, dtype=torch.bfloat16, device="meta")[..., :length]
    efficient = torch.ops.aten._scaled_dot_product_efficient_attention
    ref, theirs = _saved_by(lambda: efficient(*qkv("meta"), bias.expand(b, h, length, length), True)[0])
    theirs = [s for s in theirs if s[0]]  # the philox seed and offset: 0-d
    assert sorted(ours, key=str) == sorted(theirs, key=str)
    assert (tuple(out.shape), out.dtype) == (tuple(ref.shape), ref.dtype)
    assert ((b, h, length, length), torch.bfloat16, b * length * padded * 2) in ours  # the mask, padded
    q, k, v = (torch.randn(b, h, length, d) for _ in "qkv")
    converted = additive_mask(mask, q.dtype)
    assert (converted.dtype, converted.shape) == (q.dtype, mask.shape)
    by_torch = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, attn_mask=converted), by_torch)


def test_padding_mask_term_of_the_estimate() -> None:
    """Per layer, SDPA with TRL's padding mask keeps what flash (no mask) keeps plus the additive mask
    (rows x S x S in the compute dtype) and the keys and values repeated to every head (repeat_kv); SFT's
    packed batches have no mask.
    """
    inventory = take_inventory(build_from_config(CONFIG, model_id="tiny"))
    rows, seq, heads, kv_heads, head_dim = 4, 128, 4, 2, 64
    term = rows * seq * seq * 2 + 2 * rows * seq * (heads - kv_heads) * head_dim * 2
    # DPO's 2 x 2 chosen and rejected rows; SFT's 4 rows.
    for objective, batch, extra in (("dpo", 2, term), ("sft", rows, 0)):
        plan = TrainingPlan(method="lora", objective=objective, batch_size=batch, seq_len=seq)
        sdpa = estimate(inventory, plan).activations_per_layer
        flash = estimate(inventory, plan.with_(attention="flash")).activations_per_layer
        assert [a - b for a, b in zip(sdpa, flash, strict=True)] == [extra, extra]
