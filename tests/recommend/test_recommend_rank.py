"""Rank, alpha, dropout and rsLoRA rules: each rule's number, its reason and its source."""

from __future__ import annotations

import math

import pytest
import recommend_tiny as rt

from peftaudit.inventory import Inventory, take_inventory
from peftaudit.recommend.rank import (
    BASE_RANK,
    RANKS,
    RankError,
    alpha_for,
    choose,
    expert_rank,
    hyperparameters_at,
    neighbours,
)
from peftaudit.recommend.references import REFERENCES
from peftaudit.recommend.targets import count_adapters, resolve_preset


@pytest.fixture(scope="module")
def llama() -> Inventory:
    return take_inventory(rt.build("llama"))


@pytest.fixture(scope="module")
def mixtral() -> Inventory:
    return take_inventory(rt.build("mixtral"))


def _rules(choice: object) -> dict[str, object]:
    return {r.rule: r for r in choice.reasons}  # type: ignore[attr-defined]


@pytest.mark.parametrize("task", sorted(BASE_RANK))
def test_base_rank_by_task_with_a_cited_reason(llama: Inventory, task: str) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), task=task)
    assert choice.hyper.rank == BASE_RANK[task]
    reason = _rules(choice)["rank.task"]
    assert reason.sources and all(s in REFERENCES for s in reason.sources)  # type: ignore[attr-defined]


def test_capacity_raises_the_rank_until_parameters_cover_the_tokens(llama: Inventory) -> None:
    selection = resolve_preset(llama, "all-linear")
    per_rank = count_adapters(llama, selection.spec, 1).lora_params
    tokens = per_rank * 40  # rank 16 is too small, rank 64 is the first power of two that covers it
    choice = choose(llama, selection, tokens=tokens)
    assert choice.hyper.rank == 64
    assert choice.count.lora_params >= tokens
    assert count_adapters(llama, selection.spec, 32).lora_params < tokens
    assert "raised to rank 64" in _rules(choice)["rank.capacity"].text  # type: ignore[attr-defined]


def test_capacity_keeps_the_rank_when_there_is_room(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), tokens=1000)
    assert choice.hyper.rank == 16
    assert "not the limit" in _rules(choice)["rank.capacity"].text  # type: ignore[attr-defined]


def test_capacity_stops_at_the_top_rank_and_says_so(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), tokens=10**12)
    assert choice.hyper.rank == RANKS[-1]
    assert "full fine-tuning" in _rules(choice)["rank.capacity"].text  # type: ignore[attr-defined]


def test_rl_ignores_the_capacity_rule(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), task="rl", tokens=10**12)
    assert choice.hyper.rank == BASE_RANK["rl"]
    assert "not applied to RL" in _rules(choice)["rank.capacity"].text  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora"), [(8, 16, False), (32, 64, False), (64, 16, True), (256, 16, True)]
)
def test_alpha_and_rslora_by_rank(rank: int, alpha: int, rslora: bool) -> None:
    assert alpha_for(rank) == (alpha, rslora)


def test_rslora_switch_keeps_the_scale_continuous(llama: Inventory) -> None:
    selection = resolve_preset(llama, "all-linear")
    below = hyperparameters_at(llama, selection, 32)
    at = hyperparameters_at(llama, selection, 64)
    assert below.scale == at.scale == 2.0
    assert hyperparameters_at(llama, selection, 256).scale == pytest.approx(16 / math.sqrt(256))


def test_cpt_gets_a_high_rank_with_rslora_and_no_dropout(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), task="cpt")
    assert (choice.hyper.rank, choice.hyper.alpha, choice.hyper.use_rslora) == (256, 16, True)
    assert choice.hyper.dropout == 0.0
    rules = _rules(choice)
    assert "lllf" in rules["rank.task"].sources  # type: ignore[attr-defined]
    assert "rslora" in rules["alpha.rslora"].sources  # type: ignore[attr-defined]


def test_experts_get_the_rank_divided_by_experts_per_token(mixtral: Inventory) -> None:
    selection = resolve_preset(mixtral, "all-linear+experts")
    choice = choose(mixtral, selection)
    assert mixtral.moe is not None and mixtral.moe.experts_per_token == 2
    assert dict(choice.hyper.rank_pattern) == {r"experts\.gate_up_proj": 8, r"experts\.down_proj": 8}
    # Standard scaling: the experts keep the layer's alpha/r.
    assert dict(choice.hyper.alpha_pattern) == {r"experts\.gate_up_proj": 16, r"experts\.down_proj": 16}
    assert "rank.experts" in _rules(choice)
    assert expert_rank(16, 8) == 2 and expert_rank(4, 8) == 1


def test_experts_force_dropout_zero_and_refuse_an_explicit_dropout(mixtral: Inventory) -> None:
    selection = resolve_preset(mixtral, "all-linear+experts")
    assert choose(mixtral, selection).hyper.dropout == 0.0
    with pytest.raises(RankError, match="dropout"):
        choose(mixtral, selection, dropout=0.1)
    # Without experts the QLoRA rule applies: 0.1 for a small model.
    assert choose(mixtral, resolve_preset(mixtral, "all-linear")).hyper.dropout == 0.1


def test_large_data_needs_no_dropout(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "all-linear"), tokens=200_000_000)
    assert choice.hyper.dropout == 0.0
    assert _rules(choice)["dropout.data"]


def test_big_models_get_qlora_s_smaller_dropout() -> None:
    from peftaudit.sources.base import SourceOptions, resolve

    resolved, source = resolve("meta-llama/Llama-3.1-70B")
    inventory = take_inventory(source.build(resolved, SourceOptions()))
    choice = choose(inventory, resolve_preset(inventory, "qv"))
    assert choice.hyper.dropout == 0.05


def test_explicit_values_win(llama: Inventory) -> None:
    choice = choose(llama, resolve_preset(llama, "qv"), rank=7, alpha=3, dropout=0.2, use_rslora=True)
    h = choice.hyper
    assert (h.rank, h.alpha, h.dropout, h.use_rslora) == (7, 3, 0.2, True)
    assert {"rank.given", "alpha.given", "dropout.given"} <= set(_rules(choice))


def test_bad_values_are_errors(llama: Inventory) -> None:
    selection = resolve_preset(llama, "qv")
    with pytest.raises(RankError, match="unknown task"):
        choose(llama, selection, task="pretraining")
    with pytest.raises(RankError, match="positive"):
        hyperparameters_at(llama, selection, 0)
    with pytest.raises(RankError, match="dropout"):
        choose(llama, selection, dropout=1.5)


def test_neighbours_on_the_ladder() -> None:
    assert neighbours(16) == (8, 32)
    assert neighbours(1) == (None, 2)
    assert neighbours(512) == (256, None)
    assert neighbours(24) == (16, 32)
