"""Calibration: estimated peaks (CUDA context and allocator margin included) against published measurements.

The numbers and their sources are in ``data/measurements.json``; each must land
within 15 %. ``benchmarks/results/gpu_memory.json``, written by
``benchmarks/gpu_memory_check.py`` on a machine with an NVIDIA GPU, is read too
when it exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftaudit.memory import TrainingPlan, estimate

TOLERANCE = 0.15
UNITS = {"GiB": 2**30, "GB": 1e9}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu_memory.json"


def _entries(measurements: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return list(measurements[kind])


def _plan(entry: dict[str, Any]) -> TrainingPlan:
    fields = dict(entry["plan"])
    if isinstance(fields.get("targets"), list):
        fields["targets"] = tuple(fields["targets"])
    return TrainingPlan(**fields)


@pytest.mark.parametrize("index", range(5))
def test_published_peaks(inventory_of, measurements: dict[str, Any], index: int) -> None:
    entry = _entries(measurements, "peaks")[index]
    model = measurements["models"][entry["model"]]["config"]
    e = estimate(inventory_of(model), _plan(entry))
    measured = entry["measured"] * UNITS[entry["unit"]]
    assert abs(e.total_bytes / measured - 1) <= TOLERANCE, (entry["id"], e.total_bytes / UNITS[entry["unit"]])


@pytest.mark.parametrize("index", range(2))
def test_published_allocated_after_the_step(inventory_of, measurements: dict[str, Any], index: int) -> None:
    """PEFT logs allocated memory right after optimizer.step(): weights, gradients and optimizer states."""
    entry = _entries(measurements, "static")[index]
    model = measurements["models"][entry["model"]]["config"]
    e = estimate(inventory_of(model), _plan(entry))
    # At the optimizer step (foreach AdamW) the same tensors are alive plus the step's scratch.
    after_step = e.phase_peaks["optimizer step"] - _scratch(e)
    measured = entry["measured"] * UNITS[entry["unit"]]
    assert abs(after_step / measured - 1) <= TOLERANCE, (entry["id"], after_step / 1e9)


def _scratch(e: Any) -> int:
    # The foreach step's temporaries are freed by the time PEFT logs memory_allocated().
    from peftaudit.memory.optimizers import TrainableTensor, optimizer_memory

    plan = TrainingPlan.from_dict(e.plan)
    if plan.optimizer_impl == "fused":
        return 0
    dtype = plan.weight_dtype if plan.method == "full" else "fp32"
    trainable = [TrainableTensor((e.trainable_params,), dtype)]
    return optimizer_memory(plan.optimizer, plan.optimizer_impl, trainable).step_temporaries


@pytest.mark.parametrize("index", range(5))
def test_published_simulated_peaks(inventory_of, measurements: dict[str, Any], index: int) -> None:
    """The fake-tensor trace numbers in measured-memory.md (allocated only, no context or margin)."""
    entry = _entries(measurements, "simulated")[index]
    model = measurements["models"][entry["model"]]["config"]
    plan = _plan(entry)
    e = estimate(inventory_of(model), plan)
    allocated = e.allocated_bytes
    if entry.get("cpu_dropout_masks"):
        # That trace ran CPU dropout, whose mask is a float tensor of the input's dtype (fp32 here,
        # peft casts the input to the fp32 adapter dtype) instead of CUDA's bool mask: 3 more bytes
        # per element of each adapted input that needs a gradient (q, k, v from the second layer
        # on, o in every layer).
        hidden, layers = model["hidden_size"], model["num_hidden_layers"]
        allocated += 3 * plan.tokens * hidden * (3 * (layers - 1) + layers)
    measured = entry["measured"] * UNITS[entry["unit"]]
    assert abs(allocated / measured - 1) <= TOLERANCE, (entry["id"], allocated / 2**30)


def test_gpu_check_results(inventory_of) -> None:
    """Real-GPU measurements recorded by benchmarks/gpu_memory_check.py, when a GPU run has been done."""
    if not RESULTS.exists():
        pytest.skip("no GPU measurements recorded yet (run benchmarks/gpu_memory_check.py on an NVIDIA GPU)")
    results = json.loads(RESULTS.read_text())
    assert results["runs"], "the results file has no runs"
    for run in results["runs"]:
        plan = TrainingPlan.from_dict(run["plan"])
        e = estimate(inventory_of(run["config"]), plan)
        measured = run["max_memory_reserved"] + run["cuda_context_bytes"]
        assert abs(e.total_bytes / measured - 1) <= TOLERANCE, run["name"]


# --- every published figure says what it measured, on what (issue 14 part 5) ----------------------------------------

KINDS = {
    "max_memory_allocated",
    "max_memory_reserved",
    "memory_reserved_after_step_p99",
    "nvidia-smi",
    "fits_in_capacity",
    "memory_allocated_after_step",
    "unknown",
}
GPU_ROWS = ("peaks", "static", "published")
CATALOG = Path(__file__).resolve().parents[2] / "peftaudit" / "catalog" / "models"


def _gpu_rows(measurements: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for group in GPU_ROWS for row in measurements[group]]


def test_every_gpu_figure_names_its_stack_gpu_counter_and_settings(measurements: dict[str, Any]) -> None:
    rows = _gpu_rows(measurements)
    assert len(measurements["published"]) >= 20
    assert len({row["id"] for row in rows}) == len(rows), "row ids must be unique"
    for row in rows:
        where = row["id"]
        assert row["url"].startswith("https://"), where
        assert row["gpu"] and row["stack_basis"] and row["measured_what"], where
        assert row["measured_kind"] in KINDS, where
        assert row["unit"] in ("B", "MiB", "GiB", "GB") and row["measured"] > 0, where
        assert {"transformers", "peft", "bitsandbytes", "torch"} <= set(row["stack"]), where
        assert isinstance(row["stack_known"], bool) and isinstance(row["settings_known"], bool), where
        if row["stack_known"]:
            # A known stack names the transformers and peft releases, not a range or "unknown".
            assert all(row["stack"][p][0].isdigit() for p in ("transformers", "peft")), where
        if not row["settings_known"]:
            assert row.get("settings_note"), f"{where}: say which settings are unknown"
        model = row["model"]
        if "/" in model:
            assert (CATALOG / f"{model.replace('/', '__')}.json").exists(), where
        else:
            assert model in measurements["models"], where
        TrainingPlan.from_dict(dict(row["plan"])).validate()
    for row in measurements["published"]:
        assert str(row["figure"]).strip(), f"{row['id']}: quote the figure as printed"


def test_the_existing_figures_keep_their_meaning(measurements: dict[str, Any]) -> None:
    """The fields added for calibration describe the old rows; the numbers and plans stay as they were."""
    peaks = {row["id"]: row for row in measurements["peaks"]}
    assert peaks["peft-metamathqa-lora32-qv"]["measured"] == 22.27
    assert peaks["peft-metamathqa-lora32-qv"]["measured_kind"] == "max_memory_reserved"
    assert peaks["llamafactory-lora16-hf"]["measured"] == 18 and peaks["llamafactory-lora16-hf"]["unit"] == "GiB"
    static = {row["id"]: row for row in measurements["static"]}
    assert static["peft-metamathqa-full-allocated"]["measured_kind"] == "memory_allocated_after_step"


@pytest.mark.slow
def test_published_max_allocated_with_known_stack_and_settings(measurements: dict[str, Any]) -> None:
    """fms-acceleration's max_memory_allocated figures (A100, transformers 4.48.1 pinned) within 15 %, stack named.

    Mixtral QLoRA only lands with its stack: transformers 4.x quantizes each expert's nn.Linear.
    """
    from dataclasses import fields

    from peftaudit.inventory import take_inventory
    from peftaudit.sources.base import SourceOptions, resolve

    rows = [
        row
        for row in measurements["published"]
        if row["measured_kind"] == "max_memory_allocated" and row["stack_known"] and row["settings_known"]
    ]
    assert len(rows) >= 8
    # One row per model and method (batch 4, one GPU) keeps this cheap; benchmarks/calibration.py runs them all.
    rows = [row for row in rows if row["id"].endswith("-bs4-allocated")]
    assert len(rows) == 4
    takes_stack = "stack" in {f.name for f in fields(TrainingPlan)}
    inventories: dict[str, Any] = {}
    for row in rows:
        if row["model"] not in inventories:
            resolved, source = resolve(row["model"])
            inventories[row["model"]] = take_inventory(source.build(resolved, SourceOptions()))
        plan = dict(row["plan"])
        if takes_stack:
            plan["stack"] = {p: row["stack"][p] for p in ("transformers", "peft", "bitsandbytes", "torch")}
        e = estimate(inventories[row["model"]], TrainingPlan.from_dict(plan))
        measured = row["measured"] * {"B": 1, "GB": 1e9, "GiB": 2**30, "MiB": 2**20}[row["unit"]]
        assert abs(e.allocated_bytes / measured - 1) <= TOLERANCE, (row["id"], e.allocated_bytes / 1e9)
