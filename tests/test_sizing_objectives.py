"""Sizing under training objectives (issue 16): GRPO's searches, a colocated vLLM's share, the commands.

Every search answer is put back through the estimator itself (``estimate``, not the search's own
``fit``): the value fits and one step more does not. Plans tried must always validate, so GRPO's
completion never swallows its prompt. The model is SmolLM2-135M from the catalog (8,192 positions):
every estimate takes milliseconds once it is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from peftaudit.cli import main
from peftaudit.gpus import catalog, find_gpu
from peftaudit.gpus.sizing import (
    SEQ_STEP,
    fit,
    largest_completion_len,
    largest_fit,
    largest_generation_fit,
    largest_seq_len,
    smallest_setup,
    vllm_bytes,
)
from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate
from peftaudit.sources.base import SourceOptions, resolve

MODEL = "HuggingFaceTB/SmolLM2-135M"
GRPO = TrainingPlan(method="lora", objective="grpo")


@pytest.fixture(autouse=True)
def no_user_gpu_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(tmp_path / "none.toml"))
    catalog.reset()


@pytest.fixture(scope="module")
def inventory():  # type: ignore[no-untyped-def]
    resolved, source = resolve(MODEL)
    return take_inventory(source.build(resolved, SourceOptions()))


def fits(inventory, plan: TrainingPlan, usable: int) -> bool:  # type: ignore[no-untyped-def]
    """The estimator's own answer, the plan validated as the CLI validates it."""
    plan.validate()
    return estimate(inventory, plan).total_bytes <= usable


@pytest.mark.parametrize(
    ("gpu_name", "plan"),
    [
        ("A10G", GRPO),
        ("T4", GRPO.with_(batch_size=2, seq_len=1024, completion_len=256, gradient_checkpointing=True)),
        ("A10G", GRPO.with_(generation="vllm-colocate")),
    ],
)
def test_grpo_generations_and_completion_fit_and_one_step_more_does_not(
    inventory, gpu_name: str, plan: TrainingPlan
) -> None:  # type: ignore[no-untyped-def]
    gpu = find_gpu(gpu_name)
    usable = gpu.usable_bytes - vllm_bytes(plan, gpu)
    found = largest_generation_fit(inventory, plan, gpu)
    prompt = plan.seq_len - plan.completion_len
    assert found.prompt_len == prompt
    g = found.generations.value
    assert g > 0 and not found.generations.capped
    assert fits(inventory, plan.with_(generations=g), usable)
    assert not fits(inventory, plan.with_(generations=g + 1), usable)
    completion = found.completion
    assert completion.value > 0 and completion.value % SEQ_STEP == 0
    at = plan.with_(seq_len=prompt + completion.value, completion_len=completion.value)
    assert fits(inventory, at, usable)
    context = inventory.dims.max_position_embeddings
    assert completion.cap == context - prompt
    if completion.capped:  # the context, not the memory, stopped it
        assert completion.value + SEQ_STEP > context - prompt
    else:
        more = completion.value + SEQ_STEP
        assert not fits(inventory, plan.with_(seq_len=prompt + more, completion_len=more), usable)
    # The fits reported at the maxima are those plans' (the objective's sizes carried in their JSON).
    assert found.at_max_generations.to_dict()["generations"] == g and found.at_max_generations.fits
    assert found.at_max_completion.to_dict()["completion_len"] == completion.value


def test_grpo_completion_search_stops_at_the_context_less_the_prompt(inventory) -> None:  # type: ignore[no-untyped-def]
    """On an H100 a 135M model's completion fills the context: capped at 8,192 less the 1,536-token prompt."""
    found = largest_completion_len(inventory, GRPO.with_(gradient_checkpointing=True), find_gpu("H100"))
    assert (found.value, found.cap, found.cap_reason, found.capped) == (6656, 8192 - 1536, "context", True)
    # A prompt as long as the context leaves no completion to try: none, and no invalid plan.
    none = largest_completion_len(inventory, GRPO.with_(seq_len=8192 + 512), find_gpu("H100"))
    assert (none.value, none.capped) == (0, False)


def test_sequence_search_of_a_grpo_plan_keeps_a_prompt(inventory) -> None:  # type: ignore[no-untyped-def]
    """largest_seq_len keeps GRPO's completion and starts above it (the plans it tries all validate)."""
    gpu = find_gpu("T4")
    found = largest_seq_len(inventory, GRPO, gpu)
    assert found.value > GRPO.completion_len and not found.capped
    assert fits(inventory, GRPO.with_(seq_len=found.value), gpu.usable_bytes)
    assert not fits(inventory, GRPO.with_(seq_len=found.value + SEQ_STEP), gpu.usable_bytes)
    # Where not even the first length above the completion fits: none, and no plan without a prompt tried.
    assert largest_seq_len(inventory, GRPO.with_(generations=64), gpu).value == 0


@pytest.mark.parametrize("fraction", [0.3, 0.55])
def test_vllm_colocated_takes_its_fraction_of_the_gpu_total(inventory, fraction: float) -> None:  # type: ignore[no-untyped-def]
    """vLLM requests ceil(total x gpu_memory_utilization) of the device (vllm/v1/worker/utils.py)."""
    gpu = find_gpu("H100")
    colocated = GRPO.with_(generation="vllm-colocate", vllm_memory=fraction)
    found = fit(inventory, colocated, gpu)
    held = math.ceil(gpu.usable_bytes * fraction)
    assert found.vllm_bytes == held and found.usable_bytes == gpu.usable_bytes - held
    assert found.peak_bytes == estimate(inventory, colocated).total_bytes
    for generation in ("transformers", "vllm-server"):  # generation in the step, or on other GPUs: nothing held
        other = fit(inventory, GRPO.with_(generation=generation), gpu)
        assert (other.usable_bytes, other.vllm_bytes) == (gpu.usable_bytes, 0)
    # The sweeps see it too: the smallest setup is judged against what vLLM leaves.
    assert smallest_setup(inventory, colocated, gpu).usable_bytes == gpu.usable_bytes - held


def test_pairs_objectives_search_batch_and_length(inventory) -> None:  # type: ignore[no-untyped-def]
    """DPO's batch counts pairs: the largest that fits does, one pair more does not."""
    gpu = find_gpu("T4")
    plan = TrainingPlan(method="lora", objective="dpo")
    found = largest_fit(inventory, plan, gpu)
    assert found.to_dict()["batch_counts"] == "pairs"
    assert fits(inventory, plan.with_(batch_size=found.batch.value), gpu.usable_bytes)
    assert not fits(inventory, plan.with_(batch_size=found.batch.value + 1), gpu.usable_bytes)


def test_fit_command_for_grpo(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", MODEL, "--gpu", "A10G", "--objective", "grpo", "--generation", "vllm-colocate"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    a10g = find_gpu("A10G")
    assert data["objective"] == "grpo" and data["vllm_bytes"] == math.ceil(a10g.usable_bytes * 0.3)
    first = data["results"][0]
    assert {"max_generations", "max_completion_len", "at_completion_len", "at_generations", "prompt_len"} <= set(first)
    assert "max_batch_size" not in first
    assert (first["prompts"], first["prompt_len"], first["at_generations"]) == (1, 1536, 8)
    assert first["at_max_generations"]["usable_bytes"] == a10g.usable_bytes - data["vllm_bytes"]
    assert main([*args, "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert f"({a10g.usable_gib:.1f} GiB usable, {data['vllm_bytes'] / 2**30:.1f} GiB of it held by vLLM)" in out
    assert "Max generations" in out and "Max completion" in out and "searched at 1 prompt of 1,536 tokens" in out


def test_fit_command_says_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", MODEL, "--gpu", "T4", "--objective", "orpo", "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert "Max pairs" in out and "at pairs" in out and "ORPO" in out


@pytest.mark.parametrize(
    "objective",
    [
        ["--objective", "dpo"],
        ["--objective", "grpo", "--generation", "vllm-colocate", "--completion-len", "1024"],
        # The reward model is the sequence-classification class: a new trace (about 7 s).
        pytest.param(["--objective", "reward", "--compare", "full,lora"], marks=pytest.mark.slow),
    ],
)
def test_gpus_command_for_objectives(capsys: pytest.CaptureFixture[str], objective: list[str]) -> None:
    assert main(["gpus", MODEL, "--gpu", "T4", "--gpu", "H100", *objective, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = [f for g in data["gpus"] for f in g["fits"]]
    assert rows and all(f["objective"] == objective[1] for f in rows)
    if objective[1] == "grpo":
        # The chart varies the completion after the 1,024-token prompt; the prompt is never swallowed.
        points = data["by_completion_len"]["lora"]
        assert all(p["seq_len"] == 1024 + p["completion_len"] for p in points)
        h100 = find_gpu("H100")
        assert data["gpus"][1]["fits"][0]["usable_bytes"] == h100.usable_bytes - math.ceil(h100.usable_bytes * 0.3)
    else:
        assert "by_seq_len" in data


def test_plan_command_counts_the_sequences_a_step_trains(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", MODEL, "--gpu", "H100", "--tokens", "10M", "--json"]
    assert main([*args, "--objective", "grpo", "--generations", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"][0]["tokens_per_step"] == 4 * 2048
    assert main([*args, "--objective", "dpo", "--batch-size", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"][0]["tokens_per_step"] == 2 * 3 * 2048


def test_recommend_takes_the_objective(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["recommend", MODEL, "--gpu", "T4"]
    assert main([*args, "--objective", "dpo", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["request"]["objective"] == {"objective": "dpo"}
    dpo_peak = data["recommendation"]["peak_bytes"]
    assert dpo_peak == estimate_recommended(data, objective="dpo")
    assert main([*args, "--objective", "grpo", "--generation", "vllm-colocate"]) == 0
    captured = capsys.readouterr()
    assert "vLLM colocated (30% of each GPU)" in captured.out
    t4 = find_gpu("T4")
    left = t4.usable_bytes - math.ceil(t4.usable_bytes * 0.3)
    assert f"budget T4 {left / 2**30:.2f} GiB" in captured.out
    assert "vLLM colocated holds" in captured.err
    # Without --objective the request carries no objective key (the golden files pin the rest).
    assert main([*args, "--format", "json"]) == 0
    assert "objective" not in json.loads(capsys.readouterr().out)["request"]


def estimate_recommended(data: dict, objective: str) -> int:  # type: ignore[type-arg]
    """The peak the estimator gives the recommended LoRA under ``objective`` (as recommend builds its plan)."""
    resolved, source = resolve(MODEL)
    inv = take_inventory(source.build(resolved, SourceOptions()))
    config = data["recommendation"]["lora_config"]
    plan = TrainingPlan(
        method="lora",
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        dropout=config["lora_dropout"],
        targets=tuple(config["target_modules"]),
        objective=objective,
        gradient_checkpointing=data["budget"]["gradient_checkpointing"],
    )
    return int(estimate(inv, plan).total_bytes)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["fit", MODEL, "--gpu", "T4"], "--vllm-memory applies to vllm-colocate generation only"),
        (["gpus", MODEL, "--gpu", "T4"], "--vllm-memory applies to vllm-colocate generation only"),
        (["recommend", MODEL, "--gpu", "T4"], "--vllm-memory applies to vllm-colocate generation only"),
    ],
)
def test_vllm_memory_without_colocated_vllm_is_refused(
    capsys: pytest.CaptureFixture[str], command: list[str], message: str
) -> None:
    assert main([*command, "--objective", "grpo", "--vllm-memory", "0.4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"peftaudit: error: {message}"]


def test_recommend_refuses_a_completion_that_leaves_no_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["recommend", MODEL, "--objective", "grpo", "--seq-len", "512", "--completion-len", "512"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("peftaudit: error: completion length 512 leaves no prompt in seq-len 512")
