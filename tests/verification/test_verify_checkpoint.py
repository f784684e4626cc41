"""Checkpoints on disk: single, sharded, adapter, pickle; and every way one can be unsafe or broken."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from peftaudit.verification import CheckpointError, snapshot
from peftaudit.verification.checkpoint import SafetensorsValues, locate


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16),
    }


def test_single_file_and_directory_give_the_same_snapshot(tmp_path: Path) -> None:
    save_file(tensors(), tmp_path / "model.safetensors")
    by_dir, by_file = snapshot(tmp_path), snapshot(tmp_path / "model.safetensors")
    assert [t.digest for t in by_dir] == [t.digest for t in by_file]
    assert {t.name for t in by_dir} == set(tensors())
    assert by_dir.kind == "checkpoint"


def test_sharded_checkpoint_matches_the_unsharded_one(tmp_path: Path, tiny: Callable[..., Any]) -> None:
    model = tiny("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "single")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 2
    sharded, single = snapshot(tmp_path / "sharded"), snapshot(tmp_path / "single")
    assert {t.name: t.digest for t in sharded} == {t.name: t.digest for t in single}
    via_index = snapshot(tmp_path / "sharded" / "model.safetensors.index.json")
    assert {t.name: t.digest for t in via_index} == {t.name: t.digest for t in single}


def write_sharded(root: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in shards.items():
        save_file(content, root / name)
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_naming_shards_outside_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"x": torch.zeros(2)}, outside)
    root = tmp_path / "ckpt"
    for shard in ("../elsewhere.safetensors", str(outside)):
        write_sharded(root, {"x": shard}, {})
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            locate(root)
    (root / "link.safetensors").symlink_to(outside)
    write_sharded(root, {"x": "link.safetensors"}, {})
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint directory"):
        locate(root)


X, Y = {"x": torch.zeros(2)}, {"y": torch.ones(2)}


@pytest.mark.parametrize(
    ("weight_map", "shards", "message"),
    [
        ({"x": "missing.safetensors"}, {"s1.safetensors": X}, "shard 'missing.safetensors' is missing"),
        ({"x": "s1.safetensors", "y": "s1.safetensors"}, {"s1.safetensors": X}, "names 'y' in s1.safetensors, which"),
        (
            {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"},
            {"s1.safetensors": X, "s2.safetensors": {**Y, "z": torch.ones(1)}},
            "names 'y' in s1.safetensors, but it is in s2.safetensors",
        ),
        ({"x": "s1.safetensors"}, {"s1.safetensors": {**X, **Y}}, "missing from the weight_map: y"),
        ({}, {"s1.safetensors": X}, "no weight_map"),
    ],
)
def test_index_inconsistent_with_its_shards_is_refused(
    tmp_path: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]], message: str
) -> None:
    write_sharded(tmp_path, weight_map, shards)
    with pytest.raises(CheckpointError, match=message):
        locate(tmp_path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    save_file(tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        snapshot(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        snapshot(tmp_path)


def test_a_file_changed_after_its_header_was_read_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    layout = locate(tmp_path)
    save_file(tensors(seed=1), path)
    os.utime(path, ns=(1, 1))
    with pytest.raises(CheckpointError, match="changed on disk"):
        list(SafetensorsValues(layout).chunks("a.weight"))


def test_ambiguous_and_empty_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights found"):
        locate(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "one.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="several weight files"):
        locate(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        locate(tmp_path / "nope")


def test_pickle_is_refused_unless_allowed_then_loaded_weights_only(tmp_path: Path) -> None:
    torch.save(tensors(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        snapshot(tmp_path)
    loaded = snapshot(tmp_path, allow_pickle=True)
    save_file(tensors(), tmp_path / "same.safetensors")
    reference = snapshot(tmp_path / "same.safetensors")
    assert {t.name: t.digest for t in loaded} == {t.name: t.digest for t in reference}


class _Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused_even_when_pickle_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        snapshot(tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_adapter_directory_is_read_with_its_config(tmp_path: Path) -> None:
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
    snap = snapshot(tmp_path)
    assert snap.kind == "adapter"
    assert snap.adapter_config == {"r": 2, "peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="adapter config is not valid JSON"):
        snapshot(tmp_path)
