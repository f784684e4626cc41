"""The public API surface: imports, argument forms, and the verdict object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from peftaudit.errors import PeftauditError
from peftaudit.verification import Pattern, Problem, Snapshot, SnapshotError, snapshot, verify


def test_from_peftaudit_import_snapshot_and_verify_works_in_a_fresh_process(tmp_path: Path) -> None:
    # The package is `peftaudit.verification`, so `peftaudit.verify` is only ever the function.
    save_file({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    code = (
        "import sys\nfrom peftaudit import snapshot, verify\n"
        "v = verify(snapshot(sys.argv[1]), sys.argv[2])\n"
        "import peftaudit, peftaudit.verification\nw = peftaudit.verify(sys.argv[1], sys.argv[1])\n"
        "print(v.ok, len(v.failures), w.ok, 'torch' in sys.modules)"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    result = subprocess.run(args, capture_output=True, text=True, env=os.environ, timeout=120)
    assert result.stdout.split() == ["False", "1", "True", "False"], result.stderr


def test_patterns_match_dotted_parts_or_regexes() -> None:
    name = "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert Pattern("lora_*").matches(name)
    assert Pattern("q_proj").matches(name) and Pattern("self_attn.q_proj").matches(name)
    assert not Pattern("q_pro").matches(name)
    assert Pattern("classifier").matches("classifier.weight")
    assert not Pattern("classifier").matches("pre_classifier.weight")
    assert Pattern(r"re:layers\.0\..*lora_A").matches(name)
    assert not Pattern(r"re:layers\.1\.").matches(name)
    with pytest.raises(PeftauditError, match="not a regular expression"):
        Pattern("re:[")
    with pytest.raises(PeftauditError, match="empty pattern"):
        Pattern("")


def test_a_single_pattern_string_is_one_pattern(tmp_path: Path) -> None:
    save_file({"norm.weight": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"norm.weight": torch.zeros(3)}, tmp_path / "b.safetensors")
    assert verify(tmp_path / "a.safetensors", tmp_path / "b.safetensors", allow="norm").ok


def test_snapshot_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(PeftauditError, match="cannot snapshot a int"):
        snapshot(3)
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(PeftauditError, match="meta device"):
        snapshot(meta)
    (tmp_path / "old.json").write_text(json.dumps({"format": "peftaudit-snapshot", "version": 0, "hash": "md5"}))
    with pytest.raises(SnapshotError, match="take it again"):
        Snapshot.load(tmp_path / "old.json")
    with pytest.raises(PeftauditError, match="needs an 'after'"):
        verify(tmp_path / "old.json")


def test_only_intended_changed_reads_as_an_assertion(tiny: Callable[..., Any], train: Callable[..., None]) -> None:
    model = tiny("llama").requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    before = snapshot(model)
    train(model)
    assert before.only_intended_changed(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1
    verdict = before.only_intended_changed(model)
    assert not verdict
    assert [f.problem for f in verdict.findings] == [Problem.UNEXPECTED_CHANGE]
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["ok"] is False and data["counts"]["failures"] == 1
    assert data["findings"][0]["cause"] == "modified-in-place"
