"""Fingerprinting tensors that live in memory: a model's parameters, or a loaded state dict.

Nothing here modifies, moves or casts a tensor. CPU tensors are hashed through
a zero-copy byte view; tensors on an accelerator are copied to the host one
bounded chunk at a time, so the host never holds more than a chunk per thread.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from peftaudit.verification.dtypes import code_for_torch
from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.fingerprint import (
    CHUNK_BYTES,
    Buffer,
    SamplePolicy,
    TensorFingerprint,
    digest_chunks,
)
from peftaudit.verification.values import Progress, parallel_map

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COPY_ORIGINAL = re.compile(r"\.modules_to_save\.[^.]+\.")


def dtype_code(tensor: torch.Tensor) -> str:
    """The safetensors code of a tensor's dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return code_for_torch(str(tensor.dtype).removeprefix("torch."), tensor.element_size())


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as flat uint8, row-major, on the tensor's device.

    A view when the tensor is contiguous (parameters nearly always are);
    otherwise one contiguous copy of that tensor alone.
    """
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


class TorchValues:
    """A :class:`~peftaudit.verification.values.ValueSource` over in-memory torch tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor itself (a reference, never a copy)."""
        return self._tensors[name]

    def read(self, name: str, start: int, stop: int) -> Buffer:
        tensor = self._tensors[name]
        size = tensor.element_size()
        part = _byte_view(tensor)[start * size : stop * size]
        return part.cpu().numpy().data

    def gather(self, name: str, positions: np.ndarray) -> bytes:
        tensor = self._tensors[name]
        if positions.size == 0:
            return b""
        flat = tensor.detach().reshape(-1)
        index = torch.from_numpy(positions).to(flat.device)
        picked = flat.index_select(0, index)
        return bytes(_byte_view(picked).cpu().numpy())

    def chunks(self, name: str) -> Iterator[Buffer]:
        view = _byte_view(self._tensors[name])
        total = view.numel()
        if view.device.type == "cpu":
            host = view.numpy()  # zero-copy
            for offset in range(0, total, CHUNK_BYTES):
                yield host[offset : offset + CHUNK_BYTES].data
            return
        for offset in range(0, total, CHUNK_BYTES):
            yield view[offset : offset + CHUNK_BYTES].cpu().numpy().data

    def release(self, name: str, start: int, stop: int) -> None:
        """Nothing to release: the tensors stay where they live."""

    def nonfinite(self, name: str) -> int | None:
        """NaN and infinite elements, counted on the tensor's own device in bounded chunks."""
        tensor = self._tensors[name]
        if tensor.dtype not in _FLOAT_TYPES:
            return None
        flat = tensor.detach().reshape(-1)
        step = max(1, CHUNK_BYTES // tensor.element_size())
        return sum(int((~torch.isfinite(flat[i : i + step])).sum().item()) for i in range(0, flat.numel(), step))


def _check_hashable(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise CheckpointError(f"{name} is on the meta device: it has no values to fingerprint")
    if type(tensor).__name__ == "DTensor":
        raise CheckpointError(f"{name} is a sharded DTensor: fingerprint it with distributed=True on every rank")


def fingerprint_tensors(
    tensors: Sequence[tuple[str, torch.Tensor]],
    policy: SamplePolicy,
    *,
    trainable: Mapping[str, bool] | None = None,
    stats: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[tuple[TensorFingerprint, ...], TorchValues]:
    """Fingerprints of named tensors; a tensor shared under several names is hashed once."""
    by_id: dict[int, str] = {}
    for name, tensor in tensors:
        _check_hashable(name, tensor)
        by_id.setdefault(id(tensor), name)
    values = TorchValues({name: tensor for name, tensor in tensors})

    def one(name: str) -> TensorFingerprint:
        digest = digest_chunks(_counted(values.chunks(name), progress))
        tensor = values.tensor(name)
        sample = values.gather(name, policy.positions(tensor.numel())) if policy.points else None
        return TensorFingerprint(
            name=name,
            dtype=dtype_code(tensor),
            shape=tuple(tensor.shape),
            digest=digest,
            nonfinite=values.nonfinite(name) if stats else None,
            sample=sample,
        )

    unique = list(by_id.values())
    sizes = {name: values.tensor(name).numel() * values.tensor(name).element_size() for name in unique}
    computed = parallel_map(one, unique, workers=workers, cost=lambda n: sizes[n])
    first = {fp.name: fp for fp in computed if isinstance(fp, TensorFingerprint)}
    out = []
    for name, tensor in tensors:
        base = first[by_id[id(tensor)]]
        # Every name of a shared tensor gets its fingerprint; only the name and trainability differ.
        out.append(dataclasses.replace(base, name=name, trainable=None if trainable is None else trainable.get(name)))
    return tuple(out), values


def _counted(chunks: Iterator[Buffer], progress: Progress | None) -> Iterator[Buffer]:
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(memoryview(chunk).nbytes)


def module_tensors(model: torch.nn.Module, *, include_buffers: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Every parameter under every name it has (tied weights appear under each name)."""
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    if include_buffers:
        persistent = set(model.state_dict(keep_vars=True))
        named += [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in persistent]
    return named


def trainable_flags(model: torch.nn.Module) -> dict[str, bool]:
    """``requires_grad`` of every parameter, by name."""
    return {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}


def tie_groups(model: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """Names that share one parameter, plus peft's trainable copies of such a parameter.

    A ``modules_to_save`` copy of a tied module starts equal to it; training
    only the copy makes the pair drift apart, which the diff reports.
    """
    groups: dict[int, list[str]] = {}
    names = []
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        names.append(name)
    tied = [members for members in groups.values() if len(members) > 1]
    member_of = {name: i for i, members in enumerate(tied) for name in members}
    for name in names:
        if ".modules_to_save." in name:
            original = _COPY_ORIGINAL.sub(".original_module.", name)
            if original in member_of:
                tied[member_of[original]].append(name)
    return tuple(tuple(members) for members in tied)


def gradient_seen(model: torch.nn.Module, names: frozenset[str]) -> frozenset[str] | None:
    """Which of ``names`` hold a non-zero ``.grad`` now; None when no parameter has any grad."""
    any_grad = False
    seen = set()
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            grad = param.grad
            if grad is None:
                continue
            any_grad = True
            if name in names and bool(torch.count_nonzero(grad).item()):
                seen.add(name)
    return frozenset(seen) if any_grad else None


def _unpickler_reason(exc: Exception) -> str:
    """The reason in torch's weights-only refusal, without its paragraph of advice to load unsafely."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.DOTALL)
    return " ".join(found.group(1).split()) if found and found.group(1).strip() else text


def load_pickle(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Tensors from pickle checkpoints, loaded with ``weights_only=True`` (no code runs)."""
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # torch warns (UserWarning) about pickle protocols other than 2, on every load: not ours to show.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    # Legacy (non-zip) pickles cannot be memory-mapped.
                    loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{file}: refused by torch.load(weights_only=True): {_unpickler_reason(exc)}"
            ) from None
        if not isinstance(loaded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise CheckpointError(f"{file}: not a flat mapping of names to tensors")
        for key, tensor in loaded.items():
            if key in out:
                raise CheckpointError(f"{file}: tensor {key!r} also stored in another file")
            out[key] = tensor
    return out
