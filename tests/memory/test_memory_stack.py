"""The software stack a plan names (issue 14, part 1): parsing, defaults, the plan field, warnings, the CLI.

The stack changes no number here (the rules that use it are tested with them): these tests check
that it is read, carried, shown and keyed, and that a release outside the traced ones warns.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version as PackagingVersion

from peftaudit.cli import main
from peftaudit.errors import PeftauditError
from peftaudit.memory import PlanError, TrainingPlan, estimate
from peftaudit.memory.stack import (
    KNOWN_RANGES,
    PACKAGES,
    installed,
    normalize_stack,
    parse_stack,
    parse_version,
    stack_of,
)

TRACES = Path(__file__).parent / "data" / "stack_traces.json"
LLAMA_1B = "meta-llama/Llama-3.2-1B"


# --- versions and the --stack text -------------------------------------------------------------------------


def _release(text: str) -> tuple[int, ...]:
    """The release segment as the ``packaging`` library (pip's) reads it, trailing zeros dropped."""
    parts = list(PackagingVersion(text).release)
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@pytest.mark.parametrize("text", ["4.44", "4.44.2", "4.44.0", "5.0.0rc1", "2.13.0+cpu", "0.43.1", "1.0.0.dev3", "5"])
def test_parse_version_reads_what_pip_reads(text: str) -> None:
    assert parse_version(text) == _release(text)


@pytest.mark.parametrize("text", ["", "x", "4.x", "4..44", "latest", "==4.44", "4.44-beta-gamma!"])
def test_parse_version_refuses_what_is_not_a_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        parse_version(text)


def test_parse_stack_reads_pairs_in_package_order() -> None:
    assert parse_stack("peft==0.12, Transformers==4.44 ,bitsandbytes==0.43") == (
        ("transformers", "4.44"),
        ("peft", "0.12"),
        ("bitsandbytes", "0.43"),
    )
    assert parse_stack("torch==2.4.1") == (("torch", "2.4.1"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the stack is empty"),
        ("   ", "the stack is empty"),
        ("accelerate==1.0", "unknown package 'accelerate' in stack; known: transformers, peft, bitsandbytes, torch"),
        ("transformers==four", "transformers version 'four' in stack is not a version"),
        ("transformers==4.44,transformers==4.45", "transformers is named twice in stack"),
        ("transformers=4.44", "stack entry 'transformers=4.44' is not PACKAGE==VERSION"),
        ("transformers>=4.44", "is not PACKAGE==VERSION"),
        ("transformers==", "stack entry 'transformers==' is not PACKAGE==VERSION"),
        ("transformers==4.44,", "stack entry '' is not PACKAGE==VERSION"),
        ("peft", "stack entry 'peft' is not PACKAGE==VERSION"),
    ],
)
def test_parse_stack_refuses_malformed_text_in_one_line(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(")) as info:
        parse_stack(text)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, PeftauditError)  # the CLI prints one line and exits 2


# --- installed releases ---------------------------------------------------------------------------------


def test_installed_releases_are_the_distributions_metadata() -> None:
    stack = installed()
    assert stack is installed()  # cached
    assert stack.named == ()
    unknown = dict(stack.unknown)
    for package in PACKAGES:
        try:
            expected: tuple[int, ...] | None = _release(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            expected = None
        if package in unknown:  # outside the traced releases: modelled as the nearest, the original kept
            assert unknown[package] == expected
        elif expected is not None:
            assert stack.version(package) == expected, package


def test_reading_the_stack_imports_none_of_the_libraries() -> None:
    code = (
        "import sys\nfrom peftaudit.memory.stack import installed\ninstalled()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip() == "[]"


def test_known_ranges_are_the_traced_releases() -> None:
    # The oldest and newest release of each package in the recorded traces (benchmarks/trace_stacks.py).
    rows = json.loads(TRACES.read_text())["rows"]
    for package, (low, high) in KNOWN_RANGES.items():
        traced = sorted({_release(r["versions"][package]) for r in rows})
        assert (parse_version(low), parse_version(high)) == (traced[0], traced[-1]), package


# --- the plan field -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "peft==0.12,transformers==4.44",
        {"transformers": "4.44", "peft": "0.12"},
        [["peft", "0.12"], ["transformers", "4.44"]],
        (("transformers", "4.44"), ("peft", "0.12")),
    ],
)
def test_plan_accepts_every_spelling_and_round_trips(given: Any) -> None:
    plan = TrainingPlan(stack=given)
    assert plan.stack == (("transformers", "4.44"), ("peft", "0.12"))
    plan.validate()
    data = plan.to_dict()
    assert data["stack"] == {"transformers": "4.44", "peft": "0.12"}
    again = TrainingPlan.from_dict(json.loads(json.dumps(data)))
    assert again == plan and hash(again) == hash(plan)


def test_plan_without_a_stack_is_the_installed_one() -> None:
    nothings: list[Any] = [(), {}, [], ""]
    for nothing in nothings:
        assert TrainingPlan.from_dict({"stack": nothing}).stack == ()
    assert TrainingPlan().to_dict()["stack"] == {}
    assert stack_of(TrainingPlan()) == installed()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("jax==0.4", "unknown package 'jax'"),
        ({"transformers": "4.x"}, "transformers version '4.x' in stack is not a version"),
        ([["peft", "0.12"], ["peft", "0.13"]], "peft is named twice"),
        ([["peft"]], "is not a \\(package, version\\) pair"),
    ],
)
def test_plan_with_a_malformed_stack_fails_validation(given: Any, message: str) -> None:
    plan = TrainingPlan(stack=given)
    hash(plan)  # kept hashable until validate() refuses it
    with pytest.raises(PlanError, match=message):
        plan.validate()


def test_stack_of_names_the_plans_releases_and_installs_the_rest() -> None:
    stack = stack_of(TrainingPlan.from_dict({"stack": "transformers==4.44.2,bitsandbytes==0.43"}))
    assert stack.named == ("transformers", "bitsandbytes")
    assert stack.transformers == (4, 44, 2) and stack.bitsandbytes == (0, 43)
    assert stack.peft == installed().peft and stack.torch == installed().torch
    assert stack.before("transformers", "4.45") and not stack.before("transformers", "4.44")
    assert stack.before("bitsandbytes", "0.44") and not stack.before("bitsandbytes", "0.43.0")
    assert normalize_stack({"Transformers": " 4.44 "}) == (("transformers", "4.44"),)


# --- outside the traced releases: the nearest, with a warning ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "package", "modelled"),
    [
        ("transformers==4.30", "transformers", (4, 44, 2)),
        ("transformers==6.1", "transformers", (5, 25)),
        ("peft==0.10", "peft", (0, 12)),
        ("peft==0.30", "peft", (0, 21, 2)),
    ],
)
def test_release_outside_the_traced_ones_models_the_nearest(text: str, package: str, modelled: tuple[int, ...]) -> None:
    stack = stack_of(TrainingPlan.from_dict({"stack": text}))
    assert stack.version(package) == modelled
    assert [p for p, _ in stack.unknown] == [package]
    (warning,) = stack.warnings()
    assert warning.code == "stack-unknown"
    assert f"{package} {text.split('==')[1]} (named) is outside the traced releases" in warning.message


@pytest.mark.parametrize("text", ["transformers==4.44", "transformers==4.44.0,peft==0.21.9", "transformers==5.25.3"])
def test_release_inside_the_traced_ones_is_known(text: str) -> None:
    assert stack_of(TrainingPlan.from_dict({"stack": text})).unknown == ()


def test_estimate_warns_stack_unknown(inventory_of: Any) -> None:
    inventory = inventory_of("llama")
    plan = TrainingPlan(seq_len=256)
    codes = [w.code for w in estimate(inventory, plan.with_(stack="transformers==4.30,peft==0.12")).warnings]
    assert codes.count("stack-unknown") == 1
    assert "stack-unknown" not in [w.code for w in estimate(inventory, plan.with_(stack="transformers==4.44")).warnings]
    assert estimate(inventory, plan.with_(stack="peft==0.12")).plan["stack"] == {"peft": "0.12"}


# --- the commands ---------------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--width", "120"] if "--json" not in argv else argv) == 0
    return capsys.readouterr().out


def test_report_shows_the_named_stack(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["report", LLAMA_1B, "--no-cache", "--method", "lora", "--seq-len", "256"]
    data = json.loads(_run([*base, "--stack", "peft==0.12,transformers==4.30", "--json"], capsys))
    (only,) = data["estimates"]
    assert only["plan"]["stack"] == {"transformers": "4.30", "peft": "0.12"}
    assert [w["code"] for w in only["warnings"]] == ["stack-unknown"]
    text = _run([*base, "--stack", "transformers==4.44,peft==0.12"], capsys)
    assert "stack: transformers 4.44, peft 0.12" in text  # the estimate's plan line names it
    assert "stack: installed" in _run(base, capsys)


def test_fit_gpus_plan_and_recommend_accept_the_stack(capsys: pytest.CaptureFixture[str]) -> None:
    stack = ["--stack", "transformers==4.44"]
    fit = _run(["fit", LLAMA_1B, "--gpu", "H100", "--seq-len", "256", *stack], capsys)
    assert fit.splitlines()[1].endswith(" · stack: transformers 4.44")  # the plan line
    gpus = _run(["gpus", LLAMA_1B, "--method", "lora", "--seq-len", "256", "--gpu", "H100", *stack, "--json"], capsys)
    assert [p["stack"] for p in json.loads(gpus)["plans"]] == [{"transformers": "4.44"}]
    plan = _run(["plan", LLAMA_1B, "--tokens", "1M", "--gpu", "H100", "--seq-len", "256", *stack, "--json"], capsys)
    assert json.loads(plan)["stack"] == {"transformers": "4.44"}
    rec = _run(["recommend", LLAMA_1B, "--seq-len", "256", *stack, "--json"], capsys)
    assert json.loads(rec)["request"]["stack"] == {"transformers": "4.44"}
    assert "stack: transformers 4.44" in _run(["recommend", LLAMA_1B, "--seq-len", "256", *stack], capsys)


@pytest.mark.parametrize("command", [["report", LLAMA_1B], ["fit", LLAMA_1B, "--gpu", "H100"], ["recommend", LLAMA_1B]])
def test_malformed_stack_is_exit_2(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--stack", "transformers==4.44,jax==0.4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown package 'jax' in stack" in err
