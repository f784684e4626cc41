"""The report: invariants over its rows, JSON round trip, golden renderings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import tiny
from golden import assert_matches_golden

from peftaudit.report import Report, audit, matches_published
from peftaudit.report.render import RenderOptions
from peftaudit.report.render.json import JsonRenderer
from peftaudit.report.render.markdown import MarkdownRenderer
from peftaudit.report.render.terminal import TerminalRenderer


def tiny_report(name: str, tmp_path: Path) -> Report:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny.TINY[name]))
    report = audit(str(folder), use_cache=False)
    # A stable id and origin, so renderings do not depend on the temporary path.
    model = replace(report.model, id=f"tiny-{name}", origin=f"tests/tiny.py:{name}")
    return replace(report, model=model)


@pytest.mark.parametrize("name", sorted(tiny.TINY))
def test_rows_sum_to_totals(name: str, tmp_path: Path) -> None:
    report = tiny_report(name, tmp_path)
    assert sum(r.weights for r in report.layers) == report.params.weights
    assert sum(r.biases for r in report.layers) == report.params.biases
    assert sum(r.trainable for r in report.layers) == report.params.trainable
    assert report.params.weights + report.params.biases == report.params.total
    assert report.params.trainable + report.params.frozen == report.params.total
    assert report.tree is not None
    assert report.tree.params == report.params.total
    assert all(r.params == r.per_block * r.repeat for r in report.layers)


def test_repeated_blocks_collapse(tmp_path: Path) -> None:
    report = tiny_report("llama", tmp_path)
    names = [(r.name, r.repeat) for r in report.layers]
    assert names == [("model.embed_tokens", 1), ("model.layers.0-1", 2), ("model.norm", 1), ("lm_head", 1)]
    block = report.layers[1]
    assert block.type == "LlamaDecoderLayer"
    # q(64x64) k,v(32x64 each, 2 kv heads of 16) o(64x64) + gate/up/down(128x64 each) + 2 norms.
    assert block.per_block == 64 * 64 * 2 + 32 * 64 * 2 + 3 * 128 * 64 + 2 * 64


def test_tied_head_gets_a_zero_row_naming_its_tensor(tmp_path: Path) -> None:
    report = tiny_report("llama_tied", tmp_path)
    head = next(r for r in report.layers if r.name == "lm_head")
    assert (head.weights, head.tied_to) == (0, "model.embed_tokens.weight")
    assert report.params.tied == 128 * 64


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    report = tiny_report("mixtral", tmp_path)
    text = JsonRenderer().render(report, RenderOptions())
    data = json.loads(text)
    assert data == report.to_dict()
    assert Report.from_dict(data) == report
    assert data["schema_version"] == 1
    for key in ("total", "weights", "biases", "buffers", "trainable", "frozen"):
        assert isinstance(data["params"][key], int)
    assert {"name", "type", "weights", "biases"} <= set(data["layers"][0])
    assert data["moe"]["active_params"] == report.params.active


def test_json_matches_the_documented_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    for name in ("llama_tied", "mixtral", "bert"):
        jsonschema.validate(tiny_report(name, tmp_path).to_dict(), schema)


def test_terminal_rendering_golden(tmp_path: Path) -> None:
    report = tiny_report("llama_tied", tmp_path)
    text = TerminalRenderer().render(report, RenderOptions(width=80, tree=True))
    assert_matches_golden(text, "tiny_llama_tied.txt")
    assert max(len(line) for line in text.splitlines()) <= 80


def test_markdown_rendering_golden(tmp_path: Path) -> None:
    report = tiny_report("mixtral", tmp_path)
    text = MarkdownRenderer().render(report, RenderOptions(tree=True))
    assert_matches_golden(text, "tiny_mixtral.md")


def test_terminal_shows_exact_totals(tmp_path: Path) -> None:
    report = tiny_report("gpt2", tmp_path)
    text = TerminalRenderer().render(report, RenderOptions(width=80))
    assert f"{report.params.total:,}" in text
    assert "1 GiB = 2^30 bytes" in text


@pytest.mark.parametrize(
    ("total", "published", "expected"),
    [
        (8_030_261_248, 8_030_261_248, True),
        (8_030_261_249, 8_030_261_248, False),
        (7_615_616_512, "7.61B", True),
        (7_625_616_512, "7.61B", False),
        (124_439_808, "124M", True),
        (671_026_419_712, "671B", True),
        (1_235_814_400, "1.24B", True),
        (1_235_814_400, "1.2B", True),
        (1_235_814_400, "1.3B", False),
        (60_506_624, "60 million", True),
        (7_241_732_096, "7 billion", True),
        (7_241_732_096, "7.3B", False),
        (5, "n/a", False),
        (5, "5 parsecs", False),
    ],
)
def test_matches_published(total: int, published: int | str, expected: bool) -> None:
    assert matches_published(total, published) is expected


def test_report_with_estimates_and_findings_round_trips_and_matches_schema(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from peftaudit.cli import main

    assert main(["report", "gpt2", "--compare", "full,lora", "--checks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert [e["method"] for e in data["estimates"]] == ["full", "lora"]
    for e in data["estimates"]:
        assert sum(e["components"].values()) == e["total_bytes"]
    ids = {f["id"] for f in data["findings"]}
    assert {"lora.fan-in-fan-out", "targets.ambiguous-name", "tokens.no-pad"} <= ids  # GPT-2: Conv1D, c_proj, no pad
    assert Report.from_dict(data).to_dict() == data


def test_vision_language_report_with_towers_matches_schema(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from peftaudit.cli import main

    # --params-only: the towers are counts; the default report's glance would derive LLaVA's step profiles (~15 s).
    assert main(["report", "llava-hf/llava-1.5-7b-hf", "--json", "--no-cache", "--params-only"]) == 0
    data = json.loads(capsys.readouterr().out)
    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert [t["name"] for t in data["towers"]] == ["vision", "projector", "language_model"]
    assert sum(t["params"] for t in data["towers"]) == data["params"]["total"]
