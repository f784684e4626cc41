"""adapter_config.json read as peft reads it: defaults, patterns, rsLoRA, and refusals.

Each expectation is checked against peft itself: the scale and rank peft gives
every LoRA layer when it builds or loads the adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
from verify_builders import edit_json, lora_checkpoints, scale_merge

from peftaudit.verification import CheckpointError, Problem, verify
from peftaudit.verification.lora_config import DEFAULT_ALPHA, DEFAULT_R, read_lora_settings

PATTERNS = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj"],
    # Overlapping keys: peft takes the first that matches, in the file's order.
    "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 6, "k_proj": 3},
    "alpha_pattern": {"model.layers.1.self_attn.q_proj": 5, "q_proj": 3, r"v_pr.j": 12},
}


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_defaults_are_peft_defaults() -> None:
    config = peft.LoraConfig()
    assert (config.r, config.lora_alpha) == (DEFAULT_R, DEFAULT_ALPHA)


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_and_rank_of_every_layer_match_peft(tmp_path: Path, tiny: Callable[..., Any], rslora: bool) -> None:
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(**PATTERNS, use_rslora=rslora))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    settings = read_lora_settings(saved, "adapter_config.json")
    layers = lora_layers(model)
    assert len(layers) == 6
    for module, layer in layers.items():
        scale = settings.scale_for(module)
        assert (scale.value, scale.rank) == (pytest.approx(layer.scaling["default"]), layer.r["default"]), module
    # The cases the patterns were written for, spelled out.
    assert settings.rank_for("model.layers.0.self_attn.q_proj") == (2, r"layers\.0\.self_attn\.q_proj")
    assert settings.rank_for("model.layers.1.self_attn.q_proj") == (6, "q_proj")
    assert settings.rank_for("model.layers.1.self_attn.v_proj") == (4, None)


def test_missing_lora_alpha_means_peft_default_8(tmp_path: Path) -> None:
    # Trained with lora_alpha 16 (scale 4); without the key, peft loads it with 8 (scale 2).
    base, adapter, merged = lora_checkpoints(tmp_path, lora_alpha=16)
    assert verify(base, merged, adapter=adapter).ok
    edit_json(adapter / "adapter_config.json", lambda c: c.pop("lora_alpha"))
    loaded = peft.PeftModel.from_pretrained(load(base), adapter)
    assert {layer.scaling["default"] for layer in lora_layers(loaded).values()} == {2.0}
    verdict = verify(base, merged, adapter=adapter)
    mismatch = verdict.by_problem(Problem.MERGE_MISMATCH)
    assert len(mismatch) == 4
    for finding in mismatch:
        assert finding.scale is not None
        assert finding.scale.expected == 2.0 and finding.scale.found == pytest.approx(4.0, rel=1e-3)
        assert finding.scale.rule == "lora_alpha 8 (peft's default) / r 4"
    assert verdict.expectations == (
        "adapter",
        f"{adapter / 'adapter_config.json'} (lora_alpha missing: peft's default 8)",
    )


def test_missing_lora_alpha_with_the_default_scale_passes(tmp_path: Path) -> None:
    base, adapter, merged = lora_checkpoints(tmp_path)
    edit_json(adapter / "adapter_config.json", lambda c: c.pop("lora_alpha"))
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 4


def test_a_merge_of_another_adapter_finds_no_scale(tmp_path: Path) -> None:
    base, _, merged = lora_checkpoints(tmp_path / "one")
    _, other, _ = lora_checkpoints(tmp_path / "two", seed=1)
    mismatch = verify(base, merged, adapter=other).by_problem(Problem.MERGE_MISMATCH)
    assert len(mismatch) == 4
    assert all(f.scale is not None and f.scale.found is None for f in mismatch)
    assert all(f.message.endswith("it is no multiple of B@A") for f in mismatch)


def test_audit_names_the_config_file_as_the_origin(tmp_path: Path) -> None:
    base, adapter, merged = lora_checkpoints(tmp_path)
    scale_merge(base, merged, 1.0)
    verdict = verify(base, adapter=adapter)
    assert verdict.ok and verdict.expectations == (str(adapter / "adapter_config.json"),)


def test_factors_of_another_rank_than_the_config_says(tmp_path: Path) -> None:
    base, adapter, _ = lora_checkpoints(tmp_path)
    edit_json(adapter / "adapter_config.json", lambda c: c.update(r=8))
    with pytest.raises(RuntimeError, match="size mismatch"):  # peft cannot load it either
        peft.PeftModel.from_pretrained(load(base), adapter)
    reshaped = verify(base, adapter=adapter).by_problem(Problem.RESHAPED)
    assert len(reshaped) == 4 and all(f.name.endswith("lora_A.weight") for f in reshaped)
    assert "has rank 4 but" in reshaped[0].message and "gives r 8" in reshaped[0].message


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"r": "x"}, "r 'x' is not a positive integer"),
        ({"r": 0}, "r 0 is not a positive integer"),
        ({"r": 4.0}, "r 4.0 is not a positive integer"),
        ({"lora_alpha": "x"}, "lora_alpha 'x' is not a finite number"),
        ({"lora_alpha": True}, "lora_alpha True is not a finite number"),
        ({"use_rslora": "yes"}, "use_rslora 'yes' is not true or false"),
        ({"alpha_pattern": {"([": 16}}, "alpha_pattern key '([' is not a regular expression"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj'] 'big' is not a finite number"),
        ({"rank_pattern": ["q_proj", 2]}, "rank_pattern is not a JSON object"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj'] -1 is not a positive integer"),
        ({"modules_to_save": "(["}, "modules_to_save '([' is not a regular expression"),
        ({"bias": "some"}, "bias 'some' is not one of none, all, lora_only"),
        ({"peft_type": 3}, "peft_type 3 is not a peft method name"),
    ],
)
def test_malformed_values_are_refused_naming_the_key(edit: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        read_lora_settings({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **edit}, "a/adapter_config.json")
    assert str(caught.value).startswith("a/adapter_config.json: ")
    assert message in str(caught.value)


def test_no_config_is_refused() -> None:
    with pytest.raises(CheckpointError, match=r"a/adapter_config\.json: missing; peft cannot load"):
        read_lora_settings(None, "a/adapter_config.json")


def test_the_config_recorded_in_a_snapshot_is_checked_too(tmp_path: Path) -> None:
    from peftaudit.verification import snapshot

    base, adapter, merged = lora_checkpoints(tmp_path)
    edit_json(adapter / "adapter_config.json", lambda c: c.update(lora_alpha="x"))
    saved = snapshot(adapter).save(tmp_path / "adapter.json")
    with pytest.raises(CheckpointError, match=r"recorded in .*adapter\.json: lora_alpha 'x'"):
        verify(base, merged, adapter=saved)


def load(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base)
