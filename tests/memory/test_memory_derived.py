"""Step profiles derived from traces: the same step the real libraries run, replayed to full depth.

Every comparison is against :func:`peftaudit.memory.trace`, one real training step of the
model with transformers, peft and torch on fake tensors, at a batch size and sequence length
the profile was not fitted on.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from memory_models import CONFIGS, build, reduced_config, rel_err

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.memory.derived import derivation
from peftaudit.memory.derived.kinds import stacks
from peftaudit.memory.derived.windows import base_length, regime, windows
from peftaudit.memory.tracing.run import run_trace
from peftaudit.plugins import memory_methods
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import lookup


def _catalog(model_id: str, depth: int | None = None) -> dict[str, Any]:
    entry = lookup(model_id)
    assert entry is not None
    return reduced_config(entry.config, depth) if depth else dict(entry.config)


def _traced(config: dict[str, Any], plan: TrainingPlan) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace(build_from_config(config, model_id="check"), plan)


def _kept(model_id: str) -> dict[str, tuple[int, ...]]:
    inventory = take_inventory(build_from_config(_catalog(model_id), model_id=model_id))
    adaptation = memory_methods()["lora"].adapt(inventory, TrainingPlan())
    return {s.path: s.kept for s in stacks(inventory, adaptation)}


@pytest.mark.parametrize(
    ("model_id", "kept"),
    [
        # Gemma 3: five sliding-window layers, then a global one.
        ("google/gemma-3-12b-pt", {"model.language_model.layers": (0, 1, 5)}),
        # DeepSeek-V3: three dense layers, then MoE.
        ("deepseek-ai/DeepSeek-V3", {"model.layers": (0, 1, 3)}),
        # gpt-oss: sliding and full attention alternate.
        ("openai/gpt-oss-20b", {"model.layers": (0, 1, 2)}),
        # T5: an encoder and a decoder stack; the first block of each holds the position bias.
        ("google-t5/t5-small", {"encoder.block": (0, 1), "decoder.block": (0, 1)}),
    ],
)
def test_a_depth_reduced_copy_keeps_one_layer_of_each_kind(model_id: str, kept: dict[str, Any]) -> None:
    found = _kept(model_id)
    assert {k: v for k, v in found.items() if "vision" not in k} == kept


def test_attention_windows_choose_the_traced_lengths() -> None:
    config = {"sliding_window": 4096, "text_config": {"attention_chunk_size": 8192}}
    assert windows(config) == (4096, 8192)
    assert regime(config, 4095) == (False, False)
    assert regime(config, 4096) == (True, False)  # a sequence as long as the window builds its mask
    assert base_length(config, 2048) == 64  # 64 and 128 stay short of the window
    assert base_length(config, 5000) == 4096  # 4096 and 8192: past the window, short of the chunk
    assert base_length(config, 10_000) == 8192
    assert windows({"sliding_window": 131072, "use_sliding_window": False}) == ()  # Qwen2's unused one
    assert base_length({}, 100, longer_than=80) == 128  # room for text after the prompt tokens


PLANS = {
    "lora": {"method": "lora"},
    "qlora-ckpt": {"method": "qlora", "gradient_checkpointing": True},
    "full-mixed": {"method": "full", "precision": "bf16-mixed"},
    "accumulate": {"method": "lora", "gradient_accumulation": 2},
    "prompt": {"method": "prompt-tuning", "num_virtual_tokens": 20},
    "inference": {"method": "freeze", "optimizer": "none"},
    "eager-fp32": {"method": "lora", "attention": "eager", "precision": "fp32"},
}


@pytest.mark.slow
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_derived_profile_equals_the_trace(plan_name: str) -> None:
    """OPT has no hand-written program: the profile is derived, and replays the trace exactly."""
    config = _catalog("facebook/opt-125m", depth=4)
    plan = TrainingPlan(batch_size=3, seq_len=100, **PLANS[plan_name])
    estimated = estimate(take_inventory(build_from_config(config, model_id="opt")), plan)
    assert "approximate-activations" not in [w.code for w in estimated.warnings]
    traced = _traced(config, plan)
    assert abs(rel_err(estimated.allocated_bytes, traced.allocated_bytes)) < 0.005, (
        estimated.components,
        traced.components,
    )
    assert len(estimated.activations_per_layer) == 4


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["facebook/opt-125m", "google-t5/t5-small"])
def test_derived_profile_equals_a_full_depth_trace(model_id: str) -> None:
    """Small models traced at their full depth (12 layers; 6 + 6 for T5's encoder and decoder)."""
    config = _catalog(model_id)
    plan = TrainingPlan(batch_size=3, seq_len=100)
    estimated = estimate(take_inventory(build_from_config(config, model_id=model_id)), plan)
    traced = _traced(config, plan)
    assert abs(rel_err(estimated.allocated_bytes, traced.allocated_bytes)) < 0.005
    assert estimated.peak_phase == traced.peak_phase


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_id",
    [
        "meta-llama/Llama-3.2-1B",
        "Qwen/Qwen3-0.6B",
        "openai-community/gpt2",
        "google-bert/bert-base-uncased",
        "Qwen/Qwen2.5-0.5B",
        "FacebookAI/roberta-base",
    ],
)
@pytest.mark.parametrize("plan_name", ["lora", "qlora-ckpt", "full-mixed"])
def test_hand_written_programs_agree_with_the_derived_profile(model_id: str, plan_name: str) -> None:
    """The programs (kept for speed: no trace at all) against the derived profile, at catalog sizes."""
    inventory = take_inventory(build_from_config(_catalog(model_id, depth=4), model_id=model_id))
    plan = TrainingPlan(batch_size=2, seq_len=512, **PLANS[plan_name])
    program = estimate(inventory, plan)
    derived = estimate(inventory, plan, activations="derived")
    assert "approximate-activations" not in [w.code for w in derived.warnings]
    assert abs(rel_err(program.allocated_bytes, derived.allocated_bytes)) <= 0.03


def test_gemma2_is_derived_with_the_attention_it_can_run() -> None:
    """transformers refuses SDPA with Gemma 2's logit soft-capping: it trains with eager attention."""
    config = _catalog("google/gemma-2-2b", depth=2)
    plan = TrainingPlan(batch_size=2, seq_len=256, method="lora")
    estimated = estimate(take_inventory(build_from_config(config, model_id="g")), plan)
    (warning,) = [w for w in estimated.warnings if w.code == "attention-unsupported"]
    assert "eager attention" in warning.message
    # The trace says the same and runs eager, where it used to stop with transformers' own ValueError.
    traced = _traced(config, plan)
    (note,) = [w for w in traced.warnings if w.code == "attention-unsupported"]
    assert "traced with eager attention" in note.message and traced.plan["attention"] == "eager"
    with pytest.raises(ValueError, match="softcap"):
        run_trace(build_from_config(config, model_id="check"), plan)  # the refusal is transformers' own


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "profiles"
    monkeypatch.setenv("PEFTAUDIT_PROFILE_DIR", str(folder))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    return folder


def _opt_inventory() -> Any:
    return take_inventory(build_from_config(_catalog("facebook/opt-125m", depth=2), model_id="opt"))


def test_a_stored_profile_is_read_back_without_tracing(profile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = TrainingPlan(seq_len=128)
    first = estimate(_opt_inventory(), plan)
    (entry,) = profile_dir.glob("*.json")

    def no_trace(*_args: Any) -> Any:
        raise AssertionError("traced again")

    monkeypatch.setattr(derivation, "_derive", no_trace)
    again = estimate(_opt_inventory(), dataclasses.replace(plan, batch_size=4))  # another batch: same profile
    assert again.components["activations"] > first.components["activations"]
    assert estimate(_opt_inventory(), plan).components == first.components
    assert json.loads(entry.read_text())["format"] >= 1


@pytest.mark.parametrize("content", ["", "null", "{", '{"format": 1, "segments": "x"}', "[1, 2]"])
def test_an_unreadable_stored_profile_is_derived_again(profile_dir: Path, content: str) -> None:
    plan = TrainingPlan(seq_len=128)
    good = estimate(_opt_inventory(), plan)
    (entry,) = profile_dir.glob("*.json")
    entry.write_text(content)
    assert estimate(_opt_inventory(), plan).components == good.components
    assert json.loads(entry.read_text())["format"] >= 1  # overwritten with a good entry


def test_no_store_when_caching_is_off(profile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTAUDIT_NO_CACHE", "1")
    estimate(_opt_inventory(), TrainingPlan(seq_len=128))
    assert not profile_dir.exists()


def test_a_model_that_needs_remote_code_keeps_a_named_stand_in() -> None:
    """The trace never runs a repository's own code: the stand-in says so."""
    inventory = take_inventory(build(CONFIGS["llama"]))
    remote = dataclasses.replace(
        inventory,
        model_type="my_model",
        config={"model_type": "my_model", "auto_map": {"AutoModelForCausalLM": "modeling.MyModel"}},
    )
    e = estimate(remote, TrainingPlan(seq_len=64))
    (warning,) = [w for w in e.warnings if w.code == "approximate-activations"]
    assert "pass --trust-remote-code" in warning.message
    assert e.total_bytes > e.components["cuda_context"]
