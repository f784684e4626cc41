"""The elementwise comparison behind change sizes: exact on two checkpoints, bit-level bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peftaudit.verification.compare as compare_module
from peftaudit.verification import Snapshot, snapshot
from peftaudit.verification.compare import Comparison, compare


def pair(tmp_path: Path, before: torch.Tensor, after: torch.Tensor) -> Comparison:
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    save_file({"t": before}, tmp_path / "a" / "model.safetensors")
    save_file({"t": after}, tmp_path / "b" / "model.safetensors")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    return compare(
        a["t"], b["t"], before_values=a.values, after_values=b.values, before_policy=a.policy, after_policy=b.policy
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sizes_and_nonfinite_counts_are_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    before = torch.linspace(-2, 2, 10_000).to(dtype)
    after = before.clone()
    after[10] = float("nan")
    after[20] = float("inf")
    after[30] += 1.0
    found = pair(tmp_path, before, after)
    assert found.size is not None and found.size.exact
    assert found.size.fraction == 3 / 10_000
    assert found.size.max_abs == pytest.approx(1.0, rel=1e-2)
    assert found.size.max_rel == pytest.approx(0.5, rel=1e-2)  # relative to the largest |value|, 2
    assert (found.nonfinite_before, found.nonfinite_after) == (0, 2)
    assert not found.rounding_level


def test_signed_zero_is_a_change_of_size_zero(tmp_path: Path) -> None:
    before = torch.zeros(8)
    after = before.clone()
    after[3] = -0.0
    found = pair(tmp_path, before, after)
    assert found.size is not None and found.size.fraction == 1 / 8 and found.size.max_abs == 0.0


def test_chunking_does_not_change_the_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    before = torch.randn(5000, generator=g)
    after = before + (torch.rand(5000, generator=g) < 0.01) * torch.randn(5000, generator=g)
    whole = pair(tmp_path, before, after)
    monkeypatch.setattr(compare_module, "CHUNK_ELEMENTS", 333)
    assert pair(tmp_path, before, after) == whole
    assert whole.size is not None and whole.size.fraction == pytest.approx(float((after != before).float().mean()))


def test_integer_and_fp8_tensors_use_decoded_values(tmp_path: Path) -> None:
    ints = pair(tmp_path, torch.arange(100), torch.arange(100) * (torch.arange(100) != 7))
    assert ints.size is not None and ints.size.max_abs == 7 and not ints.rounding_level
    before = torch.linspace(-1, 1, 64).to(torch.float8_e4m3fn)
    after = before.clone().view(torch.uint8)
    after[5] ^= 1  # one mantissa step
    found = pair(tmp_path, before, after.view(torch.float8_e4m3fn))
    assert found.size is not None and found.size.fraction == 1 / 64 and found.rounding_level


def test_retyped_tensor_compares_values(tmp_path: Path) -> None:
    before = torch.randn(100).to(torch.bfloat16)
    assert pair(tmp_path, before, before.to(torch.float32)).values_equal is True
    bumped = before.to(torch.float32)
    bumped[0] += 1
    assert pair(tmp_path, before, bumped).values_equal is False


def test_two_saved_snapshots_compare_their_samples(tmp_path: Path) -> None:
    before = torch.randn(100)
    after = before.clone()
    after[50] = 9.0
    pair(tmp_path, before, after)
    a = Snapshot.load(snapshot(tmp_path / "a").save(tmp_path / "a.json"))
    b = Snapshot.load(snapshot(tmp_path / "b").save(tmp_path / "b.json"))
    found = compare(
        a["t"], b["t"], before_values=None, after_values=None, before_policy=a.policy, after_policy=b.policy
    )
    assert found.size is not None and found.size.exact and found.size.fraction == 1 / 100
