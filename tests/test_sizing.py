"""GPU sizing: searches that are exact at their edge, setups that are minimal, costs from FLOPs.

Published measurements (shared/reference/measured-memory.md) must land on the
right side of each GPU's usable memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftaudit.cli import main
from peftaudit.gpus import catalog, find_gpu, gpus
from peftaudit.gpus.sizing import (
    GPU_COUNTS,
    SCALE_OUT,
    SEQ_STEP,
    fit,
    max_batch_size,
    max_seq_len,
    run_cost,
    smallest_setup,
    training_flops_per_token,
)
from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan
from peftaudit.sources.base import SourceOptions, resolve


@pytest.fixture(autouse=True)
def no_user_gpu_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(tmp_path / "none.toml"))
    catalog.reset()


_INVENTORIES: dict[str, object] = {}


def inventory(model_id: str):  # type: ignore[no-untyped-def]
    if model_id not in _INVENTORIES:
        resolved, source = resolve(model_id)
        _INVENTORIES[model_id] = take_inventory(source.build(resolved, SourceOptions()))
    return _INVENTORIES[model_id]


CASES = [
    ("meta-llama/Llama-3.1-8B", "RTX 4090", TrainingPlan(method="lora")),
    ("meta-llama/Llama-3.1-8B", "H100", TrainingPlan(method="qlora", gradient_checkpointing=True)),
    ("Qwen/Qwen2.5-7B", "L40S", TrainingPlan(method="lora", seq_len=1024)),
    ("HuggingFaceTB/SmolLM2-1.7B", "T4", TrainingPlan(method="full", precision="fp16-mixed")),
]


@pytest.mark.parametrize(("model_id", "gpu_name", "plan"), CASES)
def test_max_batch_fits_and_one_more_does_not(model_id: str, gpu_name: str, plan: TrainingPlan) -> None:
    inv, gpu = inventory(model_id), find_gpu(gpu_name)
    best = max_batch_size(inv, plan, gpu)
    if best:
        assert fit(inv, plan.with_(batch_size=best), gpu).fits
    assert not fit(inv, plan.with_(batch_size=best + 1), gpu).fits


@pytest.mark.parametrize(("model_id", "gpu_name", "plan"), CASES)
def test_max_seq_len_fits_and_one_step_more_does_not(model_id: str, gpu_name: str, plan: TrainingPlan) -> None:
    inv, gpu = inventory(model_id), find_gpu(gpu_name)
    best = max_seq_len(inv, plan, gpu)
    assert best % SEQ_STEP == 0
    if best:
        assert fit(inv, plan.with_(seq_len=best), gpu).fits
    context = inv.dims.max_position_embeddings
    if best + SEQ_STEP <= context:
        assert not fit(inv, plan.with_(seq_len=best + SEQ_STEP), gpu).fits


def test_checkpointing_buys_context() -> None:
    inv, gpu = inventory("meta-llama/Llama-3.1-8B"), find_gpu("RTX 4090")
    plain = max_seq_len(inv, TrainingPlan(method="lora"), gpu)
    checkpointed = max_seq_len(inv, TrainingPlan(method="lora", gradient_checkpointing=True), gpu)
    assert checkpointed > 2 * plain


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_smallest_setup_is_minimal(method: str) -> None:
    inv, gpu = inventory("Qwen/Qwen2.5-32B"), find_gpu("A100 80GB")
    plan = TrainingPlan(method=method)
    best = smallest_setup(inv, plan, gpu)
    assert best.fits
    assert fit(
        inv,
        plan.with_(
            gpus=best.gpus,
            sharding=best.sharding,
            offload=best.offload,
            gradient_checkpointing=best.gradient_checkpointing,
        ),
        gpu,
    ).fits
    # Nothing with fewer GPUs fits, in any way the search tries, checkpointing or not.
    for gc in (False, True):
        if best.gpus > 1:
            assert not fit(inv, plan.with_(gradient_checkpointing=gc), gpu).fits
        for count in (c for c in GPU_COUNTS if c < best.gpus):
            for sharding, offload in SCALE_OUT:
                candidate = plan.with_(gpus=count, sharding=sharding, offload=offload, gradient_checkpointing=gc)
                assert not fit(inv, candidate, gpu).fits


def test_checkpointing_is_tried_before_more_gpus() -> None:
    inv, gpu = inventory("meta-llama/Llama-3.1-8B"), find_gpu("RTX 4090")
    plan = TrainingPlan(method="qlora", seq_len=4096)
    assert not fit(inv, plan, gpu).fits
    best = smallest_setup(inv, plan, gpu)
    assert (best.gpus, best.gradient_checkpointing, best.fits) == (1, True, True)
    assert best.setup() == "1x + grad. ckpt"


def test_plan_costs_the_setup_it_chose() -> None:
    """Issue 11 item 14: a setup that switched checkpointing on pays for the recompute."""
    inv, gpu = inventory("meta-llama/Llama-3.1-8B"), find_gpu("RTX 4090")
    plan = TrainingPlan(method="lora")
    chosen = smallest_setup(inv, plan, gpu)
    assert chosen.gradient_checkpointing and not plan.gradient_checkpointing
    sized = chosen.applied_to(plan)
    assert (sized.gpus, sized.sharding, sized.offload, sized.gradient_checkpointing) == (
        chosen.gpus,
        chosen.sharding,
        chosen.offload,
        True,
    )
    assert fit(inv, sized, gpu).peak_bytes == chosen.peak_bytes  # the plan is the setup that was sized
    ran, skipped = run_cost(inv, sized, gpu, tokens=10**6), run_cost(inv, plan, gpu, tokens=10**6)
    # Frozen base: 2 forwards (+ adapters) without the recompute, 3 with it.
    assert 1.45 < ran.flops_per_token / skipped.flops_per_token < 1.5


# Published measurements with the plans that reproduce their setups, shared with the estimator's calibration.
MEASUREMENTS = json.loads((Path(__file__).parent / "memory" / "data" / "measurements.json").read_text())
UNITS = {"GiB": 2**30, "GB": 10**9}


def _measured_inventory(model: str):  # type: ignore[no-untyped-def]
    from peftaudit.sources.build import build_from_config

    key = f"measured:{model}"
    if key not in _INVENTORIES:
        config = MEASUREMENTS["models"][model]["config"]
        _INVENTORIES[key] = take_inventory(build_from_config(config, model_id=model))
    return _INVENTORIES[key]


@pytest.mark.parametrize("peak", MEASUREMENTS["peaks"], ids=[p["id"] for p in MEASUREMENTS["peaks"]])
def test_published_measurements_fall_on_the_right_side_of_each_gpu(peak: dict[str, object]) -> None:
    inv = _measured_inventory(str(peak["model"]))
    plan = TrainingPlan.from_dict(dict(peak["plan"]))  # type: ignore[arg-type]
    measured = float(peak["measured"]) * UNITS[str(peak["unit"])]  # type: ignore[arg-type]
    checked = 0
    for gpu in gpus():
        # Only GPUs clearly above or below the measurement (20 % either way) are decisive.
        if measured < 0.8 * gpu.usable_bytes:
            assert fit(inv, plan, gpu).fits, f"{gpu.name}: measured {peak['measured']} {peak['unit']} fits, we say no"
            checked += 1
        elif measured > 1.2 * gpu.usable_bytes:
            assert not fit(inv, plan, gpu).fits, f"{gpu.name}: measured {peak['measured']} does not fit, we say it does"
            checked += 1
    assert checked >= 10


def test_flops_follow_the_6n_rule_and_its_peft_variants() -> None:
    inv = inventory("meta-llama/Llama-2-7b-hf")
    # 6N, with N the published 6,738,415,616 less the 131,072,000-element input-embedding lookup (no matmul).
    six_n = 6 * (6_738_415_616 - 131_072_000)
    short = training_flops_per_token(inv, TrainingPlan(method="full", seq_len=128))
    assert six_n < short < 1.01 * six_n
    # Attention adds 12 x layers x hidden x seq per token (Narayanan et al. 2021): linear in seq.
    full = training_flops_per_token(inv, TrainingPlan(method="full", seq_len=2048))
    longer = training_flops_per_token(inv, TrainingPlan(method="full", seq_len=4096))
    assert longer - full == 12 * 32 * 4096 * 2048
    lora = training_flops_per_token(inv, TrainingPlan(method="lora", seq_len=2048))
    assert 0.66 * full < lora < 0.68 * full  # frozen base: no weight gradients
    recompute = training_flops_per_token(inv, TrainingPlan(method="full", seq_len=2048, gradient_checkpointing=True))
    assert recompute == pytest.approx(full * 4 / 3)


def test_run_cost_scales_with_gpus_mfu_and_price() -> None:
    inv, gpu = inventory("meta-llama/Llama-3.1-8B"), find_gpu("H100")
    one = run_cost(inv, TrainingPlan(method="lora"), gpu, tokens=10**9, mfu=0.4, price_per_gpu_hour=2.0)
    eight = run_cost(
        inv, TrainingPlan(method="lora", gpus=8, sharding="ddp"), gpu, tokens=10**9, mfu=0.4, price_per_gpu_hour=2.0
    )
    assert eight.seconds == pytest.approx(one.seconds / 8)
    assert eight.cost == pytest.approx(one.cost)  # same GPU-hours
    half = run_cost(inv, TrainingPlan(method="lora"), gpu, tokens=10**9, mfu=0.2)
    assert half.seconds == pytest.approx(2 * one.seconds) and half.cost is None
    assert one.seconds == pytest.approx(one.total_flops / (989e12 * 0.4))


def test_a_gpu_without_bf16_points_to_fp16() -> None:
    from peftaudit.errors import PeftauditError

    inv, t4 = inventory("meta-llama/Llama-3.2-1B"), find_gpu("T4")
    with pytest.raises(PeftauditError, match=r"T4 has no published dense bf16 throughput.*--precision fp16-mixed"):
        run_cost(inv, TrainingPlan(), t4, tokens=1000)
    cost = run_cost(inv, TrainingPlan(precision="fp16-mixed"), t4, tokens=1000)
    assert cost.dtype == "fp16" and cost.peak_tflops == 65


def test_no_throughput_no_time() -> None:
    from peftaudit.errors import PeftauditError

    with pytest.raises(PeftauditError, match="A10G has no published dense bf16 throughput"):
        run_cost(inventory("meta-llama/Llama-3.1-8B"), TrainingPlan(), find_gpu("A10G"), tokens=1000)


def test_cli_gpus_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "sizing.svg"
    code = main(
        [
            "gpus",
            "meta-llama/Llama-3.1-8B",
            "--gpu",
            "H100",
            "--gpu",
            "L4",
            "--compare",
            "lora,qlora",
            "--json",
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["gpu"] for row in data["gpus"]] == ["H100 SXM", "L4"]
    h100_lora = data["gpus"][0]["fits"][0]
    assert h100_lora["fits"] and h100_lora["gpus"] == 1 and h100_lora["method"] == "lora"
    assert plot.read_text().startswith("<svg") and "H100 SXM" in plot.read_text()


def test_png_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sizing.png"
    assert main(["gpus", "Qwen/Qwen2.5-0.5B", "--gpu", "T4", "--compare", "full,qlora", "--plot", str(plot)]) == 0
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_fit_and_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "meta-llama/Llama-3.1-8B", "--gpu", "RTX4090", "--method", "lora", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["gradient_checkpointing"] for r in results] == [False, True]
    assert results[1]["max_seq_len"] > results[0]["max_seq_len"]
    assert all(r["at_max_seq"]["fits"] for r in results if r["max_seq_len"])
    assert (
        main(["plan", "meta-llama/Llama-3.1-8B", "--tokens", "20M", "--gpu", "H100", "--price", "2.5", "--json"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)["plans"][0]
    assert plan["setup"]["fits"] and plan["run"]["cost"] == pytest.approx(plan["run"]["gpu_hours"] * 2.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "gpt2", "--gpu", "H1000"], "unknown GPU 'H1000'"),
        (["plan", "gpt2", "--gpu", "H100", "--tokens", "lots"], "cannot read token count 'lots'"),
        (["plan", "gpt2", "--gpu", "H100", "--tokens", "1M", "--mfu", "2"], "--mfu must be between 0 and 1"),
        (["gpus", "gpt2", "--gpu", "H100", "--plot", "chart.gif"], "--plot writes .svg or .png"),
        (["gpus", "gpt2", "--max-gpus", "0"], "--max-gpus must be at least 1"),
    ],
)
def test_cli_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fit_and_gpus_skip_checkpointing_a_method_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    """peft refuses prefix tuning with gradient checkpointing (ValueError in _setup_prompt_encoder): the
    searches size it without, and say once why checkpointing was not tried."""
    assert main(["fit", "gpt2", "--gpu", "H100", "--method", "prefix-tuning", "--seq-len", "512", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["gradient_checkpointing"]) for r in data["results"]] == [("prefix-tuning", False)]
    (note,) = data["notes"]
    assert note.startswith("prefix-tuning: gradient checkpointing not tried (peft's prefix tuning does not work")
    # At a batch one GPU does not hold, every setup (GPU counts, sharding) is tried without checkpointing.
    args = ["gpus", "gpt2", "--method", "prefix-tuning", "--gpu", "T4", "--batch-size", "64", "--seq-len", "1024"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (found,) = data["gpus"][0]["fits"]
    assert not found["fits"] and not found["gradient_checkpointing"]
    assert data["notes"] == [note]
    assert main(args) == 0
    assert "prefix-tuning: gradient checkpointing not tried" in capsys.readouterr().out
    assert main(["plan", "gpt2", "--gpu", "T4", "--method", "prefix-tuning", *args[-4:], "--tokens", "1M"]) == 2
    assert "; gradient checkpointing not tried (peft's prefix tuning" in capsys.readouterr().err
    # Asked for outright, it is refused as before: one line, exit 2.
    assert main([*args, "--gradient-checkpointing"]) == 2
    assert "does not work with gradient checkpointing" in capsys.readouterr().err


def test_sizing_skips_checkpointing_a_model_refuses() -> None:
    """transformers cannot checkpoint ConvNeXt: its setups are searched without checkpointing."""
    from peftaudit.gpus.sizing import checkpointing_notes, checkpointing_skipped
    from peftaudit.memory import PlanError, estimate
    from peftaudit.memory.checkpointing import CheckpointingRefused

    inv = inventory("facebook/convnext-base-224")
    plan = TrainingPlan(method="lora", batch_size=1024)
    assert "ConvNextForImageClassification does not support" in (checkpointing_skipped(inv, plan) or "")
    note = f"lora: gradient checkpointing not tried ({checkpointing_skipped(inv, plan)})"
    assert checkpointing_notes(inv, [plan, plan.with_(rank=4)]) == [note]
    with pytest.raises(CheckpointingRefused) as refused:
        estimate(inv, plan.with_(gradient_checkpointing=True))
    assert isinstance(refused.value, PlanError)
    best = smallest_setup(inv, plan, find_gpu("T4"), max_gpus=2)
    assert not best.gradient_checkpointing and best.gpus in (1, 2)
    assert checkpointing_skipped(inventory("gpt2"), TrainingPlan(method="lora")) is None
