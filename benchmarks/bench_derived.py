"""Derived step profiles: how long a new architecture takes, how fast estimates are after, how exact.

    python benchmarks/bench_derived.py            # speed, then the whole catalog against the trace
    python benchmarks/bench_derived.py --speed    # speed only
    python benchmarks/bench_derived.py --accuracy # accuracy only (a markdown table for docs/memory.md)
    python benchmarks/bench_derived.py --accuracy --only Qwen/Qwen3-VL-8B-Instruct,google/paligemma-3b-pt-224
                                                  # the rows of some models (to merge into the table)

Speed: for one catalog model of every family no layer program reads, the first estimate
(deriving the profile: three traces of a depth-reduced copy), timed in this process after
the libraries are imported, with the profile store off; then estimates per second over
varying batch sizes and sequence lengths (what ``fit`` and ``gpus`` do), once every
profile they need is derived (a length past a sliding window has one of its own).

Accuracy: every text model of the catalog, three plan shapes (LoRA bf16; QLoRA with
gradient checkpointing; full fine-tuning, ZeRO-3 on 8 GPUs, whose per-GPU step is traced on
one GPU), against a fake-tensor trace of a copy cut to 8 layers per stack
(tests/memory/catalog_accuracy.py).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "memory"), str(ROOT / "tests")]


def speed() -> None:
    from catalog_accuracy import catalog_configs

    from peftaudit.inventory import take_inventory
    from peftaudit.memory import TrainingPlan, estimate
    from peftaudit.memory.analytic.programs import lookup
    from peftaudit.sources.build import build_from_config

    os.environ["PEFTAUDIT_NO_CACHE"] = "1"
    families: dict[str, str] = {}
    for model_id, config in catalog_configs().items():
        if lookup(str(config["model_type"])) is None:
            families.setdefault(str(config["model_type"]), model_id)
    # Warm up the imports and torch's fake-tensor machinery once (a CLI run pays this anyway).
    warm = catalog_configs()["facebook/opt-125m"]
    estimate(take_inventory(build_from_config(warm, model_id="warm")), TrainingPlan(seq_len=64))
    print("| model | model type | first estimate (derive) | estimates per second after |")
    print("| --- | --- | ---: | ---: |")
    for model_type, model_id in sorted(families.items(), key=lambda kv: kv[1]):
        inventory = take_inventory(build_from_config(catalog_configs()[model_id], model_id=model_id))
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate(inventory, TrainingPlan())
        first = time.perf_counter() - started
        plans = [TrainingPlan(batch_size=b, seq_len=s) for b in (1, 2, 4, 8) for s in (512, 1024, 2048, 4096)]
        for plan in plans:  # lengths past a sliding window derive their own profile once
            estimate(inventory, plan)
        started = time.perf_counter()
        for _ in range(5):
            for plan in plans:
                estimate(inventory, plan)
        rate = 5 * len(plans) / (time.perf_counter() - started)
        print(f"| {model_id} | {model_type} | {first:.1f} s | {rate:,.0f} |", flush=True)


def accuracy(only: set[str] | None = None) -> None:
    from catalog_accuracy import SHAPES, catalog_configs, compare

    print("| model | plan | estimate (GiB) | trace (GiB) | error | note |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    errors: list[float] = []
    for model_id in catalog_configs():
        if only is not None and model_id not in only:
            continue
        for shape in SHAPES:
            r = compare(model_id, shape)
            gib = 1024**3
            note = ", ".join(w for w in r.warnings if w in ("approximate-activations", "attention-unsupported"))
            if r.trace_bytes is None:
                note = f"not traced: {r.skipped}" + (f"; {note}" if note else "")
                print(f"| {model_id} | {shape} | {r.estimate_bytes / gib:.2f} | - | - | {note} |", flush=True)
                continue
            errors.append(abs(r.error))
            trace_gib = r.trace_bytes / gib
            print(
                f"| {model_id} | {shape} | {r.estimate_bytes / gib:.2f} | {trace_gib:.2f} | {r.error:+.2%} | {note} |",
                flush=True,
            )
    errors.sort()
    print(f"\n{len(errors)} traced: median |error| {errors[len(errors) // 2]:.3%}, largest {errors[-1]:.3%}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    only = set(argv[argv.index("--only") + 1].split(",")) if "--only" in argv[:-1] else None
    args = {a for a in argv if a.startswith("--") and a != "--only"}
    if not args or "--speed" in args:
        speed()
    if not args or "--accuracy" in args:
        accuracy(only)
