"""The default report's glance: training memory on the GPU classes and the recommendation in one line.

Every figure is checked against the code that owns it, called directly: a row's
peak against :func:`peftaudit.memory.estimate` for the same plan, the class
against :func:`peftaudit.gpus.sizing.fit` (and the catalog's usable memory), a
row beyond the largest class against :func:`~peftaudit.gpus.sizing.smallest_setup`,
the summary against :func:`peftaudit.recommend.recommend`. The CLI rows check
``--params-only``, a model the estimator cannot size, the JSON schema and the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny

from peftaudit.cli import main
from peftaudit.gpus.catalog import find_gpu
from peftaudit.gpus.sizing import fit, smallest_setup
from peftaudit.memory import TrainingPlan, estimate
from peftaudit.report import glance as glance_module
from peftaudit.report.glance import GPU_CLASSES, MemoryGlance, memory_glance, recommendation_summary
from peftaudit.sources.load import LoadedModel, load

LLAMA_8B = "meta-llama/Llama-3.1-8B"
SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text(encoding="utf-8"))
#: A convolutional network: the estimator has no layer program for it, cannot trace its step, and a
#: Llama-shaped stand-in does not apply (no output head); the smallest config transformers accepts.
RESNET = {
    "model_type": "resnet",
    "architectures": ["ResNetForImageClassification"],
    "depths": [1],
    "hidden_sizes": [8],
    "embedding_size": 8,
}


@pytest.fixture(scope="module")
def llama_8b() -> tuple[LoadedModel, MemoryGlance]:
    loaded = load(LLAMA_8B)
    return loaded, memory_glance(loaded.inventory)


def _plan(row: Any) -> TrainingPlan:
    return TrainingPlan(method=row.method, gradient_checkpointing=row.gradient_checkpointing)


def test_rows_are_the_estimators_peaks_for_the_same_plans(llama_8b: tuple[LoadedModel, MemoryGlance]) -> None:
    loaded, memory = llama_8b
    assert [(r.method, r.gradient_checkpointing) for r in memory.rows] == [
        (m, gc) for m in ("full", "lora", "qlora") for gc in (False, True)
    ]
    for row in memory.rows:
        result = estimate(loaded.inventory, _plan(row))
        assert row.total_bytes == result.total_bytes
        assert row.warnings == tuple(dict.fromkeys(w.code for w in result.warnings))
        assert memory.row_plan(row) == _plan(row).to_dict()


def test_the_class_is_fits_answer_on_the_catalog_gpus(llama_8b: tuple[LoadedModel, MemoryGlance]) -> None:
    loaded, memory = llama_8b
    gpus = {gb: find_gpu(name) for gb, name in GPU_CLASSES}
    assert [(c.class_gb, c.gpu, c.usable_bytes) for c in memory.gpu_classes] == [
        (gb, gpu.name, gpu.usable_bytes) for gb, gpu in gpus.items()
    ]
    for row in memory.rows:
        fitting = [gb for gb, gpu in gpus.items() if fit(loaded.inventory, _plan(row), gpu).fits]
        assert row.fits_class_gb == min(fitting)
        assert row.fits_gpu == gpus[min(fitting)].name
        below = [gb for gb in gpus if gb < min(fitting)]
        assert row.too_small_class_gb == (max(below) if below else None)
        assert row.scale_out is None
    # Llama-3.1-8B in bf16 with AdamW: full fine-tuning needs the 80 GB class, QLoRA fits 24 GB
    # (the A10G's 22.5 GiB the driver reports, gpus.json); the peaks against the catalog's figures.
    rows = {(r.method, r.gradient_checkpointing): r for r in memory.rows}
    full, qlora = rows[("full", False)], rows[("qlora", True)]
    assert (full.fits_class_gb, full.too_small_class_gb) == (80, 48)
    assert full.total_bytes is not None and gpus[48].usable_bytes < full.total_bytes <= gpus[80].usable_bytes
    assert (qlora.fits_class_gb, qlora.too_small_class_gb) == (24, None)
    assert qlora.total_bytes is not None and qlora.total_bytes <= gpus[24].usable_bytes


def test_a_row_no_class_holds_is_sized_by_smallest_setup(
    llama_8b: tuple[LoadedModel, MemoryGlance], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Smaller classes (the T4's 16 GB, the V100's 32 GB) make full fine-tuning of 8B exceed every class.
    monkeypatch.setattr(glance_module, "GPU_CLASSES", ((16, "T4"), (32, "V100 32GB")))
    loaded, _ = llama_8b
    memory = memory_glance(loaded.inventory)
    row = memory.rows[0]
    assert (row.method, row.fits_class_gb, row.too_small_class_gb, row.too_small_gpu) == ("full", None, 32, "V100 32GB")
    expected = smallest_setup(loaded.inventory, _plan(row), find_gpu("V100 32GB"))
    assert row.scale_out is not None
    assert (row.scale_out.gpus, row.scale_out.sharding, row.scale_out.offload) == (
        expected.gpus,
        expected.sharding,
        expected.offload,
    )
    assert (row.scale_out.peak_bytes, row.scale_out.fits, row.scale_out.setup) == (
        expected.peak_bytes,
        expected.fits,
        expected.setup(),
    )
    assert row.scale_out.gpus > 1 and row.scale_out.fits


def test_the_recommendation_is_recommends(llama_8b: tuple[LoadedModel, MemoryGlance]) -> None:
    from peftaudit.recommend import recommend

    loaded, _ = llama_8b
    summary = recommendation_summary(loaded.inventory, loaded.facts, LLAMA_8B)
    rec = recommend(loaded.inventory, loaded.facts)
    assert summary.command == f"peftaudit recommend {LLAMA_8B}"
    # The report's line leaves out the alternatives (presets, ranks): the rest is the full recommendation's.
    assert rec.presets and rec.ranks
    assert summary == glance_module.summarize(rec, summary.command)
    assert (summary.method, summary.preset, summary.rank, summary.alpha) == (
        rec.recipe.method,
        rec.preset,
        rec.recipe.hyper.rank,
        rec.recipe.hyper.alpha,
    )
    assert summary.target_modules == rec.recipe.targets.target_modules
    assert (summary.reason, summary.reason_rule) == (rec.reasons[0].text, rec.reasons[0].rule)
    # peft's all-linear on Llama: the seven projections of every block (the output head left out).
    assert summary.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_default_report_shows_counts_memory_and_the_recommendation(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    code, out, _ = _run(["report", "gpt2", "--no-cache", "--width", "100"], capsys)
    assert code == 0
    assert out.index("Parameters per kind") < out.index("Training memory at a glance") < out.index("Recommendation")
    assert "plan: batch 1 x 2,048 tokens" in out and "peftaudit recommend openai-community/gpt2" in out
    code, text, _ = _run(["report", "gpt2", "--no-cache", "--json"], capsys)
    data = json.loads(text)
    jsonschema.validate(data, SCHEMA)
    memory = data["memory_at_a_glance"]
    assert [r["method"] for r in memory["rows"]] == ["full", "full", "lora", "lora", "qlora", "qlora"]
    assert memory["unavailable"] is None and data["recommendation"]["method"] == "lora"
    # GPT-2's config gives 1,024 positions: the default plan's 2,048 tokens exceed them, and every row says so.
    assert data["dims"]["max_position_embeddings"] == 1024
    assert all("seq-len-exceeds-max-positions" in r["warnings"] for r in memory["rows"])
    assert "Estimator warnings: seq-len-exceeds-max-positions (full, lora, qlora)" in out
    from peftaudit.report import Report

    assert Report.from_dict(data).to_dict() == data


def test_params_only_is_the_counts_alone(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.report import RenderOptions, audit
    from peftaudit.report.render.terminal import TerminalRenderer

    code, out, _ = _run(["report", "gpt2", "--no-cache", "--params-only", "--width", "100"], capsys)
    assert code == 0
    counts_only = TerminalRenderer().render(audit("gpt2", use_cache=False), RenderOptions(width=100))
    assert out == counts_only and "at a glance" not in out
    _, text, _ = _run(["report", "gpt2", "--no-cache", "--params-only", "--json"], capsys)
    data = json.loads(text)
    assert data["memory_at_a_glance"] is None and data["recommendation"] is None


def test_params_only_with_memory_flags_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["report", "gpt2", "--params-only", "--method", "lora"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("peftaudit: error: --params-only") and err.count("\n") == 1


def test_a_model_the_estimator_cannot_size_gets_its_counts_and_one_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    folder = tmp_path / "resnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(RESNET))
    code, out, _ = _run(["report", str(folder), "--width", "100", "--no-cache"], capsys)
    assert code == 0
    assert "Parameters per layer" in out
    reason = [line for line in out.splitlines() if "Training memory at a glance" in line]
    assert len(reason) == 1 and "no estimate: ResNetForImageClassification" in reason[0]
    assert "Checkpointing" not in out  # no table
    code, text, _ = _run(["report", str(folder), "--json", "--no-cache"], capsys)
    data = json.loads(text)
    jsonschema.validate(data, SCHEMA)
    memory = data["memory_at_a_glance"]
    assert memory["rows"] == [] and "no activation estimate" in memory["unavailable"]
    # The counts are exact: transformers' own count of the same config.
    assert data["params"]["total"] == _transformers_count(RESNET)


def _transformers_count(config: dict[str, Any]) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(AutoConfig.for_model(config["model_type"], **fields))
    return sum(p.numel() for p in model.parameters())


def _imports(argv: list[str], env: dict[str, str]) -> tuple[set[str], dict[str, Any]]:
    """Run ``peftaudit ARGV --json`` in a fresh interpreter: the top-level modules it imported, and its JSON."""
    script = (
        "import sys\nfrom peftaudit.cli import main\n"
        f"assert main({[*argv, '--json', '-o', 'out.json']!r}) == 0\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    cwd = Path(env["PEFTAUDIT_CACHE_DIR"]).parent  # out.json beside the cache, not in it
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env}, cwd=cwd, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split()), json.loads((Path(cwd) / "out.json").read_text())


def test_one_cache_entry_serves_the_default_and_params_only_without_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(cache))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny.TINY["llama"]))
    # --params-only first: the entry holds the counts; the default report then completes it in place.
    assert main(["report", str(model), "--params-only", "--json"]) == 0
    capsys.readouterr()
    (entry,) = cache.glob("*.json")
    assert json.loads(entry.read_text())["memory_at_a_glance"] is None
    assert main(["report", str(model), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert [p.name for p in cache.glob("*.json")] == [entry.name]
    assert json.loads(entry.read_text())["memory_at_a_glance"] == default["memory_at_a_glance"] is not None
    env = {"PEFTAUDIT_CACHE_DIR": str(cache)}
    for argv, glance in ((["report", str(model)], True), (["report", str(model), "--params-only"], False)):
        modules, data = _imports(argv, env)
        assert not modules & {"torch", "transformers"}, argv
        assert (data["memory_at_a_glance"] is not None) is glance
        assert data["params"] == default["params"]
    assert [p.name for p in cache.glob("*.json")] == [entry.name]


def test_a_cached_glance_is_redone_when_a_class_gpu_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftaudit.gpus import catalog

    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny.TINY["llama"]))
    assert main(["report", str(model), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["memory_at_a_glance"]
    assert before["rows"][0]["fits_class_gb"] == 24
    # The user's GPU file says their A10G has 0.01 GiB usable: nothing fits it any more.
    gpus = tmp_path / "gpus.toml"
    gpus.write_text('[gpu."A10G"]\nusable_gib = 0.01\n')
    monkeypatch.setenv("PEFTAUDIT_GPUS_FILE", str(gpus))
    catalog.reset()
    try:
        assert main(["report", str(model), "--json"]) == 0
        after = json.loads(capsys.readouterr().out)["memory_at_a_glance"]
    finally:
        monkeypatch.delenv("PEFTAUDIT_GPUS_FILE")
        catalog.reset()
    assert after["gpu_classes"][0]["usable_bytes"] == round(0.01 * 2**30)
    assert [(r["fits_class_gb"], r["too_small_class_gb"]) for r in after["rows"]] == [(48, 24)] * 6


def test_the_readme_shows_the_default_report_as_it_is() -> None:
    # The quick start's output block is the golden file of the same command (trailing blanks trimmed).
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    command = f"$ peftaudit report {LLAMA_8B} --width 100\n"
    shown = readme[readme.index(command) + len(command) :].split("\n```", 1)[0]
    golden = (root / "tests" / "golden" / "cli" / "report-8b.txt").read_text(encoding="utf-8")
    assert shown == "\n".join(line.rstrip() for line in golden.rstrip("\n").splitlines()), (
        "README.md's quick start output is stale: paste tests/golden/cli/report-8b.txt"
    )
