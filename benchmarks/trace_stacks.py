"""Traced peaks of small models under the installed software stack: the oracle for old stacks (issue 14).

Runs the fake-tensor trace (``peftaudit.memory.trace``: one real training step of the real
transformers and peft code, on fake tensors) for a fixed list of cases, 2-layer copies of
catalog models under LoRA, QLoRA with gradient checkpointing and full fine-tuning, in
the current interpreter, and prints one JSON row per case: the case, the stack (torch,
transformers, peft, bitsandbytes versions), the allocated peak and what was alive at it
by category. ``--write`` merges the rows into ``tests/memory/data/stack_traces.json`` (rows of other
stacks are kept; this stack's are replaced), so the file holds every stack's peaks and CI
can check a ``--stack``-aware estimate against them without installing old versions.
``--table`` prints the file's comparison table, the one in ``benchmarks/results/stack_traces.md``
(whose findings are written by hand).

Each old stack lives in its own scratch venv outside the repository (peftaudit itself
requires transformers 5; the trace runs on the old releases through
``peftaudit/memory/tracing/compat.py``). The commands that made the recorded data::

    # transformers 4.44.2 + peft 0.12.0 (LLaMA-Factory's 2024 pins: transformers<=4.43.4/4.44, peft<=0.12.0)
    python3.11 -m venv /work/scratch/stack-tf444
    /work/scratch/stack-tf444/bin/pip install torch==2.13.0          # the CPU wheel on disk
    /work/scratch/stack-tf444/bin/pip install transformers==4.44.2 peft==0.12.0 accelerate \\
        bitsandbytes rich pluggy xxhash pyyaml
    /work/scratch/stack-tf444/bin/pip install --no-deps -e .
    /work/scratch/stack-tf444/bin/python benchmarks/trace_stacks.py --write

    # transformers 4.51.3 + peft 0.15.2 (LLaMA-Factory 0.9.3's range)
    python3.11 -m venv /work/scratch/stack-tf451   # then the same, with
    #   transformers==4.51.3 peft==0.15.2
    /work/scratch/stack-tf451/bin/python benchmarks/trace_stacks.py --write

    # transformers 4.57.6 + peft 0.17.1 (the last 4.x release)
    python3.11 -m venv /work/scratch/stack-tf457   # then the same, with
    #   transformers==4.57.6 peft==0.17.1
    /work/scratch/stack-tf457/bin/python benchmarks/trace_stacks.py --write

    # the project's own stack (transformers 5, peft 0.17+)
    .venv/bin/python benchmarks/trace_stacks.py --write
    .venv/bin/python benchmarks/trace_stacks.py --table   # paste into benchmarks/results/stack_traces.md

``--case NAME`` (repeatable) runs only those cases; ``--out PATH`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "memory" / "data" / "stack_traces.json"
CATALOG = ROOT / "peftaudit" / "catalog" / "models"

#: Layers kept of each model: two decoder layers show every per-layer difference, and the
#: embedding, head and loss are whole.
LAYERS = 2

#: Catalog models traced (their configs, with sources, are the catalog entries').
MODELS = {
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "gemma2-9b": "google/gemma-2-9b",
}

#: Plan shapes: LoRA on all linear layers in bf16, QLoRA (nf4, double quantization) with
#: gradient checkpointing, full fine-tuning in bf16 with AdamW.
PLANS: dict[str, dict[str, Any]] = {
    "lora-bf16": {"method": "lora"},
    "qlora-gc": {"method": "qlora", "gradient_checkpointing": True},
    "full-bf16": {"method": "full"},
}


@dataclass(frozen=True)
class Case:
    """One traced case: a catalog model cut to :data:`LAYERS` layers and a plan."""

    name: str
    model: str
    plan: dict[str, Any] = field(default_factory=dict)


def _cases() -> list[Case]:
    cases = []
    for short, model_id in MODELS.items():
        # Gemma 2's soft-capped attention runs eager (transformers refuses SDPA with soft-capping
        # in 5.x and defaulted Gemma 2 to eager in 4.4x).
        attention = {"attention": "eager"} if short.startswith("gemma2") else {}
        for plan_name, fields in PLANS.items():
            lengths = (1024, 4096) if plan_name == "lora-bf16" else (4096,) if plan_name == "qlora-gc" else (1024,)
            for seq in lengths:
                plan = {**fields, **attention, "batch_size": 1, "seq_len": seq}
                cases.append(Case(f"{short}/{plan_name}/s{seq}", model_id, plan))
    # Eager attention: the default of the older releases for some models, one case to compare paths.
    eager = {"method": "lora", "attention": "eager", "batch_size": 1, "seq_len": 1024}
    cases.append(Case("llama3-8b/lora-bf16-eager/s1024", MODELS["llama3-8b"], eager))
    # DoRA (LoRA with use_dora=True): its forward rebuilds the weight norm, differently across peft releases.
    dora = {"method": "dora", "batch_size": 1, "seq_len": 1024}
    cases.append(Case("llama3-8b/dora-bf16/s1024", MODELS["llama3-8b"], dora))
    # Gemma 2 with SDPA, what transformers before 5.21 runs by default (soft-capping dropped).
    sdpa = {"method": "lora", "attention": "sdpa", "batch_size": 1, "seq_len": 4096}
    cases.append(Case("gemma2-9b/lora-bf16-sdpa/s4096", MODELS["gemma2-9b"], sdpa))
    return cases


CASES = _cases()


def model_config(model_id: str) -> dict[str, Any]:
    """The catalog entry's config, cut to :data:`LAYERS` decoder layers."""
    entry = json.loads((CATALOG / (model_id.replace("/", "__") + ".json")).read_text())
    config = dict(entry["config"])
    config["num_hidden_layers"] = min(int(config["num_hidden_layers"]), LAYERS)
    return config


def build(config: dict[str, Any]) -> Any:
    """The causal LM on the meta device in bf16, under whichever transformers is installed."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, AutoModelForCausalLM

    drop = ("model_type", "architectures", "torch_dtype", "dtype")
    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k not in drop})
    # ``torch_dtype`` became ``dtype`` in transformers 4.56 (the old name warns in 5.x).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, **{key: torch.bfloat16})


def stack() -> dict[str, str]:
    """The installed versions that decide the traced step."""
    import peft
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:  # pragma: no cover - only QLoRA cases need it
        pass
    return versions


def stack_label(versions: dict[str, str]) -> str:
    return f"transformers=={versions['transformers']},peft=={versions['peft']}"


def run_case(case: Case) -> dict[str, Any]:
    """Trace one case under the installed stack: one JSON row."""
    from peftaudit.memory import TrainingPlan, trace

    plan = TrainingPlan(**case.plan)
    config = model_config(case.model)
    model = build(config)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trace(model, plan)
    components = {k: v for k, v in result.components.items() if k not in ("cuda_context", "allocator_margin")}
    versions = stack()
    return {
        "case": case.name,
        "stack": stack_label(versions),
        "versions": versions,
        "peak_allocated_bytes": result.allocated_bytes,
        "at_peak": {k: v for k, v in components.items() if v},
        "peak_phase": result.peak_phase,
        "phase_peaks": dict(result.phase_peaks),
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "notes": [w.message for w in result.warnings],
        "seconds": round(time.perf_counter() - started, 1),
    }


def merge(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` into the data file, replacing this stack's earlier rows of the same cases."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["about"] = (
        "Fake-tensor traced peaks (peftaudit.memory.trace) of 2-layer copies of catalog models, "
        "under several transformers/peft releases; regenerate with benchmarks/trace_stacks.py "
        "(its docstring has the command lines for each scratch environment)."
    )
    data["layers"] = LAYERS
    data["cases"] = {c.name: {"model": c.model, "plan": c.plan} for c in CASES}
    done = {(r["stack"], r["case"]) for r in rows}
    kept = [r for r in data.get("rows", []) if (r["stack"], r["case"]) not in done]
    # Timings vary run to run: printed, not recorded (regenerating an unchanged stack changes nothing).
    new = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    data["rows"] = sorted(kept + new, key=lambda r: (r["case"], r["versions"]["transformers"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def table(path: Path) -> str:
    """A markdown comparison of the recorded peaks: one row per case, one column per stack.

    Columns are named ``transformers / peft`` versions; the last stack (the newest) is the reference.
    """
    data = json.loads(path.read_text())
    rows = data["rows"]
    stacks = sorted({r["stack"] for r in rows}, key=lambda s: _version_key(s))
    current = stacks[-1]
    by = {(r["case"], r["stack"]): r for r in rows}
    mib = 1024 * 1024
    short = {s: " / ".join(part.split("==")[1] for part in s.split(",")) for s in stacks}
    head = ["case", *(f"{short[s]} (MiB)" for s in stacks), *(f"{short[s]} vs {short[current]}" for s in stacks[:-1])]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for case in data["cases"]:
        peaks = [by.get((case, s), {}).get("peak_allocated_bytes") for s in stacks]
        cells = [case, *(f"{p / mib:,.1f}" if p else "—" for p in peaks)]
        ref = peaks[-1]
        cells += [f"{p / ref - 1:+.1%}" if p and ref else "—" for p in peaks[:-1]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version_key(label: str) -> tuple[int, ...]:
    version = label.split(",")[0].split("==")[1]
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="run only this case (repeatable)")
    parser.add_argument("--write", action="store_true", help="merge the rows into --out")
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--table", action="store_true", help="print the markdown comparison of --out")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    names = {c.name for c in CASES}
    unknown = sorted(set(args.case or ()) - names)
    if unknown:
        print(f"unknown case {unknown[0]!r}; cases: {', '.join(sorted(names))}", file=sys.stderr)
        return 2
    rows = []
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        try:
            row = run_case(case)
        except ValueError as exc:  # a release the case cannot run on: no row
            print(f"{case.name}: not traced under this stack: {exc}", file=sys.stderr)
            continue
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.write:  # row by row: a long run keeps what it has done
            merge(args.out, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
