"""Verifying live models: peft on tiny real architectures, each failure mode caught and named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

from peftaudit.verification import (
    Cause,
    Evidence,
    Problem,
    Severity,
    Snapshot,
    VerificationFailed,
    snapshot,
    verify,
)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora(model: Any, **overrides: Any) -> Any:
    return peft.get_peft_model(model, peft.LoraConfig(**{**LORA, **overrides}))


def only(verdict: Any, problem: Problem) -> Any:
    found = verdict.by_problem(problem)
    assert len(found) == 1, [f.line() for f in verdict.findings]
    return found[0]


def test_clean_lora_run_passes_and_counts_every_adapter(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    train(model)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.findings == ()
    adapters = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(adapters) == 8
    assert (verdict.intended, verdict.intended_changed, verdict.changed) == (8, 8, 8)
    assert verdict.compared == len(list(model.named_parameters()))
    assert bool(verdict) is True
    verdict.raise_for_failures()


def test_snapshot_and_verify_never_modify_the_model(
    tiny: Callable[..., Any], train: Callable[..., None], model_state: Callable[[Any], dict[str, Any]]
) -> None:
    model = lora(tiny("llama_tied"), modules_to_save=["lm_head"])
    before_state = model_state(model)
    before = snapshot(model)
    assert model_state(model) == before_state
    train(model)
    trained_state = model_state(model)
    verify(before, model)
    verify(before, model, expect=["lora_*"], tolerate=["rounding"])
    assert model_state(model) == trained_state


def test_frozen_weight_nudged_in_place_is_caught_with_its_size(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    train(model)
    target = model.base_model.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        target[0, 0] += 0.5
    verdict = verify(before, model)
    assert not verdict.ok
    finding = only(verdict, Problem.UNEXPECTED_CHANGE)
    assert finding.name == "base_model.model.model.layers.1.mlp.down_proj.weight"
    assert finding.cause is Cause.MODIFIED_IN_PLACE
    assert finding.size is not None and finding.size.max_abs == pytest.approx(0.5, rel=1e-6)
    assert finding.size.fraction == pytest.approx(1 / 512)  # one of the 512 sampled elements
    assert not finding.size.exact
    with pytest.raises(VerificationFailed) as raised:
        verdict.raise_for_failures()
    assert isinstance(raised.value, AssertionError)
    assert "mlp.down_proj.weight" in str(raised.value) and "modified-in-place" in str(raised.value)


def test_layernorm_left_trainable_is_caught_and_measured_exactly(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = lora(tiny("llama"))
    norm = model.base_model.model.model.layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    before = snapshot(model)
    original = norm.detach().clone()
    train(model)
    verdict = verify(before, model)
    finding = only(verdict, Problem.UNEXPECTED_CHANGE)
    assert finding.name.endswith("layers.0.input_layernorm.weight")
    assert finding.cause is Cause.LEFT_TRAINABLE
    assert finding.size is not None and finding.size.exact  # 64 elements: kept whole in the snapshot
    assert finding.size.max_abs == pytest.approx(float((norm.detach() - original).abs().max()))


def test_trained_bias_is_named(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = lora(tiny("gpt2"), target_modules=["c_attn"], fan_in_fan_out=True)
    model.base_model.model.transformer.h[0].mlp.c_fc.bias.requires_grad_(True)
    before = snapshot(model)
    train(model)
    finding = only(verify(before, model), Problem.UNEXPECTED_CHANGE)
    assert finding.name.endswith("h.0.mlp.c_fc.bias")
    assert finding.cause is Cause.TRAINED_BIAS


def test_bias_all_makes_biases_allowed(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = lora(tiny("gpt2"), target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    before = snapshot(model)
    train(model)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.changed > verdict.intended_changed  # biases moved, as allowed


def test_adapters_cut_off_from_the_loss_keep_lora_b_zero(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    # A script that runs the first block as a frozen feature extractor (its output detached)
    # while LoRA targets that block too: no gradient ever reaches those adapters.
    model = lora(tiny("llama"))
    block = model.base_model.model.model.layers[0]
    block.register_forward_hook(
        lambda module, args, out: tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    )
    before = snapshot(model)
    train(model)
    verdict = verify(before, model)
    assert not verdict.ok
    assert verdict.intended_changed == 4  # layer 1's adapters trained
    unchanged = verdict.by_problem(Problem.UNCHANGED)
    assert sorted(f.name.split(".")[-3] for f in unchanged) == ["lora_A", "lora_A", "lora_B", "lora_B"]
    assert all(".layers.0." in f.name for f in unchanged)
    b_findings = [f for f in unchanged if ".lora_B." in f.name]
    assert all(f.cause is Cause.LORA_B_ZERO and "all zeros" in f.message for f in b_findings)


def test_only_lora_b_moving_after_one_step_is_a_note_not_a_failure(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    train(model, steps=1)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    notes = verdict.notes
    assert len(notes) == 4 and all(".lora_A." in n.name and n.cause is Cause.ONE_STEP for n in notes)
    assert all(n.severity is Severity.INFO for n in notes)
    assert verdict.intended_changed == 4  # the lora_B tensors
    train(model, steps=1)
    assert verify(before, model).notes == ()  # a second step moves lora_A too


def test_adapter_loaded_without_is_trainable(
    tiny: Callable[..., Any], train: Callable[..., None], tmp_path: Path
) -> None:
    trained = lora(tiny("llama"))
    train(trained)
    trained.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path)  # is_trainable defaults to False
    before = snapshot(loaded)
    assert not any(p.requires_grad for p in loaded.parameters())
    verdict = verify(before, loaded)
    unchanged = verdict.by_problem(Problem.UNCHANGED)
    assert len(unchanged) == 8
    assert {f.cause for f in unchanged} == {Cause.NOT_TRAINABLE}


def test_evidence_separates_optimizer_problems_from_missing_gradients(tiny: Callable[..., Any]) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    missing = verify(before, model, evidence=Evidence(gradient_seen=frozenset(names), in_optimizer=frozenset()))
    assert {f.cause for f in missing.by_problem(Problem.UNCHANGED)} == {Cause.NOT_IN_OPTIMIZER}
    stalled = verify(before, model, evidence=Evidence(gradient_seen=frozenset(names), in_optimizer=frozenset(names)))
    assert {f.cause for f in stalled.by_problem(Problem.UNCHANGED)} == {Cause.NO_UPDATE}
    starved = verify(before, model, evidence=Evidence(gradient_seen=frozenset(), in_optimizer=frozenset(names)))
    assert {f.cause for f in starved.by_problem(Problem.UNCHANGED)} == {Cause.NO_GRADIENT}


def test_live_gradients_are_used_as_evidence(tiny: Callable[..., Any]) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # gradients, but no optimizer step
    verdict = verify(before, model)
    causes = {f.name.split(".")[-3]: f.cause for f in verdict.by_problem(Problem.UNCHANGED)}
    assert causes == {"lora_B": Cause.NO_UPDATE, "lora_A": Cause.NO_GRADIENT}  # A gets no grad while B is 0


def test_nan_appearing_in_an_adapter_is_a_failure(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    train(model)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[3, 1] = float("nan")
    finding = only(verify(before, model), Problem.NONFINITE)
    assert finding.name.endswith("q_proj.lora_B.default.weight")
    assert "1 NaN/Inf elements after (before: 0)" in finding.message


def test_upcast_with_equal_values_is_a_warning(tiny: Callable[..., Any]) -> None:
    model = lora(tiny("llama").to(torch.bfloat16))
    before = snapshot(model)
    norm = model.base_model.model.model.norm
    norm.weight.data = norm.weight.data.to(torch.float32)  # what prepare_model_for_kbit_training does
    verdict = verify(before, model, expect=[], allow=["lora_*"])
    finding = only(verdict, Problem.RETYPED)
    assert finding.cause is Cause.DTYPE_EQUAL_VALUES and finding.severity is Severity.WARNING
    assert "BF16 -> F32" in finding.message
    norm.weight.data[0] += 1.0
    changed = only(verify(before, model), Problem.RETYPED)
    assert changed.severity is Severity.ERROR and changed.cause is None


def test_tied_embedding_drifts_when_only_the_head_is_trained(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = lora(tiny("llama_tied"), modules_to_save=["lm_head"])
    before = snapshot(model)
    assert len(before.tied) == 1 and len(before.tied[0]) == 3
    train(model)
    finding = only(verify(before, model), Problem.TIED_DRIFT)
    assert finding.cause is Cause.TIED_ONE_SIDE
    assert finding.related == ("base_model.model.lm_head.modules_to_save.default.weight",)


def test_tied_pair_trained_together_does_not_drift(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = tiny("llama_tied")
    for name, param in model.named_parameters():
        param.requires_grad_("embed_tokens" in name)
    before = snapshot(model)
    assert before.tied == (("model.embed_tokens.weight", "lm_head.weight"),)
    train(model)
    verdict = verify(before, model)
    assert verdict.ok and verdict.changed == 2  # both names of the one tied tensor


def test_added_removed_and_reshaped_tensors(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = lora(tiny("llama"))
    before = snapshot(model)
    train(model)
    model.add_adapter("second", peft.LoraConfig(**LORA))
    verdict = verify(before, model)
    added = verdict.by_problem(Problem.ADDED)
    assert len(added) == 8 and all(".second." in f.name for f in added)
    model.delete_adapter("second")
    model.base_model.model.resize_token_embeddings(130)
    verdict = verify(before, model)
    reshaped = verdict.by_problem(Problem.RESHAPED)
    assert sorted(f.name.split(".")[-2] for f in reshaped) == ["embed_tokens", "lm_head"]
    assert all(f.message == "shape [128, 64] -> [130, 64]" for f in reshaped)
    model.delete_adapter("default")
    removed = verify(before, model).by_problem(Problem.REMOVED)
    assert len(removed) == 8 and all("lora_" in f.name for f in removed)


def test_merge_unmerge_rounding_is_named_and_can_be_tolerated(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = lora(tiny("llama").to(torch.bfloat16))
    train(model, lr=1e-3)
    before = snapshot(model)
    model.merge_adapter()
    model.unmerge_adapter()
    verdict = verify(before, model, allow=["lora_*"])
    changed = verdict.by_problem(Problem.UNEXPECTED_CHANGE)
    assert changed, "a bf16 merge/unmerge round-trip should move some base weights"
    assert all(".base_layer.weight" in f.name and f.cause is Cause.MERGE_ROUNDING for f in changed)
    assert all(f.size is not None and 0 < f.size.fraction < 1 for f in changed)
    tolerated = verify(before, model, allow=["lora_*"], tolerate=["merge-rounding"])
    assert tolerated.ok and len(tolerated.warnings) == len(changed)


def test_cast_round_trip_is_named_rounding(tiny: Callable[..., Any]) -> None:
    model = tiny("llama").requires_grad_(False)
    before = snapshot(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.data = weight.data.to(torch.bfloat16).to(torch.float32)
    finding = only(verify(before, model), Problem.UNEXPECTED_CHANGE)
    assert finding.cause is Cause.ROUNDING and "cast round-trip through BF16" in finding.message


def test_plain_snapshot_against_the_peft_model_wrapping_it(
    tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base = tiny("llama")
    before = snapshot(base)  # taken before get_peft_model: plain names
    model = lora(base)
    train(model)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.compared == len(before)  # every base tensor matched through its peft name
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.gate_proj.weight[1, 1] += 1
    assert only(verify(before, model), Problem.UNEXPECTED_CHANGE).name.endswith("mlp.gate_proj.weight")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_initialisation_is_named(tiny: Callable[..., Any], init: str) -> None:
    base = tiny("llama")
    before = snapshot(base)
    model = lora(base, init_lora_weights=init)
    verdict = verify(before, model)
    rewritten = verdict.by_problem(Problem.UNEXPECTED_CHANGE)
    assert sorted(f.name.split(".")[-3] for f in rewritten) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert {f.cause for f in rewritten} == {Cause.ADAPTER_INIT}


def test_conv1d_gpt2_and_fused_moe_experts(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    gpt2 = lora(tiny("gpt2"), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    before = snapshot(gpt2)
    train(gpt2)
    assert verify(before, gpt2).ok

    mixtral = lora(tiny("mixtral"), target_modules="all-linear")
    experts = [n for n, p in mixtral.named_parameters() if "experts" in n and "lora_" in n]
    assert experts, "peft should put LoRA on the fused expert parameters"
    before = snapshot(mixtral)
    fused = [t for t in before if t.name.endswith("gate_up_proj")]
    assert fused and len(fused[0].shape) == 3
    train(mixtral)
    verdict = verify(before, mixtral)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == len(experts) + 2 * 2 * 5  # + q,k,v,o,router per layer
    with torch.no_grad():
        next(
            p
            for n, p in mixtral.named_parameters()
            if n.endswith("layers.0.mlp.experts.base_layer.base_layer.down_proj")
        )[2, 0, 0] += 1
    assert only(verify(before, mixtral), Problem.UNEXPECTED_CHANGE).name.endswith("down_proj")


def test_snapshot_round_trips_through_json(
    tiny: Callable[..., Any], train: Callable[..., None], tmp_path: Path
) -> None:
    model = lora(tiny("llama_tied"), modules_to_save=["lm_head"])
    before = snapshot(model)
    path = before.save(tmp_path / "before.json")
    assert not [p for p in tmp_path.iterdir() if p.name != "before.json"]  # no temp file left behind
    loaded = Snapshot.load(path)
    assert loaded == before
    assert loaded.expectations == before.expectations and loaded.tied == before.tied
    train(model)
    assert verify(path, model).to_dict() == verify(before, model).to_dict()
    assert json.loads(path.read_text())["format"] == "peftaudit-snapshot"
    assert path.stat().st_size < 200_000
