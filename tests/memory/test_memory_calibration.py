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
