"""Measure real training-step memory on an NVIDIA GPU next to peftaudit's estimate.

    python benchmarks/gpu_memory_check.py            # about ten minutes on one GPU
    python benchmarks/gpu_memory_check.py --quick    # two configurations, for a smoke test

For each configuration (full fine-tuning, LoRA, QLoRA; a short and a long
sequence) the script builds a randomly initialised Llama-shaped model from its
config (no download: the GPU machine needs no network), runs three real
training steps the way Hugging Face ``Trainer`` does (bf16 weights, bf16
autocast, fused AdamW, optional gradient checkpointing), and records
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and the memory
the process uses outside PyTorch's allocator (the CUDA context) next to the
analytic estimate and the fake-tensor trace. Results go to
``benchmarks/results/gpu_memory.json``; ``tests/memory/test_memory_calibration.py``
reads that file.

Without CUDA the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_memory.json"

#: A ~1.2B-parameter Llama shape: big enough that weights, activations and logits all matter,
#: small enough that full fine-tuning fits a 24 GB GPU at short sequences.
CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}

CASES: list[dict[str, Any]] = [
    {"name": "full-short", "plan": {"method": "full", "batch_size": 2, "seq_len": 512}},
    {
        "name": "full-short-ckpt",
        "plan": {"method": "full", "batch_size": 2, "seq_len": 512, "gradient_checkpointing": True},
    },
    {"name": "lora-short", "plan": {"method": "lora", "batch_size": 2, "seq_len": 512}},
    {"name": "lora-long", "plan": {"method": "lora", "batch_size": 1, "seq_len": 4096}},
    {
        "name": "lora-long-ckpt",
        "plan": {"method": "lora", "batch_size": 2, "seq_len": 4096, "gradient_checkpointing": True},
    },
    {"name": "qlora-short", "plan": {"method": "qlora", "batch_size": 2, "seq_len": 512}},
    {
        "name": "qlora-long-ckpt",
        "plan": {"method": "qlora", "batch_size": 2, "seq_len": 4096, "gradient_checkpointing": True},
    },
]
QUICK = ("lora-short", "qlora-short")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two configurations only")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (JSON)")
    parser.add_argument("--no-trace", action="store_true", help="skip the fake-tensor trace per case")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_memory_check: torch is not installed; nothing to measure.")
        return 0
    if not torch.cuda.is_available():
        print("gpu_memory_check: no CUDA GPU here; nothing measured. Run this on a machine with an NVIDIA GPU.")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    cases = [c for c in CASES if not args.quick or c["name"] in QUICK]
    runs = []
    workdir = Path(tempfile.mkdtemp(prefix="peftaudit-gpu-check-"))
    try:
        for case in cases:
            started = time.perf_counter()
            try:
                run = measure(case, workdir, trace=not args.no_trace)
            except torch.OutOfMemoryError as exc:
                print(f"{case['name']}: out of memory ({exc}); skipped")
                continue
            run["seconds"] = round(time.perf_counter() - started, 1)
            runs.append(run)
            print(
                f"{run['name']:18s} allocated {run['max_memory_allocated'] / 2**30:6.2f} GiB "
                f"(estimate {run['estimate']['allocated_bytes'] / 2**30:6.2f}) reserved "
                f"{run['max_memory_reserved'] / 2**30:6.2f} GiB + context {run['cuda_context_bytes'] / 2**30:4.2f} "
                f"(estimate total {run['estimate']['total_bytes'] / 2**30:6.2f})  {run['seconds']}s"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": runs}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


def measure(case: dict[str, Any], workdir: Path, *, trace: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftaudit.inventory import take_inventory
    from peftaudit.memory import TrainingPlan, estimate

    plan = TrainingPlan(**case["plan"])
    cfg = AutoConfig.for_model(CONFIG["model_type"], **{k: v for k, v in CONFIG.items() if k != "model_type"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    predicted = estimate(take_inventory(skeleton), plan)
    traced = None
    if trace:
        from peftaudit.memory import trace as run_trace

        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        traced = run_trace(fresh, plan).to_dict()

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = _load(cfg, plan, workdir)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.method != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, CONFIG["vocab_size"], (plan.batch_size, plan.seq_len), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # step 1 creates the optimizer states; steps 2 and 3 are the steady state
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    outside = (total - free) - torch.cuda.memory_reserved()
    run = {
        "name": case["name"],
        "config": CONFIG,
        "plan": plan.to_dict(),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
        "cuda_context_bytes": int(outside),
        "estimate": predicted.to_dict(),
        "trace": traced,
    }
    del model, optimizer, params, ids
    gc.collect()
    torch.cuda.empty_cache()
    return run


def _load(cfg: Any, plan: Any, workdir: Path) -> Any:
    """The model on the GPU: random bf16 weights, or quantized with bitsandbytes from a saved copy."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if plan.method != "qlora":
        with torch.device("cuda"):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = workdir / "model"
    if not path.exists():
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant_type,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda"
    )


if __name__ == "__main__":
    sys.exit(main())
