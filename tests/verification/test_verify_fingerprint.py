"""Fingerprints: bitwise identity, streaming, dtypes, and agreement between memory and disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors.torch import save_file

from peftaudit.verification import SamplePolicy, TensorFingerprint, snapshot
from peftaudit.verification.dtypes import DTYPES, decode
from peftaudit.verification.fingerprint import digest_chunks, zero_digest
from peftaudit.verification.live import TorchValues, dtype_code, fingerprint_tensors


def fp(tensor: torch.Tensor, name: str = "t") -> TensorFingerprint:
    found, _ = fingerprint_tensors([(name, tensor)], SamplePolicy())
    return found[0]


def test_nan_equals_nan_and_signed_zeros_differ() -> None:
    # torch.equal says the opposite on both counts; the verifier must not.
    nan = torch.tensor([float("nan"), 1.0])
    assert not torch.equal(nan, nan.clone())
    assert fp(nan).digest == fp(nan.clone()).digest
    plus, minus = torch.tensor([0.0]), torch.tensor([-0.0])
    assert torch.equal(plus, minus)
    assert fp(plus).digest != fp(minus).digest


def test_digest_is_xxh3_128_of_the_raw_bytes() -> None:
    t = torch.arange(10, dtype=torch.float32)
    assert fp(t).digest == xxhash.xxh3_128(t.numpy().tobytes()).hexdigest()


def test_streaming_equals_one_shot() -> None:
    data = np.random.default_rng(0).bytes(1_000_003)
    pieces = [memoryview(data)[i : i + 4097] for i in range(0, len(data), 4097)]
    assert digest_chunks(pieces) == xxhash.xxh3_128(data).hexdigest()


def test_zero_digest_matches_hashing_zeros() -> None:
    for size in (1, 7, 65536, (64 << 20) + 3):
        assert zero_digest(size) == xxhash.xxh3_128(bytes(size)).hexdigest()
    zeros = fp(torch.zeros(16, 4))
    assert zeros.is_zero
    assert not fp(torch.ones(16, 4)).is_zero


def test_non_contiguous_and_chunked_paths_hash_the_logical_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.randn(64, 48)
    transposed = base.t()
    assert not transposed.is_contiguous()
    assert fp(transposed).digest == fp(transposed.contiguous()).digest
    # The accelerator path copies bounded chunks to the host; exercise it with a tiny chunk size.
    import peftaudit.verification.live as live

    monkeypatch.setattr(live, "CHUNK_BYTES", 100)
    values = TorchValues({"x": base})
    chunks = list(values.chunks("x"))
    assert len(chunks) == (base.numel() * 4 + 99) // 100
    assert digest_chunks(chunks) == fp(base).digest


def test_fingerprint_records_dtype_shape_nonfinite_and_sample() -> None:
    t = torch.tensor([[1.0, float("inf")], [float("nan"), -2.0]], dtype=torch.bfloat16)
    found = fp(t)
    assert (found.dtype, found.shape, found.numel, found.nbytes) == ("BF16", (2, 2), 4, 8)
    assert found.nonfinite == 2
    assert found.sample == t.view(torch.uint16).numpy().tobytes()


def test_sample_policy_keeps_small_tensors_whole_and_samples_large_ones() -> None:
    policy = SamplePolicy(whole_below=100, points=10)
    assert list(policy.positions(5)) == [0, 1, 2, 3, 4]
    assert policy.exact(100) and not policy.exact(101)
    large = policy.positions(1000)
    assert list(large) == list(range(0, 1000, 100))
    assert SamplePolicy(points=0).positions(50).size == 0


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
        torch.int8,
        torch.int64,
        torch.bool,
    ],
)
def test_numpy_decoding_agrees_with_torch(dtype: torch.dtype) -> None:
    # Every bit pattern for 8-bit types, a spread of values otherwise.
    if torch.empty(0, dtype=dtype).element_size() == 1 and dtype.is_floating_point:
        t = torch.arange(256, dtype=torch.uint8).view(dtype)
    elif dtype == torch.bool:
        t = torch.tensor([True, False, True])
    elif dtype.is_floating_point:
        t = torch.cat([torch.randn(1000) * 100, torch.tensor([0.0, -0.0, float("inf"), float("nan")])]).to(dtype)
    else:
        t = torch.randint(-100, 100, (100,)).to(dtype)
    code = dtype_code(t)
    assert code in DTYPES
    ours = decode(code, t.view(torch.uint8).numpy().tobytes())
    theirs = t.to(torch.float64).numpy()
    assert ours is not None
    np.testing.assert_array_equal(ours, theirs)


def test_live_tensor_and_its_safetensors_file_give_the_same_digests(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(33, 17),
        "b16": torch.randn(5, 5).to(torch.bfloat16),
        "i": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    disk = snapshot(tmp_path)
    for name, tensor in tensors.items():
        live = fp(tensor, name)
        assert disk[name].digest == live.digest, name
        assert disk[name].dtype == live.dtype
        assert disk[name].shape == live.shape
        assert disk[name].sample == live.sample
