"""Target presets resolved against an inventory: the names to write and what peft will adapt.

A preset names a set of modules by their role (``qv``, ``attention``, ``mlp``)
or by peft's own rule (``all-linear``: every ``nn.Linear`` and ``Conv1D`` but the
output embedding). Resolving it gives a :class:`TargetSpec`, the
``target_modules`` / ``target_parameters`` a config file holds, chosen so that
peft's matching selects exactly the preset's modules and nothing else:

* the shortest module-path suffix that matches only chosen modules (``q_proj``;
  ``attn.c_proj`` where GPT-2's ``c_proj`` also names the MLP output);
* where only a layer index tells modules apart (BERT's ``layer.0.output.dense``
  against ``attention.output.dense``), a regular expression over the whole path,
  with the exact per-layer list kept for formats that cannot take one.

Which paths a spec selects is :mod:`peftaudit.matching` (peft's rules, shared
with the readiness checks and the memory estimator); what peft then creates,
and so the exact adapter parameter count, is
:func:`peftaudit.memory.targets.lora_adapters`. This module only chooses names
and checks that peft will do what the names say.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftaudit.architecture import ModuleRole as R
from peftaudit.errors import PeftauditError
from peftaudit.matching import all_linear, is_all_linear, targets_match
from peftaudit.towers import LANGUAGE_MODEL, split_towers, tower_of

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.memory.targets import ModuleAdapter, SavedModule

#: The presets, narrowest first.
PRESETS: tuple[str, ...] = ("qv", "attention", "mlp", "all-linear", "all-linear+experts")

PRESET_HELP: dict[str, str] = {
    "qv": "query and value projections (peft's default; fused qkv where there is no separate q and v)",
    "attention": "every attention projection: q, k, v, o, fused qkv, MLA down/up projections",
    "mlp": "the dense MLP: gate, up, down (and shared experts of MoE models)",
    "all-linear": "peft's all-linear: every Linear and Conv1D except the output head (and the classifier)",
    "all-linear+experts": "all-linear plus fused MoE expert weights through target_parameters",
}

_QV = (R.ATTENTION_Q, R.ATTENTION_V)
_ATTENTION = (R.ATTENTION_Q, R.ATTENTION_K, R.ATTENTION_V, R.ATTENTION_O, R.ATTENTION_QKV, R.ATTENTION_OTHER)
_MLP = (R.MLP_GATE, R.MLP_UP, R.MLP_GATE_UP, R.MLP_DOWN, R.SHARED_EXPERT)

_INDEX = re.compile(r"^\d+$")


class TargetError(PeftauditError):
    """A preset or target list that cannot be resolved on this model."""


@dataclass(frozen=True)
class TargetSpec:
    """Targets as a config file writes them: peft's ``LoraConfig`` fields.

    ``names`` is always an exact list (peft matches a name against the end of a
    module path); when telling modules apart needs layer indices, ``pattern`` is
    the equivalent regular expression (peft's string form, matched against the
    whole path), which is what formats that accept one should write.
    """

    names: tuple[str, ...] = ()
    pattern: str | None = None
    parameters: tuple[str, ...] = ()
    """``target_parameters``: parameter-path suffixes (fused MoE experts)."""
    modules_to_save: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    """True when the targets are transformers ``Conv1D`` layers (GPT-2): their weight is stored (in, out)."""
    preset: str | None = None
    """The preset this came from; ``None`` for targets a user wrote."""

    @property
    def target_modules(self) -> str | tuple[str, ...]:
        """What peft's ``target_modules`` should be: the pattern if there is one, else the names."""
        return self.pattern if self.pattern is not None else self.names

    @property
    def needs_pattern(self) -> bool:
        """Whether the name list needs layer indices (a format without regular expressions gets a long list)."""
        return self.pattern is not None

    @classmethod
    def from_user(
        cls,
        target_modules: str | Sequence[str],
        *,
        parameters: Sequence[str] = (),
        modules_to_save: Sequence[str] = (),
        exclude: Sequence[str] = (),
        fan_in_fan_out: bool = False,
    ) -> TargetSpec:
        """Targets as a user wrote them: a list of names, ``"all-linear"`` or a regular expression."""
        if isinstance(target_modules, str):
            text = target_modules.strip()
            if "," in text and not _looks_like_regex(text):
                names: tuple[str, ...] = tuple(n.strip() for n in text.split(",") if n.strip())
                pattern = None
            elif text.lower() == "all-linear" or _looks_like_regex(text):
                names, pattern = (), text
            else:
                names, pattern = (text,), None
        else:
            names, pattern = tuple(target_modules), None
        return cls(
            names=names,
            pattern=pattern,
            parameters=tuple(parameters),
            modules_to_save=tuple(modules_to_save),
            exclude=tuple(exclude),
            fan_in_fan_out=fan_in_fan_out,
        )


@dataclass(frozen=True)
class TargetSelection:
    """A preset on one model: the spec to write and the modules and parameters it selects."""

    preset: str
    spec: TargetSpec
    modules: tuple[str, ...]
    """Module paths the preset selects, in model order."""
    parameters: tuple[str, ...] = ()
    """Parameter paths adapted directly (``target_parameters``), in model order."""
    notes: tuple[str, ...] = field(default=())
    """Why the selection is what it is (fallbacks, exclusions)."""


@dataclass(frozen=True)
class AdapterCount:
    """What peft creates for a spec at one rank: adapters, their parameters, saved copies."""

    adapters: tuple[ModuleAdapter, ...]
    saved: tuple[SavedModule, ...] = ()

    @property
    def lora_params(self) -> int:
        """Parameters in the LoRA matrices (``lora_A``/``lora_B``, embeddings' ``lora_embedding_*``)."""
        return sum(a.params for a in self.adapters)

    @property
    def saved_params(self) -> int:
        """Parameters of the full copies ``modules_to_save`` trains."""
        return sum(s.params for s in self.saved)

    @property
    def trainable(self) -> int:
        """Everything that trains: what ``PeftModel.get_nb_trainable_parameters()`` reports."""
        return self.lora_params + self.saved_params

    @property
    def module_paths(self) -> tuple[str, ...]:
        return tuple(a.path for a in self.adapters if a.parameter is None)

    @property
    def parameter_paths(self) -> tuple[str, ...]:
        return tuple(f"{a.path}.{a.parameter}" for a in self.adapters if a.parameter is not None)

    def by_role(self, inventory: Inventory) -> dict[str, int]:
        """LoRA parameters per module role (parameter adapters by their module's role), largest first."""
        roles = {m.path: m.role for m in inventory.modules}
        counts: dict[str, int] = {}
        for a in self.adapters:
            role = roles.get(a.path) or ("experts" if a.parameter is not None else "other")
            counts[role] = counts.get(role, 0) + a.params
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --- presets ------------------------------------------------------------------------------


def resolve_preset(inventory: Inventory, preset: str, *, task: str = "instruct") -> TargetSelection:
    """The modules ``preset`` selects on this model and the names that select exactly them.

    ``task="classification"`` keeps the classification head out of the targets
    and in ``modules_to_save`` (peft does the same for ``task_type="SEQ_CLS"``).
    """
    if preset not in PRESETS:
        raise TargetError(f"unknown target preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    notes: list[str] = []
    linear = [m for m in inventory.modules if m.path and m.is_linear]
    head = inventory.output_head
    classifiers = tuple(m.path for m in linear if m.role == R.CLASSIFIER)

    if preset == "qv":
        chosen = [m.path for m in linear if m.role in _QV]
        if not chosen:
            chosen = [m.path for m in linear if m.role == R.ATTENTION_QKV]
            if chosen:
                notes.append("no separate query and value projections: the fused qkv projection stands in for them")
        if not chosen:
            chosen = [m.path for m in linear if m.role == R.ATTENTION_OTHER]
            if chosen:
                notes.append("low-rank (MLA) attention: its query and key/value projections stand in for q and v")
    elif preset == "attention":
        chosen = [m.path for m in linear if m.role in _ATTENTION]
    elif preset == "mlp":
        chosen = [m.path for m in linear if m.role in _MLP]
    else:
        # peft's all-linear; the classification head is left out too (it trains in full, or starts untrained).
        chosen = [p for p in all_linear(inventory) if p not in classifiers]
        if head is not None:
            notes.append(f"the output head {head} is left out, as peft's all-linear does")
    parameters: list[str] = []
    if preset in ("mlp", "all-linear+experts"):
        # The routed experts are the MLP of an MoE layer; fused, they are reachable only as parameters.
        parameters = fused_expert_parameters(inventory)
        if preset == "all-linear+experts" and not parameters:
            notes.append("no fused expert weights: all-linear+experts is the same as all-linear here")
    scope = language_model_scope(inventory)
    if scope:
        # Vision-language models: the adapter goes on the language model; the vision tower stays frozen
        # and the projector is the caller's choice (modules_to_save), as the common recipes do.
        outside = [p for p in chosen if tower_of(p)[0] != LANGUAGE_MODEL]
        chosen = [p for p in chosen if tower_of(p)[0] == LANGUAGE_MODEL]
        if outside:
            notes.append(
                f"{len(outside)} modules of the vision tower and projector are left out: the adapter "
                f"goes on the language model ({', '.join(scope)})"
            )
    if not chosen and not parameters:
        raise TargetError(
            f"preset '{preset}' selects nothing on this {inventory.architecture}: no module has the "
            "roles it needs (see `peftaudit report MODEL --tree`, or give target modules by name)"
        )

    modules_to_save: tuple[str, ...] = ()
    if task == "classification" and classifiers:
        modules_to_save = tuple(names_for(classifiers, [m.path for m in inventory.modules if m.path])[0])
        notes.append("the classification head trains in full (modules_to_save): it starts untrained")

    selection = _selection(inventory, preset, chosen, parameters, modules_to_save, notes)
    return _settle(inventory, selection)


def language_model_scope(inventory: Inventory) -> tuple[str, ...]:
    """The language model's module paths on a vision-language model (``model.language_model``), else ``()``.

    Presets on such a model select only modules inside these paths (:mod:`peftaudit.towers`).
    """
    for tower in split_towers(inventory):
        if tower.name == LANGUAGE_MODEL:
            return tower.modules
    return ()


def _selection(
    inventory: Inventory,
    preset: str,
    chosen: Sequence[str],
    parameters: Sequence[str],
    modules_to_save: tuple[str, ...],
    notes: Sequence[str],
) -> TargetSelection:
    universe = [m.path for m in inventory.modules if m.path]
    names, pattern = names_for(chosen, universe)
    scoped = _scoped_pattern(chosen, universe, language_model_scope(inventory))
    if scoped is not None:
        # ``q_proj`` also names the vision tower's projections: one expression rooted at the language
        # model reads better than a per-layer list (which stays in ``names`` for formats without one).
        pattern = scoped
    param_names, param_pattern = names_for(parameters, [p.name for p in inventory.parameters])
    if param_pattern is not None:  # pragma: no cover - experts share names across layers
        param_names = tuple(parameters)
    wanted = set(chosen)
    conv1d = any(m.type == "Conv1D" for m in inventory.modules if m.path in wanted)
    spec = TargetSpec(
        names=names,
        pattern=pattern,
        parameters=param_names,
        modules_to_save=modules_to_save,
        fan_in_fan_out=conv1d,
        preset=preset,
    )
    return TargetSelection(preset, spec, tuple(chosen), tuple(parameters), tuple(notes))


def _settle(inventory: Inventory, selection: TargetSelection) -> TargetSelection:
    """Make the names say what peft will do.

    peft rewrites some names on MoE models whose experts transformers 5 fused
    (``gate_proj`` on DeepSeek-V3 becomes the fused experts' ``gate_up_proj``),
    so a dense module with such a name cannot be adapted by name at all. Those
    modules are dropped from the selection, with a note, so the written config
    and the count agree with what trains.
    """
    count = count_adapters(inventory, selection.spec, 1)
    adapted = set(count.module_paths)
    lost = [p for p in selection.modules if p not in adapted]
    if not lost:
        return selection
    kept = [p for p in selection.modules if p in adapted]
    note = (
        f"peft re-targets the names of {', '.join(compact_paths(lost))} on {inventory.model_type} to the "
        "fused experts (its transformers-5 MoE conversion), so they cannot be adapted by name and are left out"
    )
    settled = _selection(
        inventory,
        selection.preset,
        kept,
        selection.parameters,
        selection.spec.modules_to_save,
        (*selection.notes, note),
    )
    if not settled.modules and not settled.parameters:
        raise TargetError(f"preset '{selection.preset}' selects nothing peft can adapt by name on this model: {note}")
    return settled


def _scoped_pattern(chosen: Sequence[str], universe: Sequence[str], scope: Sequence[str]) -> str | None:
    """A regular expression selecting exactly ``chosen``: short names under the ``scope`` roots.

    ``None`` when there is no scope, when the short names alone already select exactly ``chosen``
    (no expression needed), or when no such expression selects exactly ``chosen``.
    """
    if not scope or not chosen:
        return None
    inside = [p for p in universe if any(p.startswith(root + ".") for root in scope)]
    short, short_pattern = names_for(chosen, inside)
    if short_pattern is not None:
        return None
    if {p for p in universe if any(targets_match([n], p) for n in short)} == set(chosen):
        return None
    roots = "|".join(re.escape(root) for root in scope if any(p.startswith(root + ".") for p in chosen))
    leaves = "|".join(r"\.".join(re.escape(part) for part in name.split(".")) for name in short)
    pattern = rf"(?:{roots})\.(?:.*\.)?(?:{leaves})"
    selected = {p for p in universe if re.fullmatch(pattern, p)}
    return pattern if selected == set(chosen) else None


def compact_paths(paths: Iterable[str], limit: int = 6) -> list[str]:
    """Paths with layer indices collapsed (``model.layers.*.mlp.gate_proj``), first seen first."""
    out: list[str] = []
    for path in paths:
        key = ".".join("*" if _INDEX.match(p) else p for p in path.split("."))
        if key not in out:
            out.append(key)
    if len(out) > limit:
        return [*out[:limit], f"... {len(out) - limit} more"]
    return out


def fused_expert_parameters(inventory: Inventory) -> list[str]:
    """Paths of fused 3-D expert weights (``mlp.experts.gate_up_proj``), which LoRA reaches only as parameters.

    Expert biases (gpt-oss ``gate_up_proj_bias``) are left out: peft adapts weight matrices.
    """
    return [p.name for p in inventory.parameters if p.kind == "experts" and len(p.shape) == 3]


# --- counting (peft's decisions, from the shared model of peft) -----------------------------------


def count_adapters(
    inventory: Inventory,
    spec: TargetSpec,
    rank: int,
    *,
    rank_pattern: Mapping[str, int] | None = None,
    dropout: float = 0.0,
) -> AdapterCount:
    """Exactly what ``get_peft_model`` creates for ``spec`` at ``rank``: every adapter and saved copy.

    Raises :class:`TargetError` where peft raises (targets matching nothing, a
    target LoRA cannot wrap, dropout with ``target_parameters``).
    """
    from peftaudit.memory.plan import PlanError, TrainingPlan
    from peftaudit.memory.targets import lora_adapters, saved_modules

    plan = TrainingPlan(
        method="lora",
        rank=rank,
        targets=spec.target_modules,
        target_parameters=spec.parameters,
        exclude=spec.exclude,
        modules_to_save=spec.modules_to_save,
        rank_pattern=tuple((rank_pattern or {}).items()),
        dropout=dropout,
    )
    try:
        adapters = lora_adapters(inventory, plan)
        saved = saved_modules(inventory, plan)
    except PlanError as exc:
        raise TargetError(str(exc)) from exc
    return AdapterCount(adapters=tuple(adapters), saved=tuple(saved))


# --- matching, as peft matches, for the readiness checks ----------------------------------------


def spec_matches(spec: TargetSpec, path: str, *, linear_paths: Iterable[str] = ()) -> bool:
    """Whether the spec's ``target_modules`` (without peft's MoE rewriting) selects ``path``.

    ``linear_paths`` is what ``all-linear`` expands to (:func:`peftaudit.matching.all_linear`),
    when the spec uses it; a caller testing every module passes it once as a set.
    """
    if is_all_linear(spec.pattern):
        return path in (linear_paths if isinstance(linear_paths, AbstractSet) else set(linear_paths))
    return targets_match(spec.target_modules, path)


# --- names --------------------------------------------------------------------------------------------


def names_for(chosen: Sequence[str], universe: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """The shortest path suffixes that select exactly ``chosen`` out of ``universe``.

    Returns the exact name list and, when some name needs a layer index, the
    regular expression (over whole paths) that selects the same set with the
    indices generalised.
    """
    if not chosen:
        return (), None
    wanted = set(chosen)
    owners: dict[str, set[str]] = {}
    for path in universe:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            owners.setdefault(".".join(parts[-k:]), set()).add(path)

    names: list[str] = []
    alternatives: list[str] = []
    indexed = False
    for path in chosen:
        parts = path.split(".")
        best: str | None = None
        fallback: str | None = None
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not owners.get(suffix, set()) <= wanted:
                continue
            if any(_INDEX.match(p) for p in parts[-k:]):
                fallback = fallback or suffix
                continue
            best = suffix
            break
        name = best or fallback or path
        indexed = indexed or best is None
        if name not in names:
            names.append(name)
        alternative = r"\.".join(r"\d+" if _INDEX.match(p) else re.escape(p) for p in name.split("."))
        if alternative not in alternatives:
            alternatives.append(alternative)
    # Two chosen suffixes can overlap (``dense`` and ``output.dense``); keep the exact list minimal.
    names = [n for n in names if not any(o != n and n.endswith("." + o) for o in names)]
    if not indexed:
        return tuple(names), None
    pattern = r"(?:.*\.)?(?:" + "|".join(alternatives) + ")"
    selected = {p for p in universe if re.fullmatch(pattern, p)}
    return tuple(names), (pattern if selected == wanted else None)


def _looks_like_regex(text: str) -> bool:
    return any(ch in text for ch in "*+?[](){}|^$\\")
