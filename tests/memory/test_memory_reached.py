"""Which trainable weights a step gives a gradient (peftaudit.memory.reached), parameter by parameter.

The oracle is a fake-tensor trace of the real model (full fine-tuning, so every weight trains)
with torch's own AdamW: a weight without a gradient gets no optimizer state. The estimate's static
memory counts gradients and states for the weights :func:`~peftaudit.memory.reached.unreached`
leaves out; the estimate and the trace then agree on them to the byte.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from memory_models import reduced_config
from test_memory_images import build, catalog, inventory

from peftaudit.memory import TrainingPlan, estimate
from peftaudit.memory.reached import is_unreached, unreached

FULL = TrainingPlan(method="full", batch_size=1)


def _stateless(config: dict[str, Any], plan: TrainingPlan, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names of the trainable weights a traced step leaves without optimizer state."""
    from peftaudit.memory.tracing import run

    seen: dict[str, Any] = {}
    real = run.optimizer_for

    def spy(plan: TrainingPlan, params: list[Any], model: Any = None) -> Any:
        seen["optimizer"], step = real(plan, params, model)
        seen["params"] = params
        return seen["optimizer"], step

    monkeypatch.setattr(run, "optimizer_for", spy)
    model = build(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.run_trace(model, plan, steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in seen["params"] if not seen["optimizer"].state.get(p)}


def _predicted(config: dict[str, Any], plan: TrainingPlan) -> set[str]:
    inv = inventory(config)
    skipped = unreached(inv, plan)
    return {p.name for p in inv.parameters if is_unreached(p.name, skipped)}


def qwen_vl() -> dict[str, Any]:
    """Qwen2.5-VL with one text layer and two vision layers, the second a full-attention one."""
    config = catalog("Qwen__Qwen2.5-VL-7B-Instruct", layers=1)
    config["vision_config"]["depth"] = 2
    config["vision_config"]["fullatt_block_indexes"] = [1]
    return config


def mllama() -> dict[str, Any]:
    """Llama 3.2 Vision with 4 text layers (layer 3 a cross-attention one) and 2 + 2 vision layers."""
    config = reduced_config(catalog("meta-llama__Llama-3.2-11B-Vision", layers=4), 4)
    config["vision_config"]["num_hidden_layers"] = config["vision_config"]["num_global_layers"] = 2
    config["vision_config"]["intermediate_layers_indices"] = [0, 1, 1, 1, 1]
    assert config["text_config"]["cross_attention_layers"] == [3]
    return config


CASES = [
    # LLaVA reads the second-to-last CLIP layer: the last one and post_layernorm get nothing.
    pytest.param(lambda: catalog("llava-hf__llava-1.5-7b-hf", layers=1), 600, id="llava"),
    # LLaVA-NeXT's image_newline separates image rows: text-only, nothing uses it.
    pytest.param(
        lambda: catalog("llava-hf__llava-v1.6-mistral-7b-hf", layers=1), 3000, id="llava-next", marks=pytest.mark.slow
    ),
    pytest.param(lambda: catalog("google__gemma-3-4b-pt", layers=1), 300, id="gemma-3"),
    pytest.param(qwen_vl, 800, id="qwen2.5-vl"),
    # Text-only, Mllama skips its cross-attention layer (text layer 3), a language-model layer.
    pytest.param(mllama, 64, id="mllama"),
]


@pytest.mark.parametrize(("make", "seq"), CASES)
@pytest.mark.parametrize("images", [0, 1])
def test_unreached_weights_are_those_the_trace_gives_no_gradient(
    make: Any, seq: int, images: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, plan = make(), FULL.with_(seq_len=seq, images=images)
    traced = _stateless(config, plan, monkeypatch)
    assert traced == _predicted(config, plan)
    if images == 0:
        assert traced  # text-only, the vision tower is always left out


def test_dinov2_mask_token_is_unreached(monkeypatch: pytest.MonkeyPatch) -> None:
    config = catalog("facebook__dinov2-large", layers=1)
    traced = _stateless(config, FULL, monkeypatch)
    assert traced == _predicted(config, FULL) == {"embeddings.mask_token"}


def _static(config: dict[str, Any], plan: TrainingPlan) -> Any:
    from peftaudit.memory.analytic.estimate import _prepare

    return _prepare(inventory(config), plan).static


def test_text_only_static_memory_leaves_the_vision_tower_out_but_deepspeed_does_not() -> None:
    """AdamW keeps no state for a weight without a gradient; DeepSpeed's flat partitions hold every weight."""
    config = catalog("llava-hf__llava-1.5-7b-hf", layers=2)
    inv = inventory(config)
    text = _static(config, FULL.with_(seq_len=600))
    images = _static(config, FULL.with_(seq_len=600, images=1))
    vision = sum(p.numel for p in inv.parameters if ".vision_tower." in p.name or "projector" in p.name)
    bf16 = 2
    assert text.gradients == (inv.total - vision) * bf16
    assert text.flat_gradients == images.flat_gradients == inv.total * bf16
    assert text.optimizer_states < images.optimizer_states < text.flat_optimizer_states
    assert text.optimizer_states_fp32 == images.optimizer_states_fp32
    # ZeRO-3 on 8 GPUs: the same per-GPU optimizer and gradient partitions with or without images.
    plan = FULL.with_(seq_len=600, sharding="zero3", gpus=8)
    text_z3, image_z3 = estimate(inv, plan), estimate(inv, plan.with_(images=1))
    for part in ("optimizer_states", "master_weights"):
        assert text_z3.components[part] == image_z3.components[part]
    # Without sharding the text-only step's states are the language model's only.
    assert estimate(inv, FULL.with_(seq_len=600)).components["optimizer_states"] == text.optimizer_states
