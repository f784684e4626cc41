"""Check the caching-allocator model against PyTorch's real allocator on a CUDA GPU.

    python benchmarks/gpu_allocator_check.py     # under a minute on one GPU

Replays the same allocation sequences (the patterns of tests/memory/test_allocator.py and
seeded random ones) with ``torch.empty(n, dtype=torch.uint8, device="cuda")`` and through
:func:`peftaudit.memory.allocator.replay`, with ``expandable_segments`` off and on (one
subprocess each: the setting is read when CUDA starts), and compares peak allocated, peak
reserved, peak segments and retries. Limited capacities are checked with
``torch.cuda.set_per_process_memory_fraction`` where that limit means what the model's
capacity means (fixed segments: ``alloc_block`` refuses a segment that would pass it; with
expandable segments the fraction is checked against ``get_allocation_size`` rather than the
pages mapped, so those are skipped). Prints one line per case and exits 1 on a mismatch.

Without CUDA the script says so and exits with status 0.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
KIB = 1 << 10


def sequences() -> dict[str, list[tuple[int, int]]]:
    """Named allocation sequences: ``(buffer, +bytes)`` allocates, ``(buffer, -bytes)`` frees."""
    out: dict[str, list[tuple[int, int]]] = {
        "small packing": [(i, 500 * KIB) for i in range(5)],
        "20 MiB packing": [(i, 2 * MIB) for i in range(11)],
        "large split": [(0, 9 * MIB), (1, 10 * MIB + MIB // 2)],
        "best fit": [(0, 30 * MIB), (1, 24 * MIB), (0, -30 * MIB), (1, -24 * MIB), (2, 22 * MIB), (3, 29 * MIB)],
        "merge": [(i, 2 * MIB) for i in range(10)] + [(3, -2 * MIB), (4, -2 * MIB), (10, 4 * MIB)],
        "growing": [e for i, s in enumerate(range(11, 20)) for e in ((i, s * MIB), (i, -s * MIB))],
    }
    alternating = []
    for i in range(8):
        alternating += [(2 * i, 24 * MIB), (2 * i + 1, 4 * MIB)]
    alternating += [(2 * i, -24 * MIB) for i in range(8)] + [(100 + i, 26 * MIB) for i in range(8)]
    out["alternating"] = alternating
    for seed in range(6):
        rng = random.Random(seed)
        live: list[int] = []
        sizes: dict[int, int] = {}
        events = []
        for step in range(3000):
            if live and rng.random() < 0.47:
                key = live.pop(rng.randrange(len(live)))
                events.append((key, -sizes[key]))
            else:
                size = rng.randint(1, MIB) if rng.random() < 0.6 else rng.randint(MIB, 96 * MIB)
                live.append(step)
                sizes[step] = size
                events.append((step, size))
        out[f"random {seed}"] = events
    return out


def run_on_gpu(capacities: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """In this process (CUDA already set up by the caller's environment): the real figures."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    results: dict[str, dict[str, int]] = {}
    for name, events in sequences().items():
        for capacity in [0, *capacities.get(name, [])]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.reset_accumulated_memory_stats()
            # allowed_memory_maximum is fraction * total rounded down: aim half a MiB over
            # (segments are whole 2 MiB).
            torch.cuda.set_per_process_memory_fraction((capacity + MIB // 2) / total if capacity else 1.0)
            live: dict[int, torch.Tensor] = {}
            oom = -1
            for index, (key, size) in enumerate(events):
                if size > 0:
                    try:
                        live[key] = torch.empty(size, dtype=torch.uint8, device="cuda")
                    except torch.cuda.OutOfMemoryError:
                        oom = index
                        break
                else:
                    del live[key]
            stats = torch.cuda.memory_stats()
            live.clear()
            results[f"{name}@{capacity}"] = {
                "peak_allocated": stats["allocated_bytes.all.peak"],
                "peak_reserved": stats["reserved_bytes.all.peak"],
                "peak_segments": stats["segment.all.peak"],
                "alloc_retries": stats["num_alloc_retries"],
                "oom_event": oom,
            }
    torch.cuda.set_per_process_memory_fraction(1.0)
    return results


def main() -> int:
    import torch

    from peftaudit.memory.allocator import replay

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    failures = 0
    for expandable in (False, True):
        capacities: dict[str, list[int]] = {}
        if not expandable:
            for name, events in sequences().items():
                plenty = replay(events)
                capacities[name] = [plenty.peak_reserved - 2 * MIB, plenty.peak_reserved // 2 // (2 * MIB) * 2 * MIB]
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"expandable_segments:{expandable}")
        child = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(capacities)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        real = json.loads(child.stdout.strip().splitlines()[-1])
        for name, events in sequences().items():
            for capacity in [0, *capacities.get(name, [])]:
                model = replay(events, expandable_segments=expandable, capacity=capacity or None)
                mine = {
                    "peak_allocated": model.peak_allocated,
                    "peak_reserved": model.peak_reserved,
                    "peak_segments": model.peak_segments,
                    "alloc_retries": model.alloc_retries,
                    "oom_event": model.oom_event if model.oom_event is not None else -1,
                }
                theirs = dict(real[f"{name}@{capacity}"])
                if expandable:  # torch counts no segment for mapped pages
                    del mine["peak_segments"], theirs["peak_segments"]
                ok = mine == theirs
                failures += not ok
                label = f"{name}, expandable_segments={expandable}, capacity={capacity // MIB or '-'} MiB"
                print(f"{'ok  ' if ok else 'DIFF'} {label}" + ("" if ok else f": model {mine}, torch {theirs}"))
    print(f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(run_on_gpu(json.loads(sys.argv[sys.argv.index("--child") + 1]))))
        sys.exit(0)
    sys.exit(main())
