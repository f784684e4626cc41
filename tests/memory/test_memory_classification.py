"""Sequence classifiers (a BERT encoder with pooler and classifier): analytic estimate vs the trace."""

from __future__ import annotations

import pytest

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.sources.build import build_from_config

# all-MiniLM-L6-v2's shape with a 2-way classifier head (what docs/examples/minilm-lora trains).
CONFIG = {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "num_labels": 2,
}

PLANS = [
    TrainingPlan(
        method="lora", targets=("query", "value"), rank=8, modules_to_save=("classifier",), seq_len=256, batch_size=32
    ),
    TrainingPlan(
        method="lora", targets=("query", "value"), rank=8, seq_len=256, batch_size=32, gradient_checkpointing=True
    ),
    TrainingPlan(method="full", seq_len=128, batch_size=8),
]


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS, ids=["lora+classifier", "lora+checkpointing", "full"])
def test_classifier_estimate_within_10_percent_of_trace(plan: TrainingPlan) -> None:
    inventory = take_inventory(build_from_config(CONFIG, model_id="minilm-cls"))
    analytic = estimate(inventory, plan).allocated_bytes
    traced = trace(build_from_config(CONFIG, model_id="minilm-cls"), plan).allocated_bytes
    assert abs(analytic / traced - 1) < 0.10, (analytic, traced)
