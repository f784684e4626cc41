"""Auditing a saved adapter against its base: ``verify(base, adapter=...)`` with no AFTER."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file

from peftaudit.verification import Cause, Problem, verify

QV = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def saved(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None], steps: int = 2, **config: Any
) -> tuple[Path, Path]:
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{**QV, **config}))
    if steps:
        train(wrapped, steps=steps)
    wrapped.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def edit_adapter(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(adapter / "adapter_model.safetensors")
    edit(state)
    save_file(state, adapter / "adapter_model.safetensors")


def test_trained_adapter_passes(tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    base, adapter = saved(tmp_path, tiny, train)
    verdict = verify(base, adapter=adapter, expect=["lora_*"])
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 4


def test_untrained_adapter_has_lora_b_zero(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter = saved(tmp_path, tiny, train, steps=0)
    verdict = verify(base, adapter=adapter)
    unchanged = verdict.by_problem(Problem.UNCHANGED)
    assert len(unchanged) == 4 and {f.cause for f in unchanged} == {Cause.LORA_B_ZERO}
    assert all(f.name.endswith("lora_B.weight") for f in unchanged)


def test_empty_zero3_tensors_nan_and_missing_targets(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter = saved(tmp_path, tiny, train)
    prefix = "base_model.model.model.layers"

    def edit(state: dict[str, torch.Tensor]) -> None:
        state[f"{prefix}.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(0)  # ZeRO-3 without gathering
        state[f"{prefix}.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("inf")
        state[f"{prefix}.7.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 64)
        state[f"{prefix}.7.self_attn.q_proj.lora_B.weight"] = torch.ones(64, 4)

    edit_adapter(adapter, edit)
    verdict = verify(base, adapter=adapter)
    empty = verdict.by_problem(Problem.UNCHANGED)
    assert [(f.name, f.cause) for f in empty] == [(f"{prefix}.0.self_attn.q_proj.lora_A.weight", Cause.EMPTY_TENSOR)]
    nonfinite = verdict.by_problem(Problem.NONFINITE)
    assert [f.name for f in nonfinite] == [f"{prefix}.1.self_attn.v_proj.lora_B.weight"]
    assert nonfinite[0].message == "1 NaN/Inf elements"
    added = verdict.by_problem(Problem.ADDED)
    assert [f.message for f in added] == ["targets model.layers.7.self_attn.q_proj, which the base model does not have"]


def test_factor_shapes_must_fit_the_base(tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    base, adapter = saved(tmp_path, tiny, train)
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    edit_adapter(adapter, lambda s: s.__setitem__(name, torch.ones(48, 4)))
    reshaped = verify(base, adapter=adapter).by_problem(Problem.RESHAPED)
    assert [f.name for f in reshaped] == [name]
    assert "do not fit model.layers.0.self_attn.v_proj.weight [32, 64]" in reshaped[0].message


def test_saved_copies_follow_the_config_or_the_patterns(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter = saved(tmp_path, tiny, train, modules_to_save=["lm_head"])
    copy = "base_model.model.lm_head.weight"
    assert copy in load_file(adapter / "adapter_model.safetensors")
    assert verify(base, adapter=adapter).ok  # the config says to save and train lm_head
    strict = verify(base, adapter=adapter, expect=["lora_*"])
    finding = strict.by_problem(Problem.UNEXPECTED_CHANGE)
    assert [(f.name, f.cause) for f in finding] == [(copy, Cause.LEFT_TRAINABLE)]
    assert finding[0].size is not None and finding[0].size.exact
    assert verify(base, adapter=adapter, expect=["lora_*"], allow=["lm_head"]).ok


def test_saved_copy_equal_to_the_base_was_never_trained(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter = saved(tmp_path, tiny, train, modules_to_save=["lm_head"])
    original = load_file(base / "model.safetensors")["lm_head.weight"]
    edit_adapter(adapter, lambda s: s.__setitem__("base_model.model.lm_head.weight", original))
    unchanged = verify(base, adapter=adapter).by_problem(Problem.UNCHANGED)
    assert [f.name for f in unchanged] == ["base_model.model.lm_head.weight"]
    assert "equals the base: never trained" in unchanged[0].message


def test_an_expectation_that_matches_nothing_fails(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter = saved(tmp_path, tiny, train)
    verdict = verify(base, adapter=adapter, expect=["lora_*", "classifier"])
    assert [(f.problem, f.name) for f in verdict.failures] == [(Problem.UNMATCHED_PATTERN, "classifier")]


def test_minilm_classifier_adapter_against_the_bare_base(
    tmp_path: Path, minilm_path: Path, minilm_classifier: Callable[..., Any]
) -> None:
    # The base checkpoint is a bare BertModel; the adapter was trained on BertForSequenceClassification.
    wrapped = peft.get_peft_model(
        minilm_classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"])
    )
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_()
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "score"]
    verdict = verify(minilm_path, adapter=tmp_path)
    assert verdict.ok, verdict.explain()
    assert verdict.intended_changed == 6  # the six query adapters found under the bare names
    strict = verify(minilm_path, adapter=tmp_path, expect=["lora_*"])
    assert sorted(f.name for f in strict.by_problem(Problem.ADDED)) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]


def test_two_saves_of_one_adapter_expect_every_factor_to_move(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(**QV, modules_to_save=["lm_head"]))
    train(model)
    model.save_pretrained(tmp_path / "step-2")
    train(model, seed=1)
    model.save_pretrained(tmp_path / "step-4")
    verdict = verify(tmp_path / "step-2", tmp_path / "step-4")
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 8 and verdict.changed == 9  # + the lm_head copy
    stalled = verify(tmp_path / "step-4", tmp_path / "step-4")
    assert len(stalled.by_problem(Problem.UNCHANGED)) == 8
