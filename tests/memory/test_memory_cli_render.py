"""CLI flags -> plans, and the rendered table, chart and Markdown (which only read estimates)."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys

import pytest

from peftaudit.memory import PlanError, TrainingPlan, estimate
from peftaudit.memory.cli import ALL_PLAN_FLAGS, add_arguments, plans_from_args, wants_trace
from peftaudit.memory.render import estimates_markdown, render_estimates


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_arguments(parser)
    return parser.parse_args(["some/model", *argv])


def test_no_estimator_flag_gives_no_plans() -> None:
    assert plans_from_args(_parse()) == []


def test_issue_examples_parse_into_plans() -> None:
    (plan,) = plans_from_args(
        _parse(
            "--method",
            "qlora",
            "--rank",
            "16",
            "--targets",
            "all-linear",
            "--batch-size",
            "4",
            "--seq-len",
            "2048",
            "--gradient-checkpointing",
            "--optimizer",
            "paged_adamw_8bit",
        )
    )
    assert plan == TrainingPlan(
        method="qlora",
        rank=16,
        targets="all-linear",
        batch_size=4,
        seq_len=2048,
        gradient_checkpointing=True,
        optimizer="paged_adamw_8bit",
    )
    plans = plans_from_args(_parse("--compare", "full,lora,qlora"))
    assert [p.method for p in plans] == ["full", "lora", "qlora"]
    (sharded,) = plans_from_args(
        _parse("--method", "full", "--gpus", "8", "--sharding", "zero3", "--offload", "optimizer")
    )
    assert (sharded.gpus, sharded.sharding, sharded.offload) == (8, "zero3", "optimizer")
    args = _parse("--method", "lora", "--trace")
    assert wants_trace(args) and plans_from_args(args)[0].method == "lora"


def test_flag_details() -> None:
    (plan,) = plans_from_args(
        _parse(
            "--targets",
            "q_proj,v_proj",
            "--rank-pattern",
            "q_proj=4",
            "--rank-pattern",
            r"layers\.0\..*=2",
            "--modules-to-save",
            "lm_head",
            "--cuda-context",
            "512",
            "--allocator-margin",
            "0.2",
            "--no-double-quant",
            "--gpus",
            "2",
        )
    )
    assert plan.targets == ("q_proj", "v_proj")
    assert plan.rank_pattern == (("q_proj", 4), (r"layers\.0\..*", 2))
    assert plan.modules_to_save == ("lm_head",) and plan.double_quant is False
    assert plan.cuda_context_bytes == 512 * 2**20 and plan.allocator_fraction == 0.2
    assert plan.sharding == "ddp"  # several GPUs without a strategy: plain data parallel
    (regex,) = plans_from_args(_parse("--targets-regex", r".*\.q_proj"))
    assert regex.targets == r".*\.q_proj"


def test_every_plan_field_has_its_flag() -> None:
    """ALL_PLAN_FLAGS is the one list: each flag sets a real field, and only these fields have none."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingPlan)}
    flagged = {flag.field for flag in ALL_PLAN_FLAGS}
    assert flagged <= fields
    # method comes from --method/--compare; lora_bias and trainable are for the Python API only.
    assert fields - flagged == {"method", "lora_bias", "trainable"}
    assert len({flag.flag for flag in ALL_PLAN_FLAGS}) == len(ALL_PLAN_FLAGS)


def test_method_options_reach_the_plan() -> None:
    (plan,) = plans_from_args(_parse("--method", "lora", "--layers", "0-2,5,1", "--init", "mica", "--rslora"))
    assert plan.layers_to_transform == (0, 1, 2, 5)
    assert plan.lora_init == "mica" and plan.use_rslora is True
    (bd,) = plans_from_args(_parse("--bdlora-a", "o_proj,down_proj", "--bdlora-b", "q_proj", "--bdlora-blocks", "2"))
    assert bd.bdlora_a == ("o_proj", "down_proj") and bd.bdlora_b == ("q_proj",) and bd.bdlora_blocks == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--layers", "3-1"), "runs backwards"),
        (("--layers", "a"), "layer indices like"),
        (("--prefix-projection",), "--prefix-projection applies to prefix-tuning, not lora"),
        (("--method", "full", "--init", "pissa"), "--init applies to lora, qlora, lora-8bit or dora, not full"),
        (("--method", "qlora", "--lokr-factor", "4"), "--lokr-factor applies to lokr, not qlora"),
        (("--bdlora-a", "q_proj", "--bdlora-b", "q_proj"), "cannot have both A and B"),
        (("--method", "ia3", "--layers", "0"), "--layers applies to lora, qlora, lora-8bit, dora, adalora"),
    ],
)
def test_method_options_refused_where_they_do_nothing(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        plans_from_args(_parse(*argv))


def test_method_help_lists_every_builtin_method() -> None:
    """--method's help is written without importing the registry (no torch for --help): it must not drift."""
    from peftaudit.memory.plan import BUILTIN_METHOD_NAMES
    from peftaudit.plugins import memory_methods

    assert set(BUILTIN_METHOD_NAMES) == set(memory_methods())


def test_default_methods_make_plans_without_touching_args() -> None:
    args = _parse()
    before = vars(args).copy()
    assert [p.method for p in plans_from_args(args, default_methods="full,lora")] == ["full", "lora"]
    assert vars(args) == before and plans_from_args(args) == []
    (plan,) = plans_from_args(_parse("--method", "qlora"), default_methods="full,lora")
    assert plan.method == "qlora"
    (empty,) = plans_from_args(_parse("--targets", ""), default_methods="lora")
    assert empty.targets == "all-linear"  # an empty --targets is as if not given


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rank", "0"), "rank must be a positive"),
        (("--rank-pattern", "q_proj"), "REGEX=RANK"),
        (("--method", "lora", "--compare", "full"), "not both"),
        (("--targets", "q", "--targets-regex", "q"), "not both"),
        (("--compare", "full,nope"), "unknown method 'nope'"),
    ],
)
def test_bad_flags_are_plan_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plans_from_args(_parse(*argv))


def test_cli_helpers_import_nothing_heavy() -> None:
    code = (
        "import sys, peftaudit.memory.cli, peftaudit.memory.render; "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def _estimates(inventory_of):
    inv = inventory_of("llama")
    return [estimate(inv, TrainingPlan(method=m, seq_len=128)) for m in ("full", "lora", "qlora")]


def test_table_and_chart(inventory_of) -> None:
    from rich.console import Console

    estimates = _estimates(inventory_of)
    buffer = io.StringIO()
    render_estimates(estimates, Console(file=buffer, width=160, color_system=None))
    text = buffer.getvalue()
    for e in estimates:
        line = next(
            ln for ln in text.splitlines() if ln.strip().startswith(("│ " + e.method, "┃ " + e.method, e.method))
        )
        assert f"{e.total_bytes / 2**30:,.2f}" in line
    # One bar per method, as long as its peak on a common 40-cell scale (each component rounds).
    bars = [ln for ln in text.splitlines() if " GiB, peak in the " in ln and ln.split()[0] in {"full", "lora", "qlora"}]
    assert len(bars) == 3
    top = max(e.total_bytes for e in estimates)
    for bar, e in zip(bars, estimates, strict=True):
        shown = sum(1 for v in e.components.values() if v)
        assert abs(len(bar.split()[1]) - 40 * e.total_bytes / top) <= shown


def test_markdown_rows_add_up(inventory_of) -> None:
    estimates = _estimates(inventory_of)
    md = estimates_markdown(estimates)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(rows) == 3
    for row, e in zip(rows, estimates, strict=True):
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        parts = [float(c.replace(",", "")) for c in cells[1:-2]]
        peak = float(cells[-2].replace(",", ""))
        assert peak == pytest.approx(e.total_bytes / 2**30, abs=0.006)
        assert sum(parts) == pytest.approx(peak, abs=0.01 * len(parts))
    assert "- **acts**:" in md
