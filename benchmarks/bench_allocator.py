"""The caching-allocator replay: how fast it is on a real traced step, and what it reports.

    python benchmarks/bench_allocator.py            # 8 layers of a Llama-2-7B shape at 4k tokens
    python benchmarks/bench_allocator.py --layers 32

For each plan: trace two training steps of the model (fake tensors, every allocation and free
logged), turn the log into the GPU's allocations (:func:`allocation_events`), and time one
replay through the allocator model with expandable segments off and on (best of 5), and the
bisection for the smallest capacity. Prints a markdown table (benchmarks/results/allocator_speed.md).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "memory"), str(ROOT / "tests")]

GIB = 1024**3


def main(layers: int) -> None:
    from memory_models import LLAMA2_7B, build, reduced_config

    from peftaudit.memory.allocator import allocation_events, replay, smallest_capacity
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.memory.tracing.model import decoder_layers
    from peftaudit.memory.tracing.run import run_trace

    plans = {
        "LoRA r16 bf16, batch 1 x 4096": TrainingPlan(method="lora", batch_size=1, seq_len=4096),
        "LoRA r16 bf16, checkpointing, batch 1 x 4096": TrainingPlan(
            method="lora", batch_size=1, seq_len=4096, gradient_checkpointing=True
        ),
    }
    config = reduced_config(LLAMA2_7B, layers)
    print(
        "| plan | events | trace | replay (ES off / on) | capacity search (ES off / on) "
        "| peak requested | peak allocated | peak reserved (ES off / on) | smallest capacity (ES off / on) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, plan in plans.items():
        model = build(config)
        watched = [(str(i), layer) for i, layer in enumerate(decoder_layers(model))]
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = run_trace(model, plan, steps=2, layers=watched)
        trace_s = time.perf_counter() - started
        assert traced.events is not None
        events = allocation_events(traced.events)
        replay_ms, capacity_ms, results, capacities = [], [], [], []
        for expandable in (False, True):
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                result = replay(events, expandable_segments=expandable)
                best = min(best, time.perf_counter() - started)
            replay_ms.append(best * 1000)
            started = time.perf_counter()
            capacity = smallest_capacity(events, expandable_segments=expandable)
            capacity_ms.append((time.perf_counter() - started) * 1000)
            results.append(result)
            capacities.append(capacity)
        off, on = results
        print(
            f"| {name} | {len(events):,} | {trace_s:.1f} s "
            f"| {replay_ms[0]:.0f} / {replay_ms[1]:.0f} ms "
            f"| {capacity_ms[0]:.0f} / {capacity_ms[1]:.0f} ms "
            f"({capacities[0].replays} / {capacities[1].replays} replays) "
            f"| {off.peak_requested / GIB:.3f} GiB | {off.peak_allocated / GIB:.3f} GiB "
            f"| {off.peak_reserved / GIB:.3f} / {on.peak_reserved / GIB:.3f} GiB "
            f"| {capacities[0].bytes / GIB:.3f} / {capacities[1].bytes / GIB:.3f} GiB |",
            flush=True,
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[args.index("--layers") + 1]) if "--layers" in args else 8)
