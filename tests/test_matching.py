"""peft's matching rules (peftaudit.matching) against peft's own functions, and across the catalog.

The unit tests ask peft's ``check_target_module_exists``, ``get_pattern_key``
and ``_maybe_include_all_linear_layers`` the same questions as
:mod:`peftaudit.matching`. The catalog test holds the three users of those
rules to one answer: for every bundled model, what the recommender's preset
selects, what the memory estimator adapts and what ``get_peft_model`` adapts on
the meta-device model (cut to ``DEPTH`` layers per stack, every kind of module kept)
are the same modules.
"""

from __future__ import annotations

import itertools
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tiny
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils.other import get_pattern_key

from peftaudit.architecture import ModuleRole
from peftaudit.inventory import take_inventory
from peftaudit.matching import (
    all_linear,
    is_all_linear,
    module_targeted,
    parameter_targeted,
    pattern_key,
    saved,
    targeted_modules,
)
from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.targets import lora_adapters
from peftaudit.recommend.targets import TargetError, language_model_scope, resolve_preset
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import entries

sys.path.append(str(Path(__file__).parent / "memory"))  # as pytest adds it for the tests there
from memory_models import reduced_config

KEYS = (
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.10.mlp.down_proj",
    "model.layers.1.mlp.experts.3.down_proj",
    "model.layers.0.self_attn.xq_proj",
    "transformer.h.1.attn.c_attn",
    "lm_head",
    "model.lm_head",
    "score",
)

TARGETS: tuple[Any, ...] = (
    ["q_proj", "v_proj"],
    ["self_attn.q_proj", "down_proj"],
    ["model.layers.0.self_attn.q_proj"],
    r".*\.(q|v)_proj",
    r"model\.layers\.1\..*",
    "q_proj",
    ["c_attn", "lm_head"],
)
EXCLUDES: tuple[Any, ...] = (None, ["v_proj"], r".*\.layers\.1\..*")
SAVED: tuple[Any, ...] = (None, ["lm_head"], ["self_attn"])
LAYERS: tuple[tuple[Any, Any], ...] = ((None, None), ([0], None), (1, None), ([1, 10], "layers"), ([1], "h"))


def _config(targets: Any, exclude: Any, to_save: Any, layers: tuple[Any, Any]) -> SimpleNamespace:
    return SimpleNamespace(
        target_modules=targets,
        exclude_modules=exclude,
        modules_to_save=to_save,
        target_parameters=None,
        layers_to_transform=layers[0],
        layers_pattern=layers[1],
    )


def test_module_targeted_is_peft_check_target_module_exists() -> None:
    for targets, exclude, to_save, layers in itertools.product(TARGETS, EXCLUDES, SAVED, LAYERS):
        config = _config(targets, exclude, to_save, layers)
        for key in KEYS:
            ours = module_targeted(
                key,
                targets,
                exclude=exclude or (),
                modules_to_save=to_save or (),
                layers_to_transform=layers[0],
                layers_pattern=layers[1],
            )
            assert ours == bool(check_target_module_exists(config, key)), (key, config)


def test_pattern_key_is_peft_get_pattern_key() -> None:
    patterns = [r"q_proj", r".*\.layers\.1\..*", r"mlp\.(up|down)_proj", r"experts"]
    for key in KEYS:
        # peft answers the key itself when no pattern matches; we answer None.
        assert (pattern_key(patterns, key) or key) == get_pattern_key(patterns, key), key


def test_parameters_and_saved_modules_match_as_peft_matches_them() -> None:
    assert parameter_targeted("model.layers.0.mlp.experts.gate_up_proj", ["experts.gate_up_proj"])
    assert parameter_targeted("model.layers.0.mlp.experts.gate_up_proj", ["model.layers.0.mlp.experts.gate_up_proj"])
    assert not parameter_targeted("model.layers.0.mlp.experts.gate_up_proj", ["up_proj"])
    # modules_to_save needs no dot: peft's _set_trainable is key.endswith(name).
    assert saved("model.lm_head", ["lm_head"]) and saved("model.xlm_head", ["lm_head"])
    assert not saved("lm_head.weight", ["lm_head"])


def test_all_linear_shorthand_ignores_case() -> None:
    assert is_all_linear("all-linear") and is_all_linear("ALL-Linear")
    assert not is_all_linear(["all-linear"]) and not is_all_linear(None)


@pytest.mark.parametrize("name", sorted(tiny.TINY))
def test_all_linear_is_peft_expansion(name: str) -> None:
    model = tiny.build(name)
    config = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model)
    inventory = take_inventory(model)
    assert set(all_linear(inventory)) == set(config.target_modules)
    assert targeted_modules(inventory, "all-linear") == all_linear(inventory)


# --- the catalog: recommender == estimator == peft ---------------------------------------------------

ENTRIES = {e.id: e for e in entries()}
#: Layers per stack of the copy the catalog test adapts (memory_models.reduced_config). The three
#: users match module names, and deeper stacks only repeat them: the test checks that the copy has
#: every module of the model, by name with layer and expert indices left out, and class.
DEPTH = 8


def _copy(model_id: str) -> dict[str, Any]:
    return reduced_config(dict(ENTRIES[model_id].config), DEPTH)


def _kinds(model: Any) -> set[tuple[str, str]]:
    """Every module as (path with its indices written ``#``, class name)."""
    return {(re.sub(r"\.\d+(?=\.|$)", ".#", name), type(module).__name__) for name, module in model.named_modules()}


def _peft_adapted(model_id: str, **config: Any) -> tuple[set[str], set[str]]:
    """Module paths with a LoRA adapter and parameter paths wrapped by ParamWrapper, in base-model names."""
    model = build_from_config(_copy(model_id), model_id=model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=2, **config), low_cpu_mem_usage=True)
    modules, params = set(), set()
    for name, module in peft_model.base_model.model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            params.add(f"{name.replace('.base_layer', '')}.{module.parameter_name}")
        elif hasattr(module, "lora_A"):
            modules.add(name.replace(".base_layer", ""))
    return modules, params


def _estimated(inventory: Any, plan: TrainingPlan) -> tuple[set[str], set[str]]:
    adapters = lora_adapters(inventory, plan)
    return (
        {a.path for a in adapters if a.parameter is None},
        {f"{a.path}.{a.parameter}" for a in adapters if a.parameter is not None},
    )


# Every bundled model, cut to DEPTH layers per stack: peft takes a second or more to wrap a whole large one.
@pytest.mark.slow
@pytest.mark.parametrize("model_id", sorted(ENTRIES))
def test_recommender_estimator_and_peft_adapt_the_same_modules(model_id: str) -> None:
    model = build_from_config(_copy(model_id), model_id=model_id)
    # The copy has every kind of module the whole model has (dense and MoE layers, cross-attention...).
    assert _kinds(model) == _kinds(build_from_config(dict(ENTRIES[model_id].config), model_id=model_id))
    inventory = take_inventory(model)

    # peft's own "all-linear": the estimator models it exactly (MoE re-targeting included), the
    # recommender's preset selects its modules, and the estimator adapts them from the names it writes.
    peft_modules, peft_params = _peft_adapted(model_id, target_modules="all-linear")
    assert _estimated(inventory, TrainingPlan(targets="all-linear")) == (peft_modules, peft_params)
    selection = resolve_preset(inventory, "all-linear")
    # The preset is peft's all-linear, less a classification head (trained whole, modules_to_save) and,
    # on a vision-language model, less the vision tower and projector (the adapter goes on the LM).
    scope = language_model_scope(inventory)
    classifiers = {m.path for m in inventory.modules if m.role == ModuleRole.CLASSIFIER}
    expected = {m for m in peft_modules if not scope or any(m.startswith(r + ".") for r in scope)} - classifiers
    assert set(selection.modules) == expected
    written = selection.spec.target_modules
    target_list = written if isinstance(written, str) else list(written)
    assert _peft_adapted(model_id, target_modules=target_list)[0] == expected
    assert _estimated(inventory, TrainingPlan(targets=written))[0] == expected

    # The attention preset's written config: what the recommender selects, the estimator and peft adapt.
    if not any(str(m.role or "").startswith("attention.") for m in inventory.modules):
        with pytest.raises(TargetError, match="selects nothing"):  # ConvNeXt: convolutions, no attention
            resolve_preset(inventory, "attention")
        return
    spec = resolve_preset(inventory, "attention").spec
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    peft = _peft_adapted(model_id, target_modules=targets, target_parameters=list(spec.parameters) or None)
    assert _estimated(inventory, TrainingPlan(targets=spec.target_modules, target_parameters=spec.parameters)) == peft
    assert set(resolve_preset(inventory, "attention").modules) == peft[0]
