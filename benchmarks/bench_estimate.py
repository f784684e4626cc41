"""How fast the memory estimator answers, and how long the trace oracle takes.

    python benchmarks/bench_estimate.py

Prints, per model shape: the first estimate (which records the step's tapes),
estimates per second afterwards over varying batch sizes and sequence lengths
(what GPU sizing does), and the time of one fake-tensor trace.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "Llama-2-7B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    },
    "Llama-3.1-70B": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "Mixtral-8x7B": {"model_type": "mixtral"},
}


def build(config: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def main() -> int:
    warnings.filterwarnings("ignore")
    from peftaudit.inventory import take_inventory
    from peftaudit.memory import TrainingPlan, estimate, trace

    print(f"{'model':15s} {'method':7s} {'first (ms)':>10s} {'estimates/s':>12s}")
    for name, config in SHAPES.items():
        inventory = take_inventory(build(config))
        for method in ("full", "lora", "qlora"):
            plan = TrainingPlan(method=method, gradient_checkpointing=True)
            started = time.perf_counter()
            estimate(inventory, plan)
            first = time.perf_counter() - started
            n = 2000
            started = time.perf_counter()
            for i in range(n):
                estimate(inventory, plan.with_(batch_size=1 + i % 16, seq_len=256 * (1 + i % 32)))
            rate = n / (time.perf_counter() - started)
            print(f"{name:15s} {method:7s} {first * 1e3:10.1f} {rate:12,.0f}")

    print()
    print(f"{'trace':40s} {'seconds':>8s}")
    cases = [
        (
            "Llama-2-7B LoRA q,k,v,o, 1 x 512",
            SHAPES["Llama-2-7B"],
            TrainingPlan(targets=("q_proj", "k_proj", "v_proj", "o_proj"), precision="bf16-true", seq_len=512),
        ),
        (
            "Llama-2-7B QLoRA all-linear, 1 x 2048, ckpt",
            SHAPES["Llama-2-7B"],
            TrainingPlan(method="qlora", seq_len=2048, gradient_checkpointing=True),
        ),
        ("Llama-2-7B full, 1 x 512", SHAPES["Llama-2-7B"], TrainingPlan(method="full", seq_len=512)),
    ]
    for label, config, plan in cases:
        model = build(config)
        started = time.perf_counter()
        trace(model, plan)
        print(f"{label:40s} {time.perf_counter() - started:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
