"""``snapshot()`` and ``verify()``: the two functions users call."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftaudit.errors import PeftauditError
from peftaudit.verification.adapter import adapter_expectations, audit_adapter, merged_expectations
from peftaudit.verification.causes import Cause
from peftaudit.verification.checkpoint import SafetensorsValues, locate
from peftaudit.verification.diff import Evidence, diff
from peftaudit.verification.expectations import Expectations, Role, from_patterns, patterns
from peftaudit.verification.fingerprint import SamplePolicy, TensorFingerprint, digest_chunks
from peftaudit.verification.lora_config import read_lora_settings
from peftaudit.verification.lowrank import DEFAULT_BUDGET, check_merge
from peftaudit.verification.snapshots import Snapshot, is_snapshot_file
from peftaudit.verification.values import Progress, parallel_map
from peftaudit.verification.verdict import Verdict

if TYPE_CHECKING:  # pragma: no cover
    import torch

Source = Any  # a torch.nn.Module, a path (checkpoint or snapshot JSON), or a Snapshot


def snapshot(
    model_or_path: Source,
    *,
    policy: SamplePolicy | None = None,
    include_buffers: bool = False,
    allow_pickle: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    distributed: bool = False,
    group: Any = None,
) -> Snapshot:
    """Fingerprint every tensor of a model, a checkpoint, or load a saved snapshot.

    ``model_or_path`` is a ``torch.nn.Module`` (a PeftModel or any model), a
    checkpoint path (a directory, a ``.safetensors`` file, or a sharded index),
    or a snapshot JSON written by :meth:`Snapshot.save`. The model is never
    modified, moved or cast. ``policy`` says which elements to keep for sizing
    later changes. With ``distributed=True`` every rank of the default (or
    given) process group must call this: each hashes its share and all ranks
    receive the combined snapshot.
    """
    policy = policy or SamplePolicy()
    if isinstance(model_or_path, Snapshot):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        if distributed:
            raise PeftauditError("distributed=True fingerprints a live model, not a path")
        if is_snapshot_file(model_or_path):
            return Snapshot.load(model_or_path)
        return _checkpoint_snapshot(Path(model_or_path), policy, allow_pickle, workers, progress)
    if not _is_module(model_or_path):
        raise PeftauditError(
            f"cannot snapshot a {type(model_or_path).__name__}: give a torch module, a checkpoint path, "
            "or a snapshot file"
        )
    if distributed:
        from peftaudit.verification.distributed import distributed_snapshot

        return distributed_snapshot(model_or_path, policy, include_buffers=include_buffers, group=group)
    return _model_snapshot(model_or_path, policy, include_buffers, workers, progress, keep_values=False)


def _model_snapshot(
    model: torch.nn.Module,
    policy: SamplePolicy,
    include_buffers: bool,
    workers: int | None,
    progress: Progress | None,
    *,
    keep_values: bool,
) -> Snapshot:
    from peftaudit.verification.expectations import from_model
    from peftaudit.verification.live import fingerprint_tensors, module_tensors, tie_groups, trainable_flags

    tensors, values = fingerprint_tensors(
        module_tensors(model, include_buffers=include_buffers),
        policy,
        trainable=trainable_flags(model),
        workers=workers,
        progress=progress,
    )
    return Snapshot(
        tensors=tensors,
        source=f"{type(model).__name__} (live)",
        kind="model",
        policy=policy,
        tied=tie_groups(model),
        expectations=from_model(model),
        values=values if keep_values else None,
    )


def _checkpoint_snapshot(
    path: Path, policy: SamplePolicy, allow_pickle: bool, workers: int | None, progress: Progress | None
) -> Snapshot:
    layout = locate(path, allow_pickle=allow_pickle)
    kind = "adapter" if layout.is_adapter else "checkpoint"
    if layout.format == "pickle":
        from peftaudit.verification.live import fingerprint_tensors, load_pickle

        loaded = load_pickle(layout.files)
        tensors, torch_values = fingerprint_tensors(
            list(loaded.items()), policy, stats=False, workers=workers, progress=progress
        )
        return Snapshot(
            tensors, layout.description, kind, policy, adapter_config=layout.adapter_config, values=torch_values
        )

    values = SafetensorsValues(layout)

    def one(spec_index: int) -> TensorFingerprint:
        spec = layout.specs[spec_index]
        positions = policy.positions(_numel(spec.shape))
        sample = None
        if policy.points and _byte_addressable(spec.dtype):
            sample = values.gather(spec.name, positions)
        digest = digest_chunks(_report(values.chunks(spec.name), progress))
        return TensorFingerprint(spec.name, spec.dtype, spec.shape, digest, sample=sample)

    def cost(i: int) -> int:
        _, entry = layout.entries[layout.specs[i].name]
        return entry.stop - entry.start

    found = parallel_map(one, list(range(len(layout.specs))), workers=workers, cost=cost)
    return Snapshot(
        tuple(fp for fp in found if isinstance(fp, TensorFingerprint)),
        layout.description,
        kind,
        policy,
        adapter_config=layout.adapter_config,
        values=values,
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _byte_addressable(code: str) -> bool:
    from peftaudit.verification.dtypes import lookup

    dtype = lookup(code)
    return dtype is not None and dtype.itemsize is not None


def _report(chunks: Iterable[Any], progress: Progress | None) -> Iterable[Any]:
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(len(chunk))


def _causes(names: Iterable[str | Cause]) -> frozenset[Cause]:
    out = set()
    for name in names:
        try:
            out.add(Cause(name))
        except ValueError:
            valid = ", ".join(c.value for c in Cause)
            raise PeftauditError(f"unknown cause {name!r} to tolerate; known causes: {valid}") from None
    return frozenset(out)


def _texts(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def verify(
    before: Source,
    after: Source = None,
    *,
    adapter: Source = None,
    expect: str | Sequence[str] = (),
    allow: str | Sequence[str] = (),
    tolerate: Iterable[str | Cause] = (),
    evidence: Evidence | None = None,
    rank_budget: int = DEFAULT_BUDGET,
    allow_pickle: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    distributed: bool = False,
    group: Any = None,
) -> Verdict:
    """Prove that only the intended tensors changed between ``before`` and ``after``.

    ``before`` and ``after`` are each a :class:`Snapshot`, a live model, a
    checkpoint path or a snapshot file. Expectations come from, in order: a
    live PeftModel given as ``after`` (its adapters, ``modules_to_save`` and
    trainable biases), the ``before`` snapshot if it was taken of one, the
    ``adapter`` (for a merged model), plus ``expect`` (must change) and
    ``allow`` (may change) patterns. Without any, nothing may change.

    With ``adapter`` and ``after``: ``after`` is ``before`` with the adapter
    merged in; only its targets may change, each by a delta of rank at most
    r matching ``scale * B @ A``. With ``adapter`` and no ``after``: the
    saved adapter is audited against the base.

    ``tolerate`` downgrades the named causes (e.g. ``"merge-rounding"``) from
    failures to warnings. ``evidence`` (from the Trainer callback) separates
    "no gradient" from "optimizer never stepped".
    """
    if after is None and adapter is None:
        raise PeftauditError("verify needs an 'after' (model, checkpoint or snapshot) or an adapter")
    tolerated = _causes(tolerate)
    expect, allow = _texts(expect), _texts(allow)
    opened: list[Snapshot] = []

    def load(source: Source) -> Snapshot:
        if isinstance(source, Snapshot):
            return source
        if _is_module(source):
            if distributed:
                return snapshot(source, distributed=True, group=group)
            # Unlike a "before", a live "after" is read now: keep access to its values for sizing.
            return _model_snapshot(source, SamplePolicy(), False, workers, progress, keep_values=True)
        snap = snapshot(source, allow_pickle=allow_pickle, workers=workers, progress=progress)
        opened.append(snap)
        return snap

    try:
        before_snap = load(before)
        if after is None:
            adapter_snap = load(adapter)
            lora = read_lora_settings(adapter_snap.adapter_config, _config_where(adapter, adapter_snap))
            return audit_adapter(
                before_snap, adapter_snap, lora, must=patterns(expect), may=patterns(allow), tolerate=tolerated
            )
        after_snap = load(after)
        expectations = _expectations(before_snap, after_snap, after)
        merge = None
        if adapter is not None:
            adapter_snap = load(adapter)
            lora = read_lora_settings(adapter_snap.adapter_config, _config_where(adapter, adapter_snap))
            merge = merged_expectations(before_snap, adapter_snap, lora)
            expectations = expectations.combine(merge.expectations)
        expectations = expectations.combine(from_patterns(expect, allow))
        if distributed and evidence is not None:
            from peftaudit.verification.distributed import gather_evidence

            evidence = gather_evidence(evidence, group=group)
        elif evidence is None and _is_module(after) and not distributed:
            evidence = _grad_evidence(after, expectations, after_snap)
        verdict = diff(before_snap, after_snap, expectations, evidence=evidence, tolerate=tolerated)
        if merge is not None:
            verdict = check_merge(verdict, before_snap, after_snap, adapter_snap, merge, budget=rank_budget)
        return verdict
    finally:
        for snap in opened:
            if isinstance(snap.values, SafetensorsValues):
                snap.values.close()


def _config_where(source: Source, snap: Snapshot) -> str:
    """The adapter_config.json an adapter's settings come from, as a user would name it."""
    if isinstance(source, (str, os.PathLike)):
        if is_snapshot_file(source):
            return f"the adapter_config.json recorded in {source}"
        path = Path(source)
        return str((path if path.is_dir() else path.parent) / "adapter_config.json")
    if isinstance(source, Snapshot):
        return f"the adapter_config.json recorded in the snapshot of {snap.source}"
    return f"{snap.source}: adapter_config.json (pass the adapter as the folder save_pretrained wrote)"


def _is_module(source: Source) -> bool:
    """A live model (anything with ``named_parameters``), as opposed to a path or a snapshot."""
    return hasattr(source, "named_parameters") and not isinstance(source, (str, os.PathLike, Snapshot))


def _expectations(before: Snapshot, after: Snapshot, after_source: Source) -> Expectations:
    if _is_module(after_source) and after.expectations is not None:
        return after.expectations
    for snap in (before, after):
        if snap.expectations is not None:
            return snap.expectations
    if before.kind == after.kind == "adapter":
        return adapter_expectations(after)
    return Expectations()


def _grad_evidence(model: Any, expectations: Expectations, after: Snapshot) -> Evidence | None:
    from peftaudit.verification.live import gradient_seen

    intended = frozenset(t.name for t in after if expectations.role(t.name) is Role.MUST)
    seen = gradient_seen(model, intended)
    return None if seen is None else Evidence(gradient_seen=seen)
