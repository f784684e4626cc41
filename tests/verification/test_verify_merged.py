"""Merged models: only the adapter's targets changed, each by a rank <= r delta equal to scale * B @ A."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftaudit.verification import Cause, Problem, verify


def merged_checkpoints(
    tmp_path: Path,
    model: Any,
    train: Callable[..., None],
    *,
    steps: int = 2,
    fused: bool = False,
    **config: Any,
) -> tuple[Path, Path, Path, Any]:
    """base/, adapter/ and merged/ directories from a real peft run and merge_and_unload()."""
    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"

    def save(module: Any, where: Path) -> None:
        if fused:  # keep the in-memory layout (save_pretrained rewrites MoE experts per expert)
            where.mkdir()
            state = {k: v.contiguous() for k, v in module.state_dict().items() if k != "lm_head.weight"}
            save_file(state, where / "model.safetensors")
        else:
            module.save_pretrained(where)

    save(model, base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    if steps:
        train(wrapped, steps=steps)
    wrapped.save_pretrained(adapter)
    save(wrapped.merge_and_unload(), merged)
    return base, adapter, merged, wrapped


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


QV = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_clean_merge_passes_with_every_target_changed(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV)
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    assert verdict.findings == ()
    assert verdict.intended == verdict.intended_changed == 4
    assert verdict.changed == 4


def test_full_rank_change_of_a_target_exceeds_the_rank(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV)
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite(
        merged, lambda s: s[name].add_(1e-3 * torch.randn(s[name].shape, generator=torch.Generator().manual_seed(1)))
    )
    verdict = verify(base, merged, adapter=adapter)
    rank = verdict.by_problem(Problem.RANK_EXCEEDED)
    assert [f.name for f in rank] == [name]
    assert "rank > 4" in rank[0].message
    assert [f.name for f in verdict.by_problem(Problem.MERGE_MISMATCH)] == [name]
    # A budget of a few rows per matrix still sees it: any submatrix of a rank-r matrix has rank <= r.
    small = verify(base, merged, adapter=adapter, rank_budget=10 * 64)
    assert [f.name for f in small.by_problem(Problem.RANK_EXCEEDED)] == [name]


def test_merge_with_the_wrong_scale_is_low_rank_but_mismatched(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV)
    original = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    rewrite(merged, lambda s: s.__setitem__(name, original[name] + 2 * (s[name] - original[name])))
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.by_problem(Problem.RANK_EXCEEDED) == ()
    mismatch = verdict.by_problem(Problem.MERGE_MISMATCH)
    assert [f.name for f in mismatch] == [name]
    assert "scale 2" in mismatch[0].message


def test_non_target_change_and_unmerged_target(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV)
    original = load_file(base / "model.safetensors")

    def edit(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0
        state["model.layers.0.self_attn.q_proj.weight"] = original["model.layers.0.self_attn.q_proj.weight"]

    rewrite(merged, edit)
    verdict = verify(base, merged, adapter=adapter)
    unexpected = verdict.by_problem(Problem.UNEXPECTED_CHANGE)
    assert [f.name for f in unexpected] == ["model.layers.0.mlp.up_proj.weight"]
    size = unexpected[0].size
    assert size is not None and size.exact and size.fraction == 1 / (128 * 64)
    assert size.max_abs == pytest.approx(1.0, rel=1e-6)
    unchanged = verdict.by_problem(Problem.UNCHANGED)
    assert [(f.name, f.cause) for f in unchanged] == [("model.layers.0.self_attn.q_proj.weight", Cause.NOT_MERGED)]


def test_merging_an_untrained_adapter_changes_nothing_and_says_why(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, steps=0, **QV)
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.changed == 0
    assert {f.cause for f in verdict.by_problem(Problem.UNCHANGED)} == {Cause.LORA_B_ZERO}
    assert len(verdict.failures) == 4


def test_bf16_merge_rounding_stays_within_the_bound(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = tiny("llama", torch_dtype="bfloat16").to(torch.bfloat16)
    base, adapter, merged, _ = merged_checkpoints(tmp_path, model, train, **{**QV, "target_modules": "all-linear"})
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 14


def test_gpt2_conv1d_and_embedding_adapters(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(
        tmp_path, tiny("gpt2"), train, r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True
    )
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 5  # 2 layers x (c_attn, c_fc) + the embedding
    name = "transformer.h.0.attn.c_attn.weight"
    original = load_file(base / "model.safetensors")
    rewrite(merged, lambda s: s.__setitem__(name, original[name] + 0.5 * (s[name] - original[name])))
    assert [f.name for f in verify(base, merged, adapter=adapter).by_problem(Problem.MERGE_MISMATCH)] == [name]


def test_rslora_and_alpha_pattern_scaling(tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    base, adapter, merged, _ = merged_checkpoints(
        tmp_path, tiny("llama"), train, **QV, use_rslora=True, alpha_pattern={"v_proj": 3}
    )
    assert verify(base, merged, adapter=adapter).ok


def test_fused_moe_experts_are_checked_per_expert(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(
        tmp_path, tiny("mixtral"), train, fused=True, r=2, lora_alpha=4, target_modules="all-linear"
    )
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    # Per layer: q, k, v, o, the router, and the two fused expert tensors.
    assert verdict.intended == verdict.intended_changed == 2 * 7
    name = "model.layers.1.mlp.experts.down_proj"
    noise = torch.randn(
        load_file(base / "model.safetensors")[name][3].shape, generator=torch.Generator().manual_seed(2)
    )
    rewrite(merged, lambda s: s[name][3].add_(1e-3 * noise))
    rank = verify(base, merged, adapter=adapter).by_problem(Problem.RANK_EXCEEDED)
    assert [f.name for f in rank] == [name]
    assert rank[0].message.startswith("expert 3:")


def test_dora_merges_are_not_held_to_low_rank(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV, use_dora=True)
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()


def test_experts_saved_in_the_legacy_per_expert_layout_are_reported_not_guessed(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    # transformers' save_pretrained writes Mixtral experts as block_sparse_moe.experts.N.w1/w2/w3,
    # while peft's adapter names the fused mlp.experts tensors: the verifier says it cannot map them.
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("mixtral"), train, r=2, target_modules="all-linear")
    verdict = verify(base, merged, adapter=adapter)
    unmapped = [f for f in verdict.by_problem(Problem.ADDED) if "does not name" in f.message]
    # Per layer: the two fused expert tensors and the router (block_sparse_moe.gate on disk).
    assert sorted(f.message.split(",")[0].split(".", 3)[-1] for f in unmapped) == [
        "mlp.experts",
        "mlp.experts",
        "mlp.experts",
        "mlp.experts",
        "mlp.gate",
        "mlp.gate",
    ]


def test_saved_copies_must_match_the_merged_tensor(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, adapter, merged, _ = merged_checkpoints(tmp_path, tiny("llama"), train, **QV, modules_to_save=["lm_head"])
    verdict = verify(base, merged, adapter=adapter)
    assert verdict.ok, verdict.explain()
    assert verdict.changed == 5  # four targets and the trained lm_head copy
    original = load_file(base / "model.safetensors")["lm_head.weight"]
    rewrite(merged, lambda s: s.__setitem__("lm_head.weight", original))  # the copy was not carried over
    mismatch = verify(base, merged, adapter=adapter).by_problem(Problem.MERGE_MISMATCH)
    assert [(f.name, f.message) for f in mismatch] == [
        ("lm_head.weight", "differs from the adapter's saved copy base_model.model.lm_head.weight")
    ]
