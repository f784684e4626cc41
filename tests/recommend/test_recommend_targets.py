"""Presets resolved against real architectures, counted exactly as peft creates them.

Every count is cross-checked against ``peft.get_peft_model`` on the meta-device
model: the names a preset writes must make peft adapt exactly the modules the
preset selects, and the parameter count must be peft's own.
"""

from __future__ import annotations

from typing import Any

import pytest
import recommend_tiny as rt
from peft import LoraConfig, get_peft_model

from peftaudit.inventory import take_inventory
from peftaudit.recommend.rank import hyperparameters_at
from peftaudit.recommend.targets import (
    PRESETS,
    TargetError,
    TargetSpec,
    count_adapters,
    names_for,
    resolve_preset,
)

#: (model, preset) pairs whose preset selects nothing there.
NOT_APPLICABLE: set[tuple[str, str]] = set()

MODELS = [
    "llama",
    "gpt2",
    "bert",
    "t5",
    "opt",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "deepseek_v3",
    "bert_cls",
]


def _peft(model: Any, spec: TargetSpec, rank: int, **extra: Any) -> Any:
    config = LoraConfig(
        r=rank,
        target_modules=spec.pattern if spec.pattern is not None else list(spec.names),
        target_parameters=list(spec.parameters) or None,
        modules_to_save=list(spec.modules_to_save) or None,
        fan_in_fan_out=spec.fan_in_fan_out,
        **extra,
    )
    return get_peft_model(model, config)


def _adapted(peft_model: Any) -> tuple[set[str], set[str]]:
    """Module paths with a LoRA adapter and parameter paths wrapped by ParamWrapper, in base-model names."""
    modules, params = set(), set()
    for name, module in peft_model.base_model.model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            base = name.replace(".base_layer", "")
            params.add(f"{base}.{module.parameter_name}")
        elif hasattr(module, "lora_A") and type(module).__name__ != "ParamWrapper":
            modules.add(name.replace(".base_layer", ""))
    return modules, params


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_count_and_modules_match_peft(name: str, preset: str) -> None:
    task = "classification" if name == "bert_cls" else "instruct"
    inventory = take_inventory(rt.build(name))
    try:
        selection = resolve_preset(inventory, preset, task=task)
    except TargetError:
        pytest.skip(f"{preset} selects nothing on {name}")
    hyper = hyperparameters_at(inventory, selection, 4)
    ours = count_adapters(inventory, selection.spec, 4, rank_pattern=hyper.rank_patterns())
    peft_model = _peft(rt.build(name), selection.spec, 4, rank_pattern=hyper.rank_patterns())
    assert ours.trainable == peft_model.get_nb_trainable_parameters()[0]
    modules, params = _adapted(peft_model)
    assert modules == set(selection.modules)
    assert params == set(selection.parameters)
    assert set(ours.module_paths) == modules


def test_every_preset_applies_to_the_dense_and_moe_families() -> None:
    # mlp on an MoE model is its experts; nothing is left without a meaning.
    for name in ("llama", "mixtral", "gpt_oss"):
        inventory = take_inventory(rt.build(name))
        for preset in PRESETS:
            selection = resolve_preset(inventory, preset)
            assert selection.modules or selection.parameters, (name, preset)


def test_falcon_linear_subclass_is_adaptable() -> None:
    inventory = take_inventory(rt.build("falcon"))
    selection = resolve_preset(inventory, "all-linear")
    ours = count_adapters(inventory, selection.spec, 4)
    assert ours.trainable == _peft(rt.build("falcon"), selection.spec, 4).get_nb_trainable_parameters()[0]


def test_gpt2_names_tell_the_two_c_proj_apart() -> None:
    inventory = take_inventory(rt.build("gpt2"))
    assert resolve_preset(inventory, "attention").spec.names == ("c_attn", "attn.c_proj")
    assert resolve_preset(inventory, "mlp").spec.names == ("c_fc", "mlp.c_proj")
    # all-linear takes both, so the short name is exact.
    assert resolve_preset(inventory, "all-linear").spec.names == ("c_attn", "c_proj", "c_fc")
    assert resolve_preset(inventory, "all-linear").spec.fan_in_fan_out is True


def test_bert_mlp_needs_a_pattern_and_both_forms_match_peft() -> None:
    inventory = take_inventory(rt.build("bert"))
    selection = resolve_preset(inventory, "mlp")
    spec = selection.spec
    # BERT's MLP output is "layer.N.output.dense", the attention output "attention.output.dense".
    assert spec.pattern is not None and spec.needs_pattern
    assert spec.names == ("intermediate.dense", "0.output.dense", "1.output.dense")
    as_list = TargetSpec(names=spec.names)
    for form in (spec, as_list):
        peft_model = _peft(rt.build("bert"), form, 4)
        assert _adapted(peft_model)[0] == set(selection.modules)


def test_deepseek_dense_mlp_names_are_dropped_because_peft_retargets_them() -> None:
    inventory = take_inventory(rt.build("deepseek_v3"))
    selection = resolve_preset(inventory, "all-linear")
    assert not any(n in selection.spec.names for n in ("gate_proj", "up_proj", "down_proj"))
    assert any("re-targets" in note for note in selection.notes)
    # Naming them anyway: peft adapts the fused experts instead of the dense MLP.
    spec = TargetSpec(names=("gate_proj", "up_proj", "down_proj"))
    ours = count_adapters(inventory, spec, 4)
    modules, params = _adapted(_peft(rt.build("deepseek_v3"), spec, 4))
    assert set(ours.module_paths) == modules == set()
    assert set(ours.parameter_paths) == params and params


def test_classification_head_is_saved_not_adapted() -> None:
    inventory = take_inventory(rt.build("bert_cls"))
    selection = resolve_preset(inventory, "all-linear", task="classification")
    assert selection.spec.modules_to_save == ("classifier",)
    assert "classifier" not in selection.modules
    count = count_adapters(inventory, selection.spec, 4)
    assert count.saved_params == 64 * 3 + 3


def test_output_head_is_the_output_embedding_not_a_width() -> None:
    # bert_cls has intermediate_size == vocab_size: its MLP maps to "the vocabulary", yet it has no output head.
    assert take_inventory(rt.build("bert_cls")).output_head is None
    assert take_inventory(rt.build("bert")).output_head == "cls.predictions.decoder"
    assert take_inventory(rt.build("gpt2")).output_head == "lm_head"


def test_unknown_preset_is_a_one_line_error() -> None:
    inventory = take_inventory(rt.build("llama"))
    with pytest.raises(TargetError, match="unknown target preset 'everything'"):
        resolve_preset(inventory, "everything")


def test_user_targets_parse_like_peft_reads_them() -> None:
    assert TargetSpec.from_user("q_proj, v_proj").names == ("q_proj", "v_proj")
    assert TargetSpec.from_user("all-linear").pattern == "all-linear"
    assert TargetSpec.from_user(r".*\.q_proj").pattern == r".*\.q_proj"
    assert TargetSpec.from_user("c_attn").names == ("c_attn",)
    assert TargetSpec.from_user(["a", "b"]).target_modules == ("a", "b")


def test_names_for_prefers_short_unambiguous_suffixes() -> None:
    universe = ["m.layers.0.attn.proj", "m.layers.0.mlp.proj", "m.layers.1.attn.proj", "m.layers.1.mlp.proj"]
    assert names_for(["m.layers.0.attn.proj", "m.layers.1.attn.proj"], universe) == (("attn.proj",), None)
    assert names_for(universe, universe) == (("proj",), None)
    names, pattern = names_for(["m.layers.0.attn.proj"], universe)
    assert names == ("0.attn.proj",) and pattern is None  # one layer only: the generalised regex over-matches


@pytest.mark.parametrize(
    ("spec_id", "rank", "expected"),
    [
        # peft-facts.md reference counts (trainable parameters on the meta model).
        ("meta-llama/Llama-2-7b-hf", 16, 39_976_960),
        ("gpt2", 16, 2_359_296),
        ("mistralai/Mixtral-8x7B-v0.1", 16, 359_665_664),
    ],
)
def test_literal_all_linear_matches_published_peft_counts(spec_id: str, rank: int, expected: int) -> None:
    from peftaudit.sources.base import SourceOptions, resolve

    resolved, source = resolve(spec_id)
    inventory = take_inventory(source.build(resolved, SourceOptions()))
    assert count_adapters(inventory, TargetSpec(pattern="all-linear"), rank).trainable == expected


def test_full_size_mixtral_experts_preset_matches_peft() -> None:
    from peftaudit.sources.base import SourceOptions, resolve

    resolved, source = resolve("mistralai/Mixtral-8x7B-v0.1")
    inventory = take_inventory(source.build(resolved, SourceOptions()))
    selection = resolve_preset(inventory, "all-linear+experts")
    hyper = hyperparameters_at(inventory, selection, 16)
    ours = count_adapters(inventory, selection.spec, 16, rank_pattern=hyper.rank_patterns())
    peft_model = _peft(source.build(resolved, SourceOptions()), selection.spec, 16, rank_pattern=hyper.rank_patterns())
    assert ours.trainable == peft_model.get_nb_trainable_parameters()[0]
    # Experts at rank 8 (16 / 2 per token): 32 layers x 8 experts x 8 x ((28672 + 4096) + (4096 + 14336)).
    experts = sum(a.params for a in ours.adapters if a.parameter is not None)
    assert experts == 32 * 8 * 8 * (28672 + 4096 + 4096 + 14336)


def test_modules_without_a_role_are_named_in_the_notes() -> None:
    from peftaudit.recommend.facts import model_facts
    from peftaudit.recommend.recommendation import RecommendRequest, recommend

    model = rt.build("gpt_neox")
    inventory = take_inventory(model)
    # GPT-NeoX's attention output is "attention.dense": no built-in rule names it.
    assert inventory.module("gpt_neox.layers.0.attention.dense").role is None  # type: ignore[union-attr]
    rec = recommend(inventory, model_facts(model, model_id="tiny-gpt_neox"), RecommendRequest(preset="attention"))
    assert any("no architecture role (gpt_neox.layers.*.attention.dense)" in n for n in rec.notes)
    assert rec.recipe.targets.names == ("query_key_value",)
    full = recommend(inventory, model_facts(model, model_id="tiny-gpt_neox"))
    assert full.recipe.targets.names == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
