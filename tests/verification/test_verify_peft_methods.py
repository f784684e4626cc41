"""The verifier on every peft method, not only LoRA: LoHa, LoKr, VeRA, OFT, BOFT, AdaLoRA, IA3, prompt learning.

Real peft on a tiny random-init Llama (hidden 64, 2 layers), real AdamW steps
on CPU and real ``save_pretrained`` files. What must change is never taken
from our code: live, it is what peft marks ``requires_grad``; saved, it is
what differs between a save before and after training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftaudit.verification import Problem, snapshot, verify
from peftaudit.verification.adapter import copy_role, read_layout
from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.lora_config import read_lora_settings
from peftaudit.verification.peft_names import PROMPT_LEARNING_NAMES, declared_names, peft_names

QV = ["q_proj", "v_proj"]


def _trained_tokens() -> list[int]:
    # conftest.train_steps trains on torch.manual_seed(0); randint(0, vocab, (2, 8)): pick two of those ids,
    # so the trainable tokens get gradients.
    torch.manual_seed(0)
    return sorted(set(torch.randint(0, 128, (2, 8)).flatten().tolist()))[:2]


METHODS: dict[str, Callable[[], Any]] = {
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=QV),
    "lokr": lambda: peft.LoKrConfig(r=2, target_modules=QV, decompose_both=True),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=QV),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "ia3": lambda: peft.IA3Config(target_modules=[*QV, "down_proj"], feedforward_modules=["down_proj"]),
    "prefix-tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prompt-tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "trainable-tokens": lambda: peft.TrainableTokensConfig(token_indices=_trained_tokens()),
}


def wrapped(tiny: Callable[..., Any], method: str) -> Any:
    return peft.get_peft_model(tiny("llama"), METHODS[method]())


def saves(tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None], config: Any) -> tuple[Path, Path, Path]:
    """The base checkpoint, the adapter saved before training and saved after two steps."""
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(model, config)
    model.save_pretrained(tmp_path / "untrained")
    train(model)
    model.save_pretrained(tmp_path / "trained")
    return tmp_path / "base", tmp_path / "untrained", tmp_path / "trained"


def tensors(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


def test_peft_names_are_what_the_tuner_classes_declare() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    def subclasses(cls: Any) -> list[Any]:
        return [s for c in cls.__subclasses__() for s in (c, *subclasses(c))]

    classes = subclasses(BaseTunerLayer)
    assert len(classes) > 50  # every tuner is imported with peft
    declared = {n for c in classes for n in c.adapter_layer_names}
    other = {n for c in classes for n in c.other_param_names}
    names = peft_names()
    assert declared <= names.trained
    # The rest: prompt learning (no tuner layers), and names LoRA variants add to an instance.
    tuners = Path(peft.__file__).parent / "tuners"
    variants = declared_names(tuners / "lora")["adapter_layer_names"]
    assert names.trained - declared - PROMPT_LEARNING_NAMES <= variants
    assert names.fixed <= other
    assert {"hada_w1_a", "lokr_t2", "vera_lambda_b", "oft_R", "boft_s", "lora_E", "ia3_l"} <= names.trained
    assert {"vera_A", "vera_B", "ranknum", "randlora_A"} <= names.fixed
    assert not names.fixed & {"r", "alpha", "scaling", "indices"}  # configuration with names a base may use


@pytest.mark.parametrize("method", list(METHODS))
def test_live_model_passes_after_training_and_fails_without(
    method: str, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = wrapped(tiny, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    before = snapshot(model)
    untrained = verify(before, model)
    assert not untrained.ok
    unchanged = untrained.by_problem(Problem.UNCHANGED)
    assert {f.name for f in unchanged} == trainable
    assert {f.message for f in unchanged} == {"expected to change but is bit-for-bit unchanged"}
    train(model)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == len(trainable)
    assert verdict.changed == len(trainable)


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_adapter_is_read_as_its_method(
    method: str, tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, untrained, trained = saves(tmp_path, tiny, train, METHODS[method]())
    before, after = tensors(untrained), tensors(trained)
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    layout = read_layout(list(after))
    assert layout.copies == {}  # nothing misread as a copy of a base tensor
    assert set(layout.trained) == moved
    assert set(layout.fixed) == set(after) - moved

    audit = verify(base, adapter=trained)
    assert audit.ok, audit.explain()
    assert audit.intended == audit.intended_changed > 0
    # Before training, the factor peft starts at zero (so the adapter starts as a no-op) is zero still;
    # IA3 vectors (ones) and prompts (random) cannot be told from a trained one without the earlier save.
    zero = {k for k, t in before.items() if k in moved and not t.any()}
    fresh = verify(base, adapter=untrained)
    assert {f.name for f in fresh.failures} == zero
    assert all(f.problem is Problem.UNCHANGED and "still all zeros" in f.message for f in fresh.failures)

    assert verify(untrained, trained).ok  # two saves of one run: the trained tensors moved, nothing else
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    (resaved / "adapter_config.json").write_bytes((untrained / "adapter_config.json").read_bytes())
    save_file(before, resaved / "adapter_model.safetensors")
    stalled = verify(untrained, resaved)
    assert {f.name for f in stalled.failures} == moved
    assert {f.problem for f in stalled.failures} == {Problem.UNCHANGED}


def test_vera_projections_are_fixed_neither_trained_nor_copies(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, untrained, trained = saves(tmp_path, tiny, train, METHODS["vera"]())
    layout = read_layout(list(tensors(trained)))
    assert sorted(layout.fixed) == ["base_model.vera_A", "base_model.vera_B"]
    assert verify(base, adapter=trained, expect=["vera_lambda_*"]).ok  # patterns need not name them
    state = tensors(trained)
    state["base_model.vera_A"] = state["base_model.vera_A"] * 2
    save_file(state, trained / "adapter_model.safetensors")
    changed = verify(untrained, trained).by_problem(Problem.UNEXPECTED_CHANGE)
    assert [f.name for f in changed] == ["base_model.vera_A"]


def test_mica_trains_lora_a_and_keeps_lora_b_frozen(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="mica")
    model = peft.get_peft_model(tiny("llama"), config)
    frozen_b = {n for n, p in model.named_parameters() if ".lora_B." in n and not p.requires_grad}
    assert len(frozen_b) == 4  # peft's MiCALinearVariant freezes them
    before = snapshot(model)
    assert before.expectations is not None and not frozen_b & before.expectations.must
    train(model)
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.intended == verdict.intended_changed == 4

    base, untrained, trained = saves(tmp_path, tiny, train, config)
    fresh = verify(base, adapter=untrained).failures
    assert len(fresh) == 4 and all(f.name.endswith("lora_A.weight") and "still all zeros" in f.message for f in fresh)
    assert verify(base, adapter=trained).ok
    assert verify(untrained, trained).ok  # lora_B frozen, lora_A moved


def test_lora_on_embeddings_starts_from_a_zero_lora_embedding_a(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    # peft starts embedding adapters the other way round: lora_embedding_A zero, lora_embedding_B random.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    base, untrained, trained = saves(tmp_path, tiny, train, config)
    assert not tensors(untrained)["base_model.model.model.embed_tokens.lora_embedding_A"].any()
    fresh = verify(base, adapter=untrained).failures
    assert [(f.name, f.problem) for f in fresh] == [
        ("base_model.model.model.embed_tokens.lora_embedding_A", Problem.UNCHANGED)
    ]
    assert verify(base, adapter=trained).ok


def test_another_method_targeting_a_module_the_base_lacks(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, _, trained = saves(tmp_path, tiny, train, METHODS["loha"]())
    state = tensors(trained)
    for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        state[f"base_model.model.model.layers.7.self_attn.q_proj.{part}"] = torch.ones(2, 2)
    save_file(state, trained / "adapter_model.safetensors")
    added = verify(base, adapter=trained).by_problem(Problem.ADDED)
    assert len(added) == 4
    assert {f.message for f in added} == {"targets model.layers.7.self_attn.q_proj, which the base model does not have"}


def test_a_merged_model_is_checked_against_lora_adapters_only(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, _, trained = saves(tmp_path, tiny, train, METHODS["ia3"]())
    with pytest.raises(CheckpointError, match="peft_type 'IA3': a merged model is checked against LoRA adapters only"):
        verify(base, base, adapter=trained)


def test_other_methods_configs_are_read_for_what_they_share() -> None:
    settings = read_lora_settings({"peft_type": "BOFT", "bias": "boft_only", "r": "unused"}, "a/adapter_config.json")
    assert (settings.peft_type, settings.bias, settings.origin) == ("BOFT", "boft_only", "a/adapter_config.json")
    assert copy_role("model.layers.0.self_attn.q_proj.bias", settings) == "bias"  # saved by boft_only
    with pytest.raises(CheckpointError, match="bias 'some' is not one of none, all, <method>_only"):
        read_lora_settings({"peft_type": "VERA", "bias": "some"}, "a/adapter_config.json")


def test_auditing_a_saved_loha_adapter_never_imports_torch(
    tmp_path: Path, tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    base, _, trained = saves(tmp_path, tiny, train, METHODS["loha"]())
    code = (
        "import sys\nfrom peftaudit.cli import main\n"
        f"rc = main(['verify', {str(base)!r}, '--adapter', {str(trained)!r}, '--json'])\n"
        "print('RC', rc, 'TORCH', 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "RC 0 TORCH False", result.stderr
