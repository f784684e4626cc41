"""Saved peft adapters: how their keys map onto the base model, and auditing one against its base.

peft saves ``base_model.model.<module>.lora_A.weight`` (the adapter name
dropped), ``lora_embedding_A`` without ``.weight``, and full copies of
``modules_to_save`` modules and trained biases under their base names.
Other methods save their own tensors the same way (``...q_proj.hada_w1_a``,
``...q_proj.oft_R.weight``), shared ones at the model level
(``base_model.vera_A``), and prompt learning ``prompt_embeddings``; which
names are an adapter's own comes from peft's tuner classes
(:mod:`peft_names`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftaudit.verification.causes import Cause
from peftaudit.verification.compare import compare, nonfinite_count
from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.expectations import Expectations, Pattern
from peftaudit.verification.lora_config import LoraSettings
from peftaudit.verification.peft_names import PeftNames, peft_names
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.verdict import Finding, Problem, Verdict, severity_for

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.*)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")
#: VB-LoRA with ``save_only_topk_weights`` saves ``vblora_logits_A_topk_indices`` / ``_topk_weights``
#: (``VBLoRAModel._get_adapter_state_dict``) instead of the trained logits: derived from them.
_TOPK = re.compile(r"^(?P<name>\w+)_topk_(indices|weights)$")


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
    #: Trained adapter-only tensors with no base counterpart (LoHa/LoKr factors, VeRA
    #: scales, OFT/BOFT rotations, AdaLoRA's lora_E, IA3 vectors, DoRA magnitudes,
    #: prompt embeddings, trainable-token deltas).
    extras: tuple[str, ...]
    #: Adapter-only tensors training never changes (VeRA's saved projections ``vera_A``/``vera_B``).
    fixed: tuple[str, ...] = ()
    #: Adapter-only tensors saved in place of trained ones, derived from them (VB-LoRA's top-k).
    derived: tuple[str, ...] = ()

    @property
    def trained(self) -> tuple[str, ...]:
        """Every tensor training must change: both factors of each LoRA pair, then the extras."""
        return (*[key for pair in self.pairs for key in (pair.a, pair.b)], *self.extras)


def base_module(path: str) -> str:
    """``base_model.model.x.q_proj.base_layer`` -> ``x.q_proj``."""
    return path.removeprefix(_PREFIX).replace(".base_layer", "")


def adapter_part(name: str, names: PeftNames | None = None) -> tuple[int, str] | None:
    """Where ``name`` names a peft adapter's own tensor: (index of that dotted part, "trained"/"fixed"/"derived").

    None for a copy of a base tensor (``modules_to_save``, a bias). The first part
    that is a tuner's attribute (``lora_A``, ``hada_w1_a``, ``vera_A``) or a prompt
    learning name decides.
    """
    names = names or peft_names()
    for index, part in enumerate(name.split(".")):
        if part in names.trained:
            return index, "trained"
        if part in names.fixed:
            return index, "fixed"
        topk = _TOPK.match(part)
        if topk and topk["name"] in names.trained:
            return index, "derived"
    return None


def adapter_module(name: str, names: PeftNames | None = None) -> str | None:
    """The base module an adapter tensor belongs to (``...q_proj.hada_w1_a`` -> ``x.q_proj``).

    None for model-level tensors (``base_model.vera_A``, ``prompt_embeddings``) and copies.
    """
    found = adapter_part(name, names)
    parts = name.split(".")
    if found is None or found[0] <= 2 or parts[:2] != ["base_model", "model"]:
        return None
    return base_module(".".join(parts[: found[0]]))


def read_layout(names: Sequence[str]) -> AdapterLayout:
    """Classify a saved adapter's keys."""
    known = peft_names()
    factors: dict[tuple[str, bool], dict[str, str]] = {}
    copies: dict[str, str] = {}
    sorted_keys: dict[str, list[str]] = {"trained": [], "fixed": [], "derived": []}
    for name in names:
        match = _LORA.match(name)
        if match:
            kind = match["kind"]
            # Nested wrappers (MoE experts) keep their own path, so each pairs with its own factor.
            factors.setdefault((match["module"], kind.startswith("lora_embedding")), {})[kind[-1]] = name
            continue
        found = adapter_part(name, known)
        if found is not None:
            sorted_keys[found[1]].append(name)
            continue
        copies[name] = base_module(name)
    pairs = []
    extras = sorted_keys["trained"]
    for (path, embedding), parts in factors.items():
        if "A" in parts and "B" in parts:
            pairs.append(LoraPair(base_module(path), parts["A"], parts["B"], embedding))
        else:
            extras.extend(parts.values())
    return AdapterLayout(
        tuple(pairs), copies, tuple(extras), tuple(sorted_keys["fixed"]), tuple(sorted_keys["derived"])
    )


def _is_mica(lora: LoraSettings) -> bool:
    """MiCA (``init_lora_weights="mica"``) freezes lora_B and trains lora_A from zero (peft's ``MiCALinearVariant``)."""
    init = lora.init_lora_weights
    return isinstance(init, str) and init.lower() == "mica"


def zero_at_init(pair: LoraPair, layout: AdapterLayout, lora: LoraSettings) -> str:
    """The factor of ``pair`` peft initialises to zero, so that it stays zero until trained.

    ``lora_B`` for LoRA; ``lora_embedding_A`` for embeddings; ``lora_A`` under MiCA;
    AdaLoRA's ``lora_E`` (its A and B start random).
    """
    if pair.embedding or _is_mica(lora):
        return pair.a
    singular = pair.a.rsplit("lora_A", 1)[0] + "lora_E"
    return singular if singular in layout.extras else pair.b


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
    # "lora_only", and the other methods' own: "boft_only", "vera_only", ... (peft's _get_learnable_bias_state_dict)
    if base_name.endswith(".bias") and (lora.bias == "all" or lora.bias.endswith("_only")):
        return "bias"
    return ""


def rank_mismatch(pair: LoraPair, adapter: Snapshot, target: str | None, base: Snapshot, lora: LoraSettings) -> str:
    """Why ``pair``'s factors do not have the rank its config gives it ("" when they do).

    peft builds each module with the config's rank (``r`` or a ``rank_pattern``
    entry) and refuses to load factors of another size, so such an adapter
    cannot be what the config describes. Fused expert tensors (3-D targets)
    stack one factor per expert and are left to the shape check.
    """
    if lora.peft_type != "LORA":
        # AdaLoRA: factors of init_r rows, cut to each module's kept rank when saved.
        return ""
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
    config gives it; every other trained adapter tensor (LoHa, LoKr, VeRA,
    OFT, BOFT, AdaLoRA, IA3, prompt learning, ...) must belong to a module
    the base has, and must not be empty or still all zeros (the factor peft
    starts at zero, so that the adapter starts as a no-op). A full copy of a
    base tensor must differ from the base if it was trained on purpose, and
    must be one the config (or an ``--expect``/``--allow`` pattern) says to
    save. Tensors training never changes (VeRA's saved projections) are
    neither. ``lora`` is the adapter's config, read by :func:`read_lora_settings`.
    """
    layout = read_layout([t.name for t in adapter])
    findings: list[Finding] = []
    patterns = tuple(must) + tuple(may)
    config = adapter.adapter_config or {}
    # AdaLoRA's allocator prunes ranks; with a rank_pattern peft saves each module cut to its kept rank,
    # which may be none (AdaLoraModel.resize_state_dict_by_rank_pattern).
    pruned = lora.peft_type == "ADALORA" and bool(config.get("rank_pattern"))

    def add(problem: Problem, name: str, message: str, cause: Cause | None = None, **kw: Any) -> None:
        findings.append(Finding(problem, name, severity_for(cause, tolerate), message, cause, **kw))

    def expected(name: str) -> bool | None:
        return any(p.matches(name) for p in patterns) if patterns else None

    intended = intended_changed = compared = changed = 0
    zero_factors = set()
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
        zero = zero_at_init(pair, layout, lora)
        zero_factors.add(zero)
        if a.numel == 0 or b.numel == 0:
            if pruned:
                intended -= 1  # the allocator kept no rank of this module
            else:
                empty = pair.a if a.numel == 0 else pair.b
                add(Problem.UNCHANGED, empty, "expected to change but is empty", Cause.EMPTY_TENSOR)
        elif adapter[zero].is_zero and adapter[zero].numel:
            cause = Cause.LORA_B_ZERO if zero == pair.b else None
            add(Problem.UNCHANGED, zero, _STILL_ZERO, cause)
        else:
            intended_changed += 1
    base_modules = {fp.name.rsplit(".", 1)[0] for fp in base if "." in fp.name}
    for key in layout.extras:
        saved = adapter[key]
        if key in zero_factors:
            continue  # AdaLoRA's lora_E: judged with its pair
        intended += 1
        module = adapter_module(key)
        if module is not None and not _module_in_base(module, base_modules):
            add(Problem.ADDED, key, f"targets {module}, which the base model does not have")
        if saved.numel == 0:
            if pruned:
                intended -= 1
            else:
                add(Problem.UNCHANGED, key, "expected to change but is empty", Cause.EMPTY_TENSOR)
        elif saved.is_zero:
            add(Problem.UNCHANGED, key, _STILL_ZERO)
        else:
            intended_changed += 1
    for key in (*layout.trained, *layout.copies, *layout.fixed, *layout.derived):
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
    # Fixed tensors are saved by peft whatever was trained: patterns do not have to name them.
    for key in (*layout.extras, *layout.derived):
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


#: An adapter tensor peft initialises to zero (so that the adapter starts as a no-op) that is zero still.
_STILL_ZERO = "expected to change but is still all zeros: peft starts it at zero, so the adapter was never trained"


def _module_in_base(module: str, base_modules: set[str]) -> bool:
    """Whether the base holds tensors of ``module`` or of a module above it.

    Above it: a wrapper peft inserts keeps its own part (LoRA's trainable tokens
    live in ``embed_tokens.token_adapter``); a task model nests the bare base
    under a prefix (see :func:`_in_base`).
    """
    for candidate in (module, module.partition(".")[2]):
        parts = candidate.split(".")
        if any(".".join(parts[:end]) in base_modules for end in range(len(parts), 0, -1)):
            return True
    return False


def adapter_expectations(adapter: Snapshot) -> Expectations:
    """Between two saves of one adapter: its trained tensors must change, its saved copies may.

    Tensors training never changes (VeRA's projections, MiCA's frozen lora_B)
    are frozen: they must be bit-for-bit the same in both saves.
    """
    layout = read_layout([t.name for t in adapter])
    must = set(layout.trained)
    init = (adapter.adapter_config or {}).get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        must -= {pair.b for pair in layout.pairs}
    return Expectations(
        must=frozenset(must), may=frozenset(layout.copies) | frozenset(layout.derived), origin=("adapter",)
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
    if lora.peft_type != "LORA":
        raise CheckpointError(
            f"{lora.where}: peft_type {lora.peft_type!r}: a merged model is checked against LoRA adapters only "
            "(its rank and scale checks are LoRA's); audit the adapter itself with verify(base, adapter=...)"
        )
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
