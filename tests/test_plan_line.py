"""Every estimate states its plan in one line, and ``fit`` says when a search stopped at a cap, not at the memory.

The plan line is built by one function (:func:`peftaudit.render.plan.plan_line`) for
``report --method/--compare``, ``plan``, ``fit``, ``gpus`` and ``recommend``; the flags
the user gives must change it. ``fit``'s searches stop at the model's context (or the
batch search's maximum): a length that hit the cap says so in the table and in the JSON.
"""

from __future__ import annotations

import json

import pytest

from peftaudit.cli import main
from peftaudit.gpus import find_gpu
from peftaudit.gpus.sizing import largest_batch_size, largest_seq_len
from peftaudit.memory import TrainingPlan
from peftaudit.render.plan import plan_line
from peftaudit.sources import load

LLAMA_1B = "meta-llama/Llama-3.2-1B"
#: BERT's context is 512 positions (max_position_embeddings), which fits any large GPU with room to spare.
BERT = "google-bert/bert-base-uncased"


def _out(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_the_default_plan_in_the_users_words() -> None:
    assert plan_line(TrainingPlan()).text == (
        "plan: batch 1 x 2,048 tokens · checkpointing off · bf16 · AdamW (torch, fused) · attention sdpa · "
        "1 GPU, no sharding · stack: installed"
    )


def test_each_setting_shows_in_the_line() -> None:
    plan = TrainingPlan(
        method="qlora",
        batch_size=4,
        seq_len=4096,
        gradient_accumulation=8,
        gradient_checkpointing=True,
        optimizer="paged_adamw_8bit",
        attention="eager",
        gpus=8,
        sharding="zero3",
        offload="optimizer",
        expandable_segments=True,
        stack=(("transformers", "4.44"), ("peft", "0.12")),
    )
    assert plan_line(plan).text == (
        "plan: batch 4 x 4,096 tokens · gradient accumulation 8 · checkpointing on · bf16 · base nf4 · "
        "paged AdamW 8-bit (bitsandbytes) · attention eager · 8 GPUs, zero3, offload optimizer · "
        "expandable segments · stack: transformers 4.44, peft 0.12"
    )
    # The estimate's JSON form of the plan reads the same.
    assert plan_line(plan.to_dict()).text == plan_line(plan).text


def test_compared_plans_share_the_line_and_rows_carry_the_rest() -> None:
    line = plan_line([TrainingPlan(method=m, precision="fp16") for m in ("full", "lora", "qlora", "lora-8bit")])
    assert " · fp16 · " in line.text and "base" not in line.text
    assert line.rest == ("", "", "nf4", "int8")


def test_the_line_wraps_between_parts_only() -> None:
    line = plan_line(TrainingPlan(stack=(("transformers", "4.44"),)))
    wrapped = line.wrapped(60)
    assert len(wrapped) > 1 and all(len(text) <= 60 for text in wrapped)
    # A broken line ends in the dot that says it goes on; the next starts under the first part.
    assert all(text.endswith(" ·") for text in wrapped[:-1])
    assert wrapped[1].startswith(" " * len("plan: ")) and not wrapped[1][len("plan: ")].isspace()
    assert " ".join(text.strip() for text in wrapped) == line.text


def test_report_flags_change_the_plan_line(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["report", LLAMA_1B, "--no-cache", "--method", "lora", "--width", "200"]
    default = _out(base, capsys)
    assert "plan: batch 1 x 2,048 tokens · checkpointing off · bf16 · " in default
    changed = _out([*base, "--seq-len", "4096", "--gradient-checkpointing", "--grad-accum", "4"], capsys)
    assert "plan: batch 1 x 4,096 tokens · gradient accumulation 4 · checkpointing on · bf16 · " in changed
    # Above the table it describes, in Markdown too.
    assert changed.index("plan: ") < changed.index("Peak GPU memory per GPU (GiB)")
    md = _out([*base, "--seq-len", "4096", "--gradient-checkpointing", "--format", "markdown"], capsys)
    assert "\nplan: batch 1 x 4,096 tokens · checkpointing on · " in md
    assert md.index("plan: ") < md.index("| method |")


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", LLAMA_1B, "--gpu", "H100", "--optimizer", "adamw_8bit", "--width", "200"],
        ["gpus", LLAMA_1B, "--gpu", "H100", "--method", "lora", "--optimizer", "adamw_8bit", "--width", "200"],
        ["plan", LLAMA_1B, "--gpu", "H100", "--tokens", "1M", "--optimizer", "adamw_8bit", "--width", "200"],
        ["recommend", LLAMA_1B, "--lengths", "varied"],  # recommend has no --optimizer: its plan is AdamW's
    ],
    ids=lambda argv: argv[0],
)
def test_every_estimating_command_states_its_plan(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = _out([*argv, "--seq-len", "512"], capsys)
    (line,) = [text for text in out.splitlines() if text.startswith("plan: ")]
    assert "stack: installed" in line
    if argv[0] == "recommend":
        assert "batch 1 x 512 tokens" in line and "AdamW (torch, fused)" in line and "varied lengths" in line
        return
    assert "AdamW 8-bit (bitsandbytes)" in line
    if argv[0] == "fit":  # fit searches the batch and the length: its table carries them
        assert "tokens" not in line and "checkpointing" not in line
    else:
        assert "batch 1 x 512 tokens · checkpointing off" in line


def test_fit_says_when_the_models_context_capped_the_length(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", BERT, "--gpu", "H100", "--seq-len", "128"]
    data = json.loads(_out([*argv, "--format", "json"], capsys))
    for row in data["results"]:
        assert row["max_seq_len"] == 512 and row["at_max_seq"]["fits"]
        assert row["max_seq_len_cap"] == {"limit": 512, "reason": "context"}
        assert row["max_batch_size_cap"] is None
    text = _out([*argv, "--width", "120"], capsys)
    assert text.count("512 (capped)") == 2
    assert "(capped): the length search stops at the model's context, 512 tokens (max_position_embeddings)" in text


def test_fit_below_the_cap_says_nothing_of_it(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fit", LLAMA_1B, "--gpu", "T4", "--seq-len", "512"]
    data = json.loads(_out([*argv, "--format", "json"], capsys))
    assert all(r["max_seq_len"] < 131072 and r["max_seq_len_cap"] is None for r in data["results"])
    assert "capped" not in _out([*argv, "--width", "120"], capsys)


def test_batch_search_capped_at_its_stated_maximum() -> None:
    inventory = load(BERT).inventory
    plan, gpu = TrainingPlan(seq_len=128), find_gpu("H100")
    capped = largest_batch_size(inventory, plan, gpu, limit=4)
    assert (capped.value, capped.capped, capped.cap_to_dict()) == (4, True, {"limit": 4, "reason": "search-limit"})
    free = largest_batch_size(inventory, plan, gpu)
    assert free.value > 4 and not free.capped and free.cap_to_dict() is None
    # A stated length limit below the context is the search's maximum, not the context.
    assert largest_seq_len(inventory, plan, gpu, limit=256).cap_to_dict() == {"limit": 256, "reason": "search-limit"}
