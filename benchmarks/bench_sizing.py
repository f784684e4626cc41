"""GPU sizing speed: the whole sweep (every catalog GPU x 4 methods) after the model is loaded.

    .venv/bin/python benchmarks/bench_sizing.py [MODEL]

Target (issue 5): under 1 s for 20 GPUs x 4 methods. Also times the max-batch
and max-sequence searches on one GPU.
"""

from __future__ import annotations

import sys
import time

from peftaudit.gpus import gpus
from peftaudit.gpus.sizing import max_batch_size, max_seq_len, smallest_setup
from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan
from peftaudit.sources.base import SourceOptions, resolve


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else "meta-llama/Llama-3.1-8B"
    resolved, source = resolve(model)
    inventory = take_inventory(source.build(resolved, SourceOptions()))
    plans = [TrainingPlan(method=m) for m in ("full", "lora", "qlora", "dora")]
    catalog = gpus()
    start = time.perf_counter()
    fits = [[smallest_setup(inventory, p, g) for p in plans] for g in catalog]
    sweep = time.perf_counter() - start
    h100 = next(g for g in catalog if g.name == "H100 SXM")
    start = time.perf_counter()
    batch = max_batch_size(inventory, plans[1], h100)
    seq = max_seq_len(inventory, plans[1], h100)
    search = time.perf_counter() - start
    print(f"model {model}: {len(catalog)} GPUs x {len(plans)} methods = {len(catalog) * len(plans)} answers")
    print(f"sweep (smallest setup per GPU and method): {sweep:.3f} s")
    print(f"max batch ({batch}) + max seq len ({seq}) on H100, LoRA: {search:.3f} s")
    print(f"fits on one GPU: {sum(f.fits and f.gpus == 1 for row in fits for f in row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
