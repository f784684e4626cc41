"""``peftaudit recommend`` and the report-checks helpers, from the outside: output, exit codes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from peftaudit.cli import main
from peftaudit.recommend.cli import gate
from peftaudit.recommend.findings import Finding, counts
from peftaudit.recommend.render import render_findings, render_recommendation
from peftaudit.units import parse_size, parse_tokens


def test_help_imports_nothing_heavy() -> None:
    code = "from peftaudit.cli import main\ntry:\n    main(['recommend', '--help'])\nexcept SystemExit:\n    pass"
    script = f"import sys\n{code}\nprint('MODULES', ' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )
    modules = set(next(x for x in result.stdout.splitlines() if x.startswith("MODULES ")).split()[1:])
    assert "--export" in result.stdout
    assert not modules & {"torch", "transformers", "rich", "yaml", "peft"}


def test_json_output_has_stable_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", "gpt2", "--format", "json", "--tokens", "1M"])
    out = capsys.readouterr()
    assert code == 0
    data = json.loads(out.out)
    assert list(data) == [
        "schema_version",
        "model",
        "request",
        "recommendation",
        "reasons",
        "presets",
        "ranks",
        "budget",
        "findings",
        "notes",
    ]
    rec = data["recommendation"]
    assert rec["lora_config"]["r"] == 16 and rec["lora_config"]["lora_alpha"] == 32
    assert rec["lora_config"]["fan_in_fan_out"] is True
    assert rec["lora_params"] == 2_359_296  # peft's count for GPT-2, all-linear, r=16
    assert data["request"]["tokens"] == 1_000_000
    assert [r["rank"] for r in data["ranks"]] == [8, 16, 32]
    assert {f["id"] for f in data["findings"]} >= {"tokens.no-pad", "targets.ambiguous-name"}
    assert all(set(f) == {"id", "severity", "title", "modules", "fix", "detail"} for f in data["findings"])
    assert out.err == ""


def test_table_output_explains_and_cites(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "meta-llama/Llama-3.2-1B", "--task", "cpt"]) == 0
    out = capsys.readouterr().out
    assert "rank / alpha  256 / 16" in out and "rsLoRA on" in out
    assert "[lllf]" in out and "arxiv.org/abs/2405.09673" in out
    assert "Rank, one step down and up" in out and "Readiness" in out


def test_markdown_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "gpt2", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# LoRA recommendation: openai-community/gpt2") and "| preset |" in out


def test_export_goes_to_stdout_and_notes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", "mistralai/Mixtral-8x7B-v0.1", "--export", "llama-factory"])
    out = capsys.readouterr()
    assert code == 0
    cfg = yaml.safe_load(out.out)
    assert cfg["model_name_or_path"] == "mistralai/Mixtral-8x7B-v0.1" and cfg["lora_rank"] == 16
    assert "no target_parameters" in out.err  # the experts cannot be expressed there


def test_budget_picks_the_method_and_is_exported(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", "meta-llama/Llama-3.1-8B", "--budget", "20GiB", "--export", "axolotl"])
    out = capsys.readouterr()
    assert code == 0
    cfg = yaml.safe_load(out.out)
    # bf16 LoRA with checkpointing needs about 21 GiB here: QLoRA is the first that fits.
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True and cfg["lora_r"] == 16


def test_gpu_name_sets_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "meta-llama/Llama-3.1-8B", "--gpu", "A10G", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["gpu"] == "A10G" and data["budget"]["fits"] is True
    assert data["budget"]["peak_bytes"] <= data["budget"]["budget_bytes"]
    assert data["request"]["budget_bytes"] == data["budget"]["budget_bytes"]


def test_fail_on_gates_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "gpt2", "--fail-on", "warning"]) == 1
    assert "at or above warning" in capsys.readouterr().err
    assert main(["recommend", "gpt2", "--fail-on", "error"]) == 0
    assert main(["recommend", "gpt2", "--fail-on", "warning", "--skip-check", "tokens", "--skip-check", "targets"]) == 0


def test_user_targets_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["recommend", "gpt2", "--target-modules", "c_attn,nothing", "--format", "json", "--fail-on", "error"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["recommendation"]["preset"] == "custom"
    no_match = next(f for f in data["findings"] if f["id"] == "targets.no-match")
    assert no_match["severity"] == "warning" and "nothing" in no_match["title"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "lots"], "cannot read memory size"),
        (["--tokens", "many"], "cannot read token count"),
        (["--export", "ms-swift"], "unknown export format"),
        (["--gpu", "Z9000"], "unknown GPU"),
        (["--format", "xml"], "unknown --format"),
        (["--preset", "qv", "--target-modules", "q_proj"], "not both"),
        (["--target-parameters", "gate_up_proj"], "go with --target-modules"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "gpt2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parsers() -> None:
    assert parse_size("48GiB") == 48 * 1024**3
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("80G") == 80 * 1024**3
    assert parse_tokens("20M") == 20_000_000
    assert parse_tokens("1.5B") == 1_500_000_000
    assert parse_tokens("200k") == 200_000
    assert parse_tokens("1,000") == 1000


# --- the helpers `peftaudit report --checks / --fail-on` uses ------------------------------------------------


def test_report_check_helpers_on_a_catalog_model() -> None:
    from peftaudit.recommend.checks import CheckContext, run_checks
    from peftaudit.sources import load

    model = load("gpt2")
    findings = run_checks(CheckContext(inventory=model.inventory, facts=model.facts))
    ids = {f.id for f in findings}
    assert {"lora.fan-in-fan-out", "targets.ambiguous-name", "tokens.no-pad", "vocab.unaligned"} <= ids
    assert gate(findings, "warning")[0] == 1 and gate(findings, "error") == (0, None)
    data = {"finding_counts": counts(findings)}
    assert data["finding_counts"]["warning"] >= 1
    text = render_findings(findings, "table", model_id="gpt2")
    assert text.startswith("Readiness of gpt2") and "fix:" in text
    assert json.loads(render_findings(findings, "json"))["counts"] == data["finding_counts"]
    assert render_findings((), "table").endswith("no findings\n")


def test_renderers_only_read(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.recommend.recommendation import recommend
    from peftaudit.sources import load

    loaded = load("gpt2")
    rec = recommend(loaded.inventory, loaded.facts)
    assert render_recommendation(rec) == render_recommendation(rec)
    assert json.loads(render_recommendation(rec, "json")) == rec.to_dict()
    finding = Finding("x.y", "error", "t", fix="f", modules=("a",))
    assert "ERROR   x.y: t" in render_findings([finding])


def test_budget_skips_checkpointing_the_model_refuses() -> None:
    """ConvNeXt cannot checkpoint in transformers: the budget is fitted without it (not given up), and says so."""
    from peftaudit.inventory import take_inventory
    from peftaudit.recommend import RecommendRequest, recommend
    from peftaudit.recommend.facts import model_facts
    from peftaudit.sources.build import build_from_config
    from peftaudit.sources.catalog import lookup

    entry = lookup("facebook/convnext-base-224")
    assert entry is not None
    # One block per stage, narrower: the same class (which transformers cannot checkpoint), a quick derivation.
    config = {**entry.config, "depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "num_labels": 10}
    config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    model = build_from_config(config, model_id=entry.id)
    inventory, facts = take_inventory(model), model_facts(model, model_id=entry.id)
    request = RecommendRequest(task="classification", method="lora", budget_bytes=2**30)
    rec = recommend(inventory, facts, request, alternatives=False)
    assert rec.budget is not None and not rec.budget.fits and not rec.budget.gradient_checkpointing
    assert [label for label, _ in rec.budget.tried] == ["LoRA", "LoRA rank 4"]
    rules = {r.rule: r.text for r in rec.reasons}
    assert "ConvNextForImageClassification does not support" in rules["budget.no-checkpointing"]
    assert "gradient checkpointing" not in rules["budget.no-fit"]
