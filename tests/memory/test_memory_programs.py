"""The layer-program registry, and the one signal that means "no program reads these layers"."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from memory_models import build

from peftaudit.memory import PlanError, TrainingPlan, estimate
from peftaudit.memory.analytic import programs
from peftaudit.memory.analytic.layout import ModelLayout
from peftaudit.memory.analytic.programs import LayerProgram, NoLayerProgram, register_program, registered_programs
from peftaudit.recommend.budget import MicroBatch, recipe_peak_bytes


def _fresh_inventory(name: str) -> Any:
    """An inventory of its own: the estimate caches recorded steps per inventory object."""
    from peftaudit.inventory import take_inventory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return take_inventory(build(name))


def test_programs_are_registered_per_model_type() -> None:
    known = registered_programs()
    assert known["llama"].name == known["qwen3"].name == "llama"
    assert "qwen3_moe" not in known  # MoE blocks are derived from a trace of the real expert kernels
    assert known["gpt2"].name == "gpt2"
    assert known["bert"] is known["roberta"]
    assert known["bert"].causal is False and known["bert"].dropout == 0.1


def test_a_model_type_cannot_change_program() -> None:
    other = LayerProgram("other", programs.llama.llama_layer, programs.llama.embed, programs.llama.head)
    with pytest.raises(ValueError, match="already has the 'llama' layer program"):
        register_program(other, "llama")
    register_program(programs.llama.LLAMA, "llama")  # the same program again is fine


def test_a_program_that_cannot_read_the_layers_gives_way_to_the_derived_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inventory = _fresh_inventory("llama")
    plan = TrainingPlan(method="lora", seq_len=128)
    derived = estimate(inventory, plan, activations="derived")
    real = ModelLayout.linear

    def without_q(self: ModelLayout, layer: int | None, role: str) -> Any:
        return None if role == "attention.q" and type(self) is ModelLayout else real(self, layer, role)

    monkeypatch.setattr(ModelLayout, "linear", without_q)
    e = estimate(_fresh_inventory("llama"), plan)
    assert "approximate-activations" not in [w.code for w in e.warnings]
    assert e.components == derived.components
    assert issubclass(NoLayerProgram, PlanError)


def test_a_real_key_error_is_not_taken_for_a_missing_program(monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = _fresh_inventory("llama")
    real = ModelLayout.weight

    def broken(self: ModelLayout, layer: int | None, role: str) -> Any:
        if type(self) is ModelLayout:  # the stand-in's layout would work: the bug must not hide behind it
            raise KeyError("a bug")
        return real(self, layer, role)

    monkeypatch.setattr(ModelLayout, "weight", broken)
    with pytest.raises(KeyError, match="a bug"):
        estimate(inventory, TrainingPlan(method="lora"))


def test_budget_peak_is_none_only_when_the_estimator_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    import peftaudit.memory as memory

    recipe: Any = object()
    monkeypatch.setattr("peftaudit.recommend.budget.training_plan", lambda r, m: TrainingPlan())

    def refuses(inventory: Any, plan: Any) -> Any:
        raise PlanError("cannot estimate this")

    monkeypatch.setattr(memory, "estimate", refuses)
    assert recipe_peak_bytes(object(), recipe, MicroBatch()) is None  # type: ignore[arg-type]

    def buggy(inventory: Any, plan: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(memory, "estimate", buggy)
    with pytest.raises(KeyError):
        recipe_peak_bytes(object(), recipe, MicroBatch())  # type: ignore[arg-type]
