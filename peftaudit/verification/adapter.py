"""Saved peft adapters: how their keys map onto the base model, and auditing one against its base.

peft saves ``base_model.model.<module>.lora_A.weight`` (the adapter name
dropped), ``lora_embedding_A`` without ``.weight``, and full copies of
``modules_to_save`` modules and trained biases under their base names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftaudit.verification.causes import Cause
from peftaudit.verification.compare import compare, nonfinite_count
from peftaudit.verification.expectations import Expectations, Pattern
from peftaudit.verification.lora_config import LoraSettings
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.verdict import Finding, Problem, Verdict, severity_for

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.*)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")
#: Adapter-only tensors: they have no counterpart in the base model.
_ADAPTER_ONLY = re.compile(r"\.(lora_magnitude_vector|lora_[A-Z]\w*|trainable_tokens_delta)(\.|$)")


@dataclass(frozen=True)
class LoraPair:
    """One LoRA adapter: its two factor tensors and the base module they modify."""

    module: str
    a: str
    b: str
    embedding: bool


@dataclass(frozen=True)
class AdapterLayout:
    """A saved adapter's tensors, sorted by what they mean for the base model."""

    pairs: tuple[LoraPair, ...]
    #: Adapter key -> base tensor name, for full copies (modules_to_save, biases).
    copies: Mapping[str, str]
    #: Adapter-only tensors with no base counterpart (DoRA magnitudes, trainable-token deltas).
    extras: tuple[str, ...]


def base_module(path: str) -> str:
    """``base_model.model.x.q_proj.base_layer`` -> ``x.q_proj``."""
    return path.removeprefix(_PREFIX).replace(".base_layer", "")


def read_layout(names: Sequence[str]) -> AdapterLayout:
    """Classify a saved adapter's keys."""
    factors: dict[tuple[str, bool], dict[str, str]] = {}
    copies: dict[str, str] = {}
    extras: list[str] = []
    for name in names:
        match = _LORA.match(name)
        if match:
            kind = match["kind"]
            # Nested wrappers (MoE experts) keep their own path, so each pairs with its own factor.
            factors.setdefault((match["module"], kind.startswith("lora_embedding")), {})[kind[-1]] = name
            continue
        if _ADAPTER_ONLY.search(name):
            extras.append(name)
            continue
        copies[name] = base_module(name)
    pairs = []
    for (path, embedding), parts in factors.items():
        if "A" in parts and "B" in parts:
            pairs.append(LoraPair(base_module(path), parts["A"], parts["B"], embedding))
        else:
            extras.extend(parts.values())
    return AdapterLayout(tuple(pairs), copies, tuple(extras))


def _in_base(name: str, base: Snapshot) -> str | None:
    """``name`` as the base checkpoint spells it.

    A task model nests the base model under a prefix (``bert.``, ``model.``,
    ``transformer.``) that a checkpoint of the bare model does not have.
    """
    if name in base:
        return name
    rest = name.partition(".")[2]
    return rest if rest and rest in base else None


def resolve_target(pair: LoraPair, adapter: Snapshot, base: Snapshot) -> str | None:
    """The base tensor a LoRA pair modifies: ``<module>.weight``, or a direct parameter matched by shape."""
    a, b = adapter[pair.a], adapter[pair.b]
    direct = _in_base(f"{pair.module}.weight", base)
    if direct is not None and _fits(base[direct].shape, a.shape, b.shape, pair.embedding):
        return direct
    for module in (pair.module, pair.module.partition(".")[2]):
        prefix = module + "."
        for fp in base:
            rest = fp.name[len(prefix) :] if fp.name.startswith(prefix) else ""
            if rest and "." not in rest and _fits(fp.shape, a.shape, b.shape, pair.embedding):
                return fp.name
    return direct


def _fits(weight: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...], embedding: bool) -> bool:
    if len(a) < 2 or len(b) < 2:
        return False
    rank, fan_in, fan_out = a[0], math.prod(a[1:]), b[0]
    if len(weight) == 2:
        out, inp = weight
        straight = out == fan_out and inp == fan_in
        transposed = out == fan_in and inp == fan_out
        return transposed if embedding else straight or transposed
    if len(weight) == 3:
        experts = weight[0]
        return rank % experts == 0 and sorted((fan_in, fan_out)) == sorted(weight[1:])
    # Convolutions: (out, in, *kernel) against A (r, in, *kernel) and B (out, r, ...).
    return weight[0] == fan_out and math.prod(weight[1:]) == fan_in


def copy_role(base_name: str, lora: LoraSettings) -> str:
    """Why an adapter holds a full copy of a base tensor: "modules_to_save", "bias", or ""."""
    if lora.module_matches(base_name.rsplit(".", 1)[0]):
        return "modules_to_save"
    if base_name.endswith(".bias") and lora.bias in ("all", "lora_only"):
        return "bias"
    return ""


def rank_mismatch(pair: LoraPair, adapter: Snapshot, target: str | None, base: Snapshot, lora: LoraSettings) -> str:
    """Why ``pair``'s factors do not have the rank its config gives it ("" when they do).

    peft builds each module with the config's rank (``r`` or a ``rank_pattern``
    entry) and refuses to load factors of another size, so such an adapter
    cannot be what the config describes. Fused expert tensors (3-D targets)
    stack one factor per expert and are left to the shape check.
    """
    if target is not None and len(base[target].shape) > 2:
        return ""
    rows = adapter[pair.a].shape[0] if adapter[pair.a].shape else 0
    rank, key = lora.rank_for(pair.module)
    if rows in (0, rank):
        return ""
    said = f"rank_pattern[{key!r}] {rank}" if key is not None else f"r {rank}"
    return f"has rank {rows} but {lora.where} gives {said}: peft cannot load it with this config"


def audit_adapter(
    base: Snapshot,
    adapter: Snapshot,
    lora: LoraSettings,
    *,
    must: Sequence[Pattern] = (),
    may: Sequence[Pattern] = (),
    tolerate: frozenset[Cause] = frozenset(),
) -> Verdict:
    """Check a saved adapter against the base it was trained on.

    Every LoRA pair must target a base tensor of matching shape and must have
    moved (``lora_B`` not zero, not empty, finite) and have the rank the
    config gives it; a full copy of a base tensor must differ from the base
    if it was trained on purpose, and must be one the config (or an
    ``--expect``/``--allow`` pattern) says to save. ``lora`` is the adapter's
    config, read by :func:`read_lora_settings`.
    """
    layout = read_layout([t.name for t in adapter])
    findings: list[Finding] = []
    patterns = tuple(must) + tuple(may)

    def add(problem: Problem, name: str, message: str, cause: Cause | None = None, **kw: Any) -> None:
        findings.append(Finding(problem, name, severity_for(cause, tolerate), message, cause, **kw))

    def expected(name: str) -> bool | None:
        return any(p.matches(name) for p in patterns) if patterns else None

    intended = intended_changed = compared = changed = 0
    for pair in layout.pairs:
        a, b = adapter[pair.a], adapter[pair.b]
        for key in (pair.a, pair.b):
            if expected(key) is False:
                add(Problem.ADDED, key, "adapter tensor matches no --expect/--allow pattern")
        intended += 1
        target = resolve_target(pair, adapter, base)
        if target is None:
            add(Problem.ADDED, pair.b, f"targets {pair.module}, which the base model does not have")
        elif not _fits(base[target].shape, a.shape, b.shape, pair.embedding) and a.numel and b.numel:
            add(
                Problem.RESHAPED,
                pair.b,
                f"factors {list(a.shape)} x {list(b.shape)} do not fit {target} {list(base[target].shape)}",
            )
        mismatch = rank_mismatch(pair, adapter, target, base, lora)
        if mismatch:
            add(Problem.RESHAPED, pair.a, mismatch)
        if a.numel == 0 or b.numel == 0:
            empty = pair.a if a.numel == 0 else pair.b
            add(Problem.UNCHANGED, empty, "expected to change but is empty", Cause.EMPTY_TENSOR)
        elif b.is_zero:
            add(Problem.UNCHANGED, pair.b, "expected to change but is still all zeros", Cause.LORA_B_ZERO)
        else:
            intended_changed += 1
    for key in (*[p.a for p in layout.pairs], *[p.b for p in layout.pairs], *layout.copies, *layout.extras):
        count = nonfinite_count(adapter[key], adapter.values)
        if count:
            add(Problem.NONFINITE, key, f"{count} NaN/Inf elements")
    for key, copied in layout.copies.items():
        saved = adapter[key]
        reason = copy_role(copied, lora)
        wanted = expected(key)
        allowed = wanted if wanted is not None else bool(reason)
        base_name = _in_base(copied, base) or copied
        if base_name not in base:
            if not allowed:
                add(Problem.ADDED, key, f"adapter saves {base_name}, which the base model does not have")
            continue
        compared += 1
        original = base[base_name]
        if original.same_bytes(saved):
            if allowed and (reason == "modules_to_save" or any(p.matches(key) for p in must)):
                intended += 1
                add(Problem.UNCHANGED, key, f"saved copy of {base_name} equals the base: never trained")
            continue
        changed += 1
        if allowed:
            if reason == "modules_to_save" or any(p.matches(key) for p in must):
                intended += 1
                intended_changed += 1
            continue
        cmp = compare(
            original,
            saved,
            before_values=base.values,
            after_values=adapter.values,
            before_policy=base.policy,
            after_policy=adapter.policy,
        )
        cause = Cause.TRAINED_BIAS if base_name.endswith(".bias") else Cause.LEFT_TRAINABLE
        add(Problem.UNEXPECTED_CHANGE, key, f"adapter saves a trained copy of {base_name}", cause, size=cmp.size)
    for key in layout.extras:
        if expected(key) is False:
            add(Problem.ADDED, key, "adapter tensor matches no --expect/--allow pattern")
    for pattern in must:
        if not any(pattern.matches(t.name) for t in adapter):
            add(Problem.UNMATCHED_PATTERN, pattern.text, "expected in the adapter, but matches no tensor")
    return Verdict(
        findings=tuple(findings),
        before=base.source,
        after=adapter.source,
        compared=compared,
        changed=changed,
        intended=intended,
        intended_changed=intended_changed,
        expectations=(lora.origin,) + (("--expect",) if patterns else ()),
    )


def adapter_expectations(adapter: Snapshot) -> Expectations:
    """Between two saves of one adapter: its LoRA factors must change, its saved copies may."""
    layout = read_layout([t.name for t in adapter])
    factors = {name for pair in layout.pairs for name in (pair.a, pair.b)}
    return Expectations(
        must=frozenset(factors), may=frozenset(layout.copies) | frozenset(layout.extras), origin=("adapter",)
    )


@dataclass(frozen=True)
class MergePlan:
    """What merging an adapter into a base may change, in base naming.

    ``targets`` maps each target base tensor to the LoRA pair merged into it;
    ``copies`` maps each base tensor the adapter saved whole (``modules_to_save``,
    trained biases) to its adapter key; ``unresolved`` are pairs whose target
    the base checkpoint does not name; ``lora`` is the adapter's config, which
    gives each target's scale.
    """

    expectations: Expectations
    targets: Mapping[str, LoraPair]
    copies: Mapping[str, str]
    unresolved: tuple[LoraPair, ...]
    lora: LoraSettings


def merged_expectations(base: Snapshot, adapter: Snapshot, lora: LoraSettings) -> MergePlan:
    """What a merge of ``adapter`` into ``base`` may change: its targets and its saved copies."""
    layout = read_layout([t.name for t in adapter])
    targets: dict[str, LoraPair] = {}
    unresolved = []
    for pair in layout.pairs:
        target = resolve_target(pair, adapter, base)
        if target is None:
            unresolved.append(pair)
        else:
            targets[target] = pair
    copies = {_in_base(name, base) or name: key for key, name in layout.copies.items()}
    expectations = Expectations(
        must=frozenset(targets),
        may=frozenset(copies),
        targets=frozenset(p.module for p in layout.pairs),
        rewrites_base=lora.rewrites_base,
        origin=("adapter", lora.origin),
    )
    return MergePlan(expectations, targets, copies, tuple(unresolved), lora)
