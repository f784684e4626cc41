"""CI gates for train.py, written with the peftaudit pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
from train import build_model, train

from peftaudit.verification import PeftAuditCallback


@pytest.fixture
def peft_model():  # type: ignore[no-untyped-def]
    return build_model(rank=8)


# LoRA r=8 on query and value of 6 layers plus the classifier head: well under 1 % of MiniLM's 22.7M.
@pytest.mark.peftaudit(max_trainable_fraction=0.01, fits="T4", method="lora", seq_len=256, batch_size=32)
def test_lora_plan(peft_model) -> None:  # type: ignore[no-untyped-def]
    assert peft_model.peft_config["default"].r == 8


def test_only_adapters_change(peft_model, param_snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = param_snapshot(peft_model)
    train(peft_model, tmp_path, steps=3)
    assert before.only_intended_changed(peft_model)


def test_trainer_callback_verifies_at_the_end(peft_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    callback = PeftAuditCallback()
    train(peft_model, tmp_path, steps=3, callbacks=[callback])
    step, verdict = callback.verdicts[-1]
    assert step == 3
    assert verdict.ok, verdict.explain()
