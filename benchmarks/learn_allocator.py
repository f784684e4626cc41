"""Learn what the caching allocator holds above the allocated peak, per plan shape (issue 14).

For every case of a grid (two Llama-shaped models cut to a few depths; LoRA, QLoRA and full
fine-tuning; checkpointing on and off; fixed and varied batch lengths; three token counts):

1. trace the training steps on fake tensors with every allocation and free logged
   (``run_trace(..., layers=...)``, two steps, or the four of ``--lengths varied``);
2. replay the log through the caching-allocator model (:mod:`peftaudit.memory.allocator`),
   with and without ``expandable_segments``: the peak reserved with memory to spare (for varied
   lengths without expandable segments, that of a long run made from the four steps:
   :func:`peftaudit.memory.allocator.lengths.reserved_over_run`, as the trace does), and the
   smallest capacity the steps run in (bisection, free-and-retry included);
3. fit, per plan shape (:func:`peftaudit.memory.allocator.reserve.plan_shape`), each overhead
   (reserved minus allocated; capacity minus allocated) as a non-negative combination of the
   estimate's :data:`~peftaudit.memory.allocator.reserve.FEATURES`.

``--write`` stores the per-case replays in ``benchmarks/results/allocator_replays.jsonl`` as
it goes (cases already there are not traced again) and the coefficients in
``peftaudit/memory/allocator/factors.json`` (what estimates use);
``--refit`` fits again from that file without tracing. ``--check`` replays held-out cases
(whole-depth Llama-2-7B and other families) and compares them with the learned figures:
``benchmarks/results/allocator_factors.md`` is its output.

    .venv/bin/python benchmarks/learn_allocator.py --write     # ~1 h on 1 core
    .venv/bin/python benchmarks/learn_allocator.py --write --shard 0/2 &   # or two processes
    .venv/bin/python benchmarks/learn_allocator.py --write --shard 1/2
    .venv/bin/python benchmarks/learn_allocator.py --check > benchmarks/results/allocator_factors.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "memory"), str(ROOT / "tests")]

FACTORS = ROOT / "peftaudit" / "memory" / "allocator" / "factors.json"
REPLAYS = ROOT / "benchmarks" / "results" / "allocator_replays.jsonl"
GIB = 1 << 30

#: Catalog models the factors are learned on (MHA with a 32k vocabulary; GQA with a 128k one),
#: cut to 4 layers and whole (``None``).
MODELS: tuple[tuple[str, tuple[int | None, ...]], ...] = (
    ("meta-llama/Llama-2-7b-hf", (4, None)),
    ("meta-llama/Meta-Llama-3-8B", (4, None)),
)
#: (batch, sequence length): 1k to 16k tokens a micro-batch. A whole model without checkpointing
#: is not traced at 16k tokens (over 100 GiB of activations: no one runs it).
TOKENS = ((1, 1024), (1, 4096), (4, 4096))
METHODS = ("lora", "qlora", "full")

#: Held out of the fit: families it never saw (Mistral, Qwen2.5, Phi-3), and shapes it did not
#: see (16k tokens as one sequence, 8 layers).
CHECKS: tuple[tuple[str, int | None, str, int, int, bool, str], ...] = (
    ("mistralai/Mistral-7B-v0.1", None, "lora", 4, 4096, True, "fixed"),
    ("mistralai/Mistral-7B-v0.1", None, "qlora", 4, 4096, True, "fixed"),
    ("meta-llama/Meta-Llama-3-8B", None, "qlora", 1, 16384, True, "fixed"),
    ("Qwen/Qwen2.5-7B", None, "lora", 1, 2048, False, "fixed"),
    ("Qwen/Qwen2.5-7B", 8, "qlora", 2, 2048, True, "fixed"),
    ("microsoft/Phi-3-mini-4k-instruct", 8, "lora", 1, 2048, True, "fixed"),
    ("meta-llama/Llama-2-7b-hf", 8, "full", 2, 2048, True, "fixed"),
    ("Qwen/Qwen2.5-7B", None, "lora", 1, 4096, True, "varied"),
    ("Qwen/Qwen2.5-7B", 8, "qlora", 2, 2048, True, "varied"),
    ("meta-llama/Llama-2-7b-hf", 8, "full", 1, 2048, True, "varied"),
)
#: Steps of the long runs whose least capacity ``--check`` compares with the traced steps' own.
CAPACITY_RUN = 64


def catalog_config(model_id: str) -> dict[str, Any]:
    from peftaudit.sources.catalog import lookup

    entry = lookup(model_id)
    assert entry is not None, model_id
    return dict(entry.config)


def trace_case(model_id: str, depth: int | None, plan: Any) -> tuple[Any, float]:
    """Trace ``plan``'s steps on ``model_id`` cut to ``depth`` layers, every allocation logged; and its seconds."""
    from memory_models import build, reduced_config

    from peftaudit.memory.allocator.reserve import step_lengths
    from peftaudit.memory.tracing.model import decoder_layers
    from peftaudit.memory.tracing.run import run_trace

    config = catalog_config(model_id)
    model = build(reduced_config(config, depth) if depth else config)
    watched = [(str(i), layer) for i, layer in enumerate(decoder_layers(model))]
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = run_trace(model, plan, layers=watched, lengths=step_lengths(plan))
    assert traced.events is not None
    return traced, time.perf_counter() - started


def replay_case(model_id: str, depth: int | None, plan: Any) -> dict[str, Any]:
    """Trace ``plan`` on ``model_id`` cut to ``depth`` layers and replay it both ways."""
    traced, seconds = trace_case(model_id, depth, plan)
    return replay_traced(model_id, depth, plan, traced, seconds)


def replay_traced(model_id: str, depth: int | None, plan: Any, traced: Any, trace_s: float) -> dict[str, Any]:
    """:func:`trace_case`'s trace replayed with and without expandable segments: the row the fit reads."""
    from peftaudit.memory.allocator import allocation_events, smallest_capacity
    from peftaudit.memory.allocator.lengths import reserved_over_run
    from peftaudit.memory.allocator.reserve import step_lengths

    started = time.perf_counter()
    events = allocation_events(traced.events)
    row: dict[str, Any] = {
        "model": model_id,
        "depth": depth,
        "method": plan.method,
        "batch": plan.batch_size,
        "seq": plan.seq_len,
        "checkpointing": plan.gradient_checkpointing,
        "lengths": plan.lengths,
        "components": dict(traced.components),
        "saved": sum(traced.activations_per_layer),
        "trace_s": round(trace_s, 1),
    }
    for expandable in (False, True):
        found = smallest_capacity(events, expandable_segments=expandable)
        reserved = found.plentiful.peak_reserved
        if plan.lengths == "varied" and not expandable:
            # What the trace does (tracing/__init__.py, _replayed): a long run's reserve.
            run = reserved_over_run(traced.events, step_lengths(plan), plan.seq_len)
            row["long_run"] = run is not None
            reserved = run or reserved
        row["expandable" if expandable else "segments"] = {
            "allocated": found.plentiful.peak_allocated,
            "reserved": reserved,
            "capacity": found.bytes,
        }
    row["replay_s"] = round(time.perf_counter() - started, 1)
    return row


def plan_for(method: str, batch: int, seq: int, checkpointing: bool, lengths: str) -> Any:
    from peftaudit.memory.plan import TrainingPlan

    return TrainingPlan(
        method=method, batch_size=batch, seq_len=seq, gradient_checkpointing=checkpointing, lengths=lengths
    )


def shape_of(row: dict[str, Any], segments: str) -> str:
    from peftaudit.memory.allocator.reserve import plan_shape

    plan = plan_for(row["method"], row["batch"], row["seq"], row["checkpointing"], row["lengths"])
    return plan_shape(plan.with_(expandable_segments=segments == "expandable"))


def _nnls_on(a: Any, b: Any, cols: tuple[int, ...]) -> list[float] | None:
    """Least squares over ``cols`` only; ``None`` when a coefficient comes out negative."""
    import numpy as np

    coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
    if (coef < 0).any():
        return None
    full = [0.0] * a.shape[1]
    for c, v in zip(cols, coef, strict=True):
        full[c] = float(v)
    return full


def nnls(x: list[list[float]], y: list[float]) -> tuple[list[float], float]:
    """Least squares with non-negative coefficients (the best of every feature subset's own fit),
    and the fit's worst miss. Non-negative: each feature can only add to what the allocator holds."""
    import numpy as np

    a, b = np.array(x), np.array(y)
    best: tuple[float, list[float]] | None = None
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            coef = _nnls_on(a, b, cols)
            if coef is None:
                continue
            residual = b - a @ np.array(coef)
            sse = float(residual @ residual)
            if best is None or sse < best[0]:
                best = (sse, coef)
    coef = best[1] if best is not None else [0.0] * a.shape[1]
    return coef, float(np.abs(b - a @ np.array(coef)).max())


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from peftaudit.memory.allocator.reserve import features

    shapes: dict[str, dict[str, Any]] = {}
    grouped: dict[str, list[tuple[list[float], dict[str, int]]]] = {}
    for row in rows:
        # From the traced components, so a change of FEATURES refits without tracing again.
        x = list(features(row["components"], [row["saved"]]))
        for segments in ("segments", "expandable"):
            grouped.setdefault(shape_of(row, segments), []).append((x, row[segments]))
    for shape, cases in sorted(grouped.items()):
        entry: dict[str, Any] = {"cases": len(cases)}
        for what in ("reserved", "capacity"):
            coef, worst = nnls([f for f, _ in cases], [(r[what] - r["allocated"]) / GIB for _, r in cases])
            entry[what] = [round(c, 6) for c in coef]
            entry[f"{what}_worst_miss_gib"] = round(worst, 4)
        shapes[shape] = entry
    return shapes


def write_factors(shapes: dict[str, Any]) -> None:
    import peft
    import torch
    import transformers

    from peftaudit.memory.allocator.reserve import FEATURES

    data = {
        "_about": "What PyTorch's caching allocator holds above the allocated peak, per plan shape: "
        "coefficients (GiB per GiB) of the features "
        + ", ".join(FEATURES)
        + " for 'reserved' (peak reserved with memory to spare, minus peak allocated) and 'capacity' "
        "(the smallest device memory the step runs in, minus peak allocated). Fitted (non-negative least "
        "squares) to replays of traced steps through peftaudit.memory.allocator; the *_worst_miss_gib "
        "figures are the fit's largest miss over its cases. Written by benchmarks/learn_allocator.py --write.",
        "learned_on": {
            "models": {model_id: list(cuts) for model_id, cuts in MODELS},
            "tokens": [list(t) for t in TOKENS],
            "date": datetime.date.today().isoformat(),
            "stack": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        },
        "shapes": shapes,
    }
    FACTORS.write_text(json.dumps(data, indent=1) + "\n")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in ("model", "depth", "method", "batch", "seq", "checkpointing", "lengths"))


def learn(write: bool, shard: tuple[int, int] = (0, 1)) -> None:
    """Trace and replay every case of the grid not yet in ``allocator_replays.jsonl`` (it is kept
    as it goes, so a stopped run resumes), then fit every case in the file.

    ``shard``: ``(i, n)`` takes every n-th case still to do from the i-th, so n processes share the grid; each
    appends its rows to the file, and the last to finish fits (or run ``--refit`` after)."""
    done = {}
    if REPLAYS.exists():
        done = {_key(r): r for r in map(json.loads, REPLAYS.read_text().splitlines()) if r}
    depths = [(model_id, depth) for model_id, cuts in MODELS for depth in cuts]
    grid = itertools.product(depths, TOKENS, METHODS, (False, True), ("fixed", "varied"))
    pending = [
        (model_id, depth, method, batch, seq, checkpointing, lengths)
        for (model_id, depth), (batch, seq), method, checkpointing, lengths in grid
        if (model_id, depth, method, batch, seq, checkpointing, lengths) not in done
        and not (depth is None and not checkpointing and batch * seq > 4096)
    ]
    for model_id, depth, method, batch, seq, checkpointing, lengths in pending[shard[0] :: shard[1]]:
        row = replay_case(model_id, depth, plan_for(method, batch, seq, checkpointing, lengths))
        print(json.dumps(row), flush=True)
        if write:
            with REPLAYS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if write:
        rows = [json.loads(line) for line in REPLAYS.read_text().splitlines() if line.strip()]
        write_factors(fit(rows))


def check() -> None:
    from peftaudit.memory.allocator.reserve import learned

    print("<!-- .venv/bin/python benchmarks/learn_allocator.py --check -->")
    print("# The learned allocator overheads against replays they were not fitted to\n")
    print(
        "Each row traces a training step of a model the fit did not see (or at a depth it did not see), "
        "replays it through the caching-allocator model, and compares the peak reserved and the smallest "
        "capacity with the allocated peak plus the learned overheads (`factors.json`). Error = learned / "
        "replayed - 1, of the whole figure (allocated included). No CUDA context in any figure.\n"
    )
    print(
        "| model | depth | plan | allocated | reserved: replay / learned | error | capacity: replay / learned | error |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    long_runs: list[str] = []
    for model_id, depth, method, batch, seq, checkpointing, lengths in CHECKS:
        plan = plan_for(method, batch, seq, checkpointing, lengths)
        traced, seconds = trace_case(model_id, depth, plan)
        row = replay_traced(model_id, depth, plan, traced, seconds)
        got = row["segments"]
        overheads = learned(plan, row["components"], [row["saved"]])
        figures = {
            "reserved": got["allocated"] + overheads.reserved,
            "capacity": got["allocated"] + overheads.capacity,
        }
        label = f"{method}, {batch} x {seq}" + (", checkpointing" if checkpointing else "") + f", {lengths}"
        cells = [
            f"{got[w] / GIB:.2f} / {figures[w] / GIB:.2f} GiB | {figures[w] / got[w] - 1:+.1%}"
            for w in ("reserved", "capacity")
        ]
        print(
            f"| {model_id} | {depth or 'all'} | {label} | {got['allocated'] / GIB:.2f} GiB | {cells[0]} | {cells[1]} |",
            flush=True,
        )
        if lengths == "varied":
            run = long_run_capacity(traced, plan)
            long_runs.append(
                f"| {model_id} | {depth or 'all'} | {label} | {got['capacity'] / GIB:.2f} GiB | {run / GIB:.2f} GiB |"
            )
    print(
        "\nThe least capacity of varied lengths is the traced steps' own (1/4, 1/2, 3/4 and all of the length), "
        f"not that of the long run the reserve comes from: against a {CAPACITY_RUN}-step run (seed 0) it is\n"
    )
    print("| model | depth | plan | traced steps | long run |")
    print("| --- | ---: | --- | ---: | ---: |")
    print("\n".join(long_runs))


def long_run_capacity(traced: Any, plan: Any) -> int:
    """The least capacity of a :data:`CAPACITY_RUN`-step run made from ``plan``'s traced steps."""
    from peftaudit.memory.allocator import smallest_capacity
    from peftaudit.memory.allocator.lengths import long_run, run_lengths
    from peftaudit.memory.allocator.reserve import step_lengths

    events = long_run(traced.events, step_lengths(plan), run_lengths(plan.seq_len, CAPACITY_RUN))
    assert events is not None
    return smallest_capacity(events).bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="trace the grid and write factors.json")
    parser.add_argument("--refit", action="store_true", help="fit again from allocator_replays.jsonl")
    parser.add_argument("--check", action="store_true", help="compare the factors with held-out replays")
    parser.add_argument(
        "--shard", default="0/1", help="I/N: trace every N-th case still to do from the I-th (N processes)"
    )
    args = parser.parse_args()
    shard = tuple(int(part) for part in args.shard.split("/"))
    if args.refit:
        rows = [json.loads(line) for line in REPLAYS.read_text().splitlines() if line.strip()]
        write_factors(fit(rows))
    elif args.check:
        check()
    else:
        learn(args.write, (shard[0], shard[1]))


if __name__ == "__main__":
    main()
