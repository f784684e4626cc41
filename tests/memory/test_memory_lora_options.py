"""LoRA's shape options (layers_to_transform, BD-LoRA, the mica init, trainable tokens) against peft.

Each case builds a real peft config, converts it with ``plan_fields`` (what ``--peft-config`` does),
and compares the method's trainable count with ``get_peft_model``'s on the same tiny model.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from memory_models import CONFIGS, build

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan
from peftaudit.memory.peft_config import plan_fields
from peftaudit.memory.plan import PlanError
from peftaudit.memory.targets import lora_adapters
from peftaudit.plugins import memory_methods

#: A Llama whose dimensions BD-LoRA's two blocks divide; three layers, so that a layer filter shows.
LLAMA = {**CONFIGS["llama"], "num_hidden_layers": 3}
TIED = {**LLAMA, "tie_word_embeddings": True}


def _peft_count(model: Any, config: Any) -> int:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _ours(model: Any, config: Any, **plan: Any) -> int:
    fields = {**plan_fields(config), **plan}
    training = TrainingPlan(**fields)
    training.validate()
    inventory = take_inventory(model)
    adaptation = memory_methods()[training.method].adapt(inventory, training)
    base = sum(p.numel for p in inventory.parameters if p.name in adaptation.trainable)
    return adaptation.adapter_params + base


def _lora(**kwargs: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(**kwargs)


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("layers-list", LLAMA, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2]}),
    ("layers-int", LLAMA, {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1}),
    (
        "layers-pattern",
        LLAMA,
        {"target_modules": ["o_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    ("layers-default-targets", LLAMA, {"layers_to_transform": [2]}),
    (
        "bdlora",
        LLAMA,
        {
            "r": 8,
            "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
            "use_bdlora": {
                "target_modules_bd_a": ["o_proj", "down_proj"],
                "target_modules_bd_b": ["q_proj", "k_proj", "up_proj"],
                "nblocks": 2,
            },
        },
    ),
    (
        "bdlora-lenient",
        LLAMA,
        {
            "r": 8,
            "target_modules": ["q_proj", "v_proj"],
            "use_bdlora": {"target_modules_bd_b": ["q_proj"], "nblocks": 4, "match_strict": False},
        },
    ),
    ("tokens-list-tied", TIED, {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 7]}),
    ("tokens-list-untied", LLAMA, {"target_modules": ["q_proj"], "trainable_token_indices": [3, 3, 9]}),
    ("tokens-dict", LLAMA, {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 2]}}),
    ("dora-layers", LLAMA, {"target_modules": ["v_proj"], "use_dora": True, "layers_to_transform": [0]}),
]


@pytest.mark.parametrize(("config", "lora"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lora_option_counts_equal_peft(config: dict[str, Any], lora: dict[str, Any]) -> None:
    model = build(config)
    assert _ours(model, _lora(**lora)) == _peft_count(build(config), _lora(**lora))


@pytest.mark.parametrize(
    "ia3",
    [
        {},  # peft's default targets and feed-forward modules
        {"target_modules": ["k_proj", "down_proj"]},  # named targets: the default feed-forward (down_proj) still
        {"target_modules": ["k_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
        {"target_modules": ["v_proj", "down_proj"], "feedforward_modules": []},
    ],
    ids=["defaults", "named-targets", "named-feedforward", "no-feedforward"],
)
def test_ia3_feedforward_modules_count_as_peft_does(ia3: dict[str, Any]) -> None:
    from peft import IA3Config

    assert _ours(build(LLAMA), IA3Config(**ia3)) == _peft_count(build(LLAMA), IA3Config(**ia3))


def test_mica_freezes_lora_b_as_peft_does() -> None:
    # MiCA's init runs an SVD of each base weight: a real (tiny, fp32) model, not the meta device.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in LLAMA.items() if k != "model_type"}
    cfg = AutoConfig.for_model("llama", **{**config, "hidden_size": 64, "intermediate_size": 96})
    torch.manual_seed(0)
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "init_lora_weights": "mica"}
    ours = _ours(AutoModelForCausalLM.from_config(cfg), _lora(**lora))
    assert ours == _peft_count(AutoModelForCausalLM.from_config(cfg), _lora(**lora))
    # Only A trains: B's share is gone, and the frozen B is still stored.
    plan = TrainingPlan(**plan_fields(_lora(**lora)))
    adapters = lora_adapters(take_inventory(build(LLAMA)), plan)
    assert all(not a.train_b and a.frozen_params == a.out_features * a.rank for a in adapters)


def test_trainable_tokens_method_counts_equal_peft() -> None:
    from peft import TrainableTokensConfig

    for config in (LLAMA, TIED):
        tokens = TrainableTokensConfig(token_indices=[0, 4, 8, 15])
        assert _ours(build(config), tokens) == _peft_count(build(config), tokens) == 4 * LLAMA["hidden_size"]
    named = TrainableTokensConfig(token_indices=[1], target_modules=["embed_tokens"])
    assert _ours(build(LLAMA), named) == _peft_count(build(LLAMA), named)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"targets": "all-linear", "layers_to_transform": (0,)}, "peft refuses layers_to_transform with targets"),
        ({"targets": ("q_proj",), "layers_to_transform": (7,)}, r"match no module of this .* in layers \[7\]"),
        ({"method": "dora", "targets": ("q_proj",), "lora_init": "mica"}, "no DoRA variant with the mica init"),
        ({"targets": ("q_proj",), "bdlora_b": ("q",), "lora_init": "mica"}, "combining BD-LoRA and the mica init"),
        ({"targets": ("embed_tokens",), "bdlora_b": ("embed",)}, "BD-LoRA wraps linear layers only"),
        ({"targets": ("q_proj",), "bdlora_a": ("q_proj",), "bdlora_blocks": 3}, "not divisible into 3 blocks"),
        ({"targets": ("q_proj",), "rank": 512, "lora_init": "mica"}, "mica init needs rank <= min"),
        (
            {"targets": ("q_proj",), "target_parameters": ("mlp.up_proj.weight",), "lora_init": "mica"},
            "cannot adapt parameters directly",
        ),
    ],
)
def test_options_peft_refuses_are_refused(plan: dict[str, Any], message: str) -> None:
    training = TrainingPlan(**plan)
    with pytest.raises(PlanError, match=message):
        memory_methods()[training.method].adapt(take_inventory(build(LLAMA)), training)


@pytest.mark.parametrize(
    "plan",
    [
        {
            "targets": ("q_proj", "k_proj", "o_proj", "down_proj"),
            "bdlora_a": ("o_proj", "down_proj"),
            "bdlora_b": ("q_proj", "k_proj"),
            "bdlora_blocks": 2,
            "layers_to_transform": (1, 2),
            "gradient_checkpointing": True,
        },
        {"targets": ("q_proj", "v_proj"), "trainable_tokens": 4},
        {"targets": ("q_proj", "v_proj"), "lora_init": "mica"},
    ],
    ids=["bdlora-layers", "lora-tokens", "mica"],
)
def test_estimates_of_the_options_equal_the_trace(plan: dict[str, Any]) -> None:
    # The trace runs peft's own layers (BD-LoRA's einsum, the tokens' index_copy) one step on fake tensors.
    from peftaudit.memory import estimate, trace

    training = TrainingPlan(seq_len=128, batch_size=2, **plan)
    analytic = estimate(take_inventory(build(LLAMA)), training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build(LLAMA), training)
    assert analytic.trainable_params == traced.trainable_params
    assert abs(analytic.allocated_bytes / traced.allocated_bytes - 1) <= 0.10
