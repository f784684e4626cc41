"""Fingerprinting under ``torch.distributed``: each rank hashes its share, all ranks get the whole.

Replicated parameters (DDP, or plain models on every rank) are split between
ranks by index, so each is hashed once. Sharded parameters (DTensor, as FSDP2
makes them) are hashed shard by shard on the rank that holds each shard; the
combined digest is a digest of the per-rank digests, so a change in any shard
shows. Records travel with ``all_gather_object`` (a few hundred bytes per
tensor), never the weights. Every rank must call in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.distributed as dist
import xxhash

from peftaudit.errors import PeftauditError
from peftaudit.verification.diff import Evidence
from peftaudit.verification.expectations import from_model
from peftaudit.verification.fingerprint import SamplePolicy, TensorFingerprint
from peftaudit.verification.live import fingerprint_tensors, module_tensors, tie_groups, trainable_flags
from peftaudit.verification.snapshots import Snapshot


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP prefixes every name with "module."; fingerprint the model it wraps.
    inner = getattr(model, "module", None)
    if type(model).__name__ == "DistributedDataParallel" and isinstance(inner, torch.nn.Module):
        return inner
    return model


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def distributed_snapshot(
    model: torch.nn.Module, policy: SamplePolicy, *, include_buffers: bool = False, group: Any = None
) -> Snapshot:
    """The combined snapshot of a model spread over the ranks of ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise PeftauditError("distributed=True needs torch.distributed to be initialised on every rank")
    model = _unwrap(model)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    named = module_tensors(model, include_buffers=include_buffers)
    flags = trainable_flags(model)
    first_index: dict[int, int] = {}
    mine: list[tuple[str, torch.Tensor]] = []
    layouts: dict[str, str] = {}
    for index, (name, tensor) in enumerate(named):
        owner = first_index.setdefault(id(tensor), index)
        if owner != index:
            continue  # an alias of a tensor already assigned (tied weights)
        if _is_dtensor(tensor):
            local = cast(Any, tensor).to_local()
            layouts[name] = f"{tuple(tensor.placements)} over {world} ranks"  # type: ignore[attr-defined]
            mine.append((name, local))
        elif index % world == rank:
            mine.append((name, tensor))
    local_fps, _ = fingerprint_tensors(mine, policy)
    records = [(fp.to_dict(), fp.name in layouts) for fp in local_fps]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records, group=group)

    whole: dict[str, TensorFingerprint] = {}
    shards: dict[str, list[TensorFingerprint]] = {}
    for rank_records in gathered:
        for data, sharded in rank_records:
            fp = TensorFingerprint.from_dict(data)
            if sharded:
                shards.setdefault(fp.name, []).append(fp)
            else:
                whole[fp.name] = fp
    for name, parts in shards.items():
        whole[name] = _combine(name, parts, named_shape=_global_shape(named, name), layout=layouts[name])

    out = []
    for name, tensor in named:
        base = whole[named[first_index[id(tensor)]][0]]
        # Every name of a shared tensor gets its fingerprint; only the name and trainability differ.
        out.append(dataclasses.replace(base, name=name, trainable=flags.get(name)))
    return Snapshot(
        tensors=tuple(out),
        source=f"{type(model).__name__} (live, {world} ranks)",
        kind="model",
        policy=policy,
        tied=tie_groups(model),
        expectations=from_model(model),
    )


def _global_shape(named: list[tuple[str, torch.Tensor]], name: str) -> tuple[int, ...]:
    return next(tuple(t.shape) for n, t in named if n == name)


def _combine(
    name: str, parts: list[TensorFingerprint], *, named_shape: tuple[int, ...], layout: str
) -> TensorFingerprint:
    """One fingerprint from per-rank shard fingerprints, in rank order."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(f"{part.digest}:{list(part.shape)};".encode())
    counts = [p.nonfinite for p in parts]
    samples = [p.sample for p in parts]
    return TensorFingerprint(
        name=name,
        dtype=parts[0].dtype,
        shape=named_shape,
        digest=hasher.hexdigest(),
        nonfinite=None if any(c is None for c in counts) else sum(c for c in counts if c is not None),
        sample=None if any(s is None for s in samples) else b"".join(s for s in samples if s is not None),
        layout=f"{layout}: " + ",".join("x".join(map(str, p.shape)) for p in parts),
    )


def gather_evidence(evidence: Evidence, group: Any = None) -> Evidence:
    """The union of every rank's evidence, so all ranks reach the same verdict."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (evidence.gradient_seen, evidence.in_optimizer), group=group)

    def union(index: int) -> frozenset[str] | None:
        sets = [g[index] for g in gathered if g[index] is not None]
        return frozenset().union(*sets) if sets else None

    return Evidence(gradient_seen=union(0), in_optimizer=union(1))
