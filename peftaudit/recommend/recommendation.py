"""The recommendation: targets, rank, alpha, dropout, memory and readiness findings for one model.

:func:`recommend` is one pass, inventory in, frozen :class:`Recommendation`
out: choose the targets (a preset or the user's), choose the hyperparameters
(:mod:`peftaudit.recommend.rank`), price the alternatives (other presets, the
next rank down and up), fit a memory budget when one is given
(:mod:`peftaudit.recommend.budget`), and run the readiness checks on the
result. Renderers and exporters read the result and compute nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from peftaudit.recommend.budget import (
    BudgetFit,
    MicroBatch,
    fit_budget,
    recipe_peak_bytes,
    state_bytes,
    training_plan,
)
from peftaudit.recommend.checks import CheckContext, run_checks
from peftaudit.recommend.findings import Finding
from peftaudit.recommend.rank import TASKS, Reason, choose, hyperparameters_at, neighbours
from peftaudit.recommend.recipe import LoraRecipe, task_type_for
from peftaudit.recommend.targets import (
    PRESET_HELP,
    PRESETS,
    TargetError,
    TargetSelection,
    TargetSpec,
    compact_paths,
    count_adapters,
    fused_expert_parameters,
    language_model_scope,
    resolve_preset,
)
from peftaudit.render.numbers import count
from peftaudit.towers import LANGUAGE_MODEL, PROJECTOR, VISION, is_vision_encoder, split_towers, tower_of

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.recommend.facts import ModelFacts

#: Bumped only for incompatible changes to ``Recommendation.to_dict()``.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RecommendRequest:
    """What the user asked: the task, the data, the budget, and anything they fixed themselves."""

    task: str = "instruct"
    tokens: int | None = None
    """Training tokens the loss sees (completion tokens for instruction tuning)."""
    preset: str | None = None
    targets: TargetSpec | None = None
    """The user's own targets instead of a preset (checked, not replaced)."""
    rank: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    use_rslora: bool | None = None
    method: str | None = None
    """``lora`` or ``qlora``; ``None`` lets the budget decide (LoRA without a budget)."""
    budget_bytes: int | None = None
    gpu: str | None = None
    """GPU name the budget came from (for display)."""
    added_tokens: int = 0
    batch_size: int = 1
    seq_len: int = 2048
    skip_checks: tuple[str, ...] = ()
    stack: tuple[tuple[str, str], ...] = ()
    """Releases the run uses (``TrainingPlan.stack``); the memory figures model them."""
    expandable_segments: bool = False
    """``TrainingPlan.expandable_segments`` (``--expandable-segments``)."""
    lengths: str = "fixed"
    """``TrainingPlan.lengths`` (``--lengths``)."""
    objective: tuple[tuple[str, Any], ...] = ()
    """The training objective's plan fields as given (``--objective``, ``--generations``, ...; empty: sft):
    the memory figures are for its step (``batch_size`` then counts pairs or GRPO's prompts)."""


@dataclass(frozen=True)
class PresetOption:
    """One preset priced on this model at the recommended rank."""

    preset: str
    description: str
    target_modules: str | tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    adapted_modules: int = 0
    adapted_parameters: int = 0
    lora_params: int = 0
    state_bytes: int = 0
    peak_bytes: int | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    """Why the preset does not apply to this model, if it does not."""


@dataclass(frozen=True)
class RankOption:
    """The recommended rank or a neighbour: what it adds in parameters and memory."""

    rank: int
    alpha: int
    use_rslora: bool
    lora_params: int
    state_bytes: int
    peak_bytes: int | None
    chosen: bool = False


@dataclass(frozen=True)
class Recommendation:
    """Everything ``peftaudit recommend`` says about one model."""

    model_id: str
    architecture: str
    model_type: str | None
    total_params: int
    request: RecommendRequest
    recipe: LoraRecipe
    preset: str
    lora_params: int
    trainable: int
    """LoRA parameters plus full copies from modules_to_save."""
    by_role: dict[str, int]
    modules: tuple[str, ...]
    """Adapted modules and parameters, layer indices collapsed."""
    presets: tuple[PresetOption, ...]
    ranks: tuple[RankOption, ...]
    reasons: tuple[Reason, ...]
    findings: tuple[Finding, ...]
    peak_bytes: int | None = None
    """Estimated peak GPU memory of one step with this recipe (``None``: not estimable)."""
    budget: BudgetFit | None = None
    notes: tuple[str, ...] = field(default=())
    schema_version: int = SCHEMA_VERSION
    plan: TrainingPlan | None = None
    """The training plan the memory figures are for (the recipe at the micro-batch, checkpointing as the
    budget chose); ``None`` where the estimator cannot estimate the model. The renderers' plan line;
    ``to_dict`` carries the request instead."""

    def _request_dict(self) -> dict[str, Any]:
        """The request as JSON data; ``objective`` (its plan fields) only where one was given."""
        data = {**asdict(self.request), "stack": dict(self.request.stack), "objective": dict(self.request.objective)}
        if not self.request.objective:
            del data["objective"]
        return data

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data with stable keys: exactly what ``--format json`` prints."""
        recipe = self.recipe
        return _jsonable(
            {
                "schema_version": self.schema_version,
                "model": {
                    "id": self.model_id,
                    "architecture": self.architecture,
                    "model_type": self.model_type,
                    "total_params": self.total_params,
                },
                "request": self._request_dict(),
                "recommendation": {
                    "preset": self.preset,
                    "method": recipe.method,
                    "task_type": recipe.task_type,
                    "lora_config": recipe.lora_config_kwargs(),
                    "scale": self.recipe.hyper.scale,
                    "lora_params": self.lora_params,
                    "trainable_params": self.trainable,
                    "trainable_fraction": self.trainable / self.total_params if self.total_params else 0.0,
                    "by_role": dict(self.by_role),
                    "modules": list(self.modules),
                    "state_bytes": state_bytes(self.trainable),
                    "peak_bytes": self.peak_bytes,
                },
                "reasons": [asdict(r) for r in self.reasons],
                "presets": [asdict(p) for p in self.presets],
                "ranks": [asdict(r) for r in self.ranks],
                "budget": asdict(self.budget) if self.budget else None,
                "findings": [f.to_dict() for f in self.findings],
                "notes": list(self.notes),
            }
        )


def default_preset(inventory: Inventory) -> str:
    """``all-linear+experts`` where fused experts exist, ``attention`` on an image encoder with attention
    (ViT, DINOv2, CLIP), else ``all-linear``."""
    if fused_expert_parameters(inventory):
        return "all-linear+experts"
    if is_vision_encoder(inventory) and any(m.role in _ATTENTION_ROLES for m in inventory.modules if m.is_linear):
        return "attention"
    return "all-linear"


def recommend(
    inventory: Inventory, facts: ModelFacts, request: RecommendRequest | None = None, *, alternatives: bool = True
) -> Recommendation:
    """Recommend a LoRA configuration for this model, task, data and budget, with its reasons.

    ``alternatives=False`` leaves out the other presets and ranks (``presets`` and ``ranks`` are empty):
    the recommendation itself is the same, without the eight estimates they take (the report's one line).
    """
    request = request or RecommendRequest()
    if request.task not in TASKS:
        raise TargetError(f"unknown task '{request.task}'; choose one of: {', '.join(TASKS)}")
    reasons: list[Reason] = []
    notes: list[str] = []

    selection = _selection(inventory, request, reasons)
    notes.extend(selection.notes)
    scope = language_model_scope(inventory)
    unnamed = [
        m.path
        for m in inventory.modules
        if m.path and m.is_linear and m.role is None and (not scope or tower_of(m.path)[0] == LANGUAGE_MODEL)
    ]
    if unnamed:
        notes.append(
            f"{len(unnamed)} linear modules have no architecture role ({', '.join(compact_paths(unnamed, limit=3))}): "
            "the qv, attention and mlp presets skip them, all-linear covers them; a plugin can name them "
            "(peftaudit_register_architecture_rules)"
        )
    choice = choose(
        inventory,
        selection,
        task=request.task,
        tokens=request.tokens,
        rank=request.rank,
        alpha=request.alpha,
        dropout=request.dropout,
        use_rslora=request.use_rslora,
    )
    reasons.extend(choice.reasons)
    recipe = LoraRecipe(
        model_id=facts.model_id,
        task=request.task,
        task_type=task_type_for(inventory.architecture, dict(facts.config), request.task),
        targets=selection.spec,
        hyper=choice.hyper,
        quantization="nf4" if request.method == "qlora" else None,
        trust_remote_code=facts.remote_code,
    )
    if request.task == "classification" and not selection.spec.modules_to_save:
        notes.append(
            f"{inventory.architecture} has no classification head: load it with AutoModelForSequenceClassification; "
            "with task_type SEQ_CLS peft trains the new head ('score' or 'classifier') in full"
        )

    shape = MicroBatch(
        batch_size=request.batch_size,
        seq_len=request.seq_len,
        stack=request.stack,
        expandable_segments=request.expandable_segments,
        lengths=request.lengths,
        objective=request.objective,
    )
    budget: BudgetFit | None = None
    if request.budget_bytes is not None:
        recipe, budget, budget_reasons = fit_budget(
            inventory,
            selection,
            recipe,
            request.budget_bytes,
            shape,
            gpu=request.gpu,
            methods=(request.method,) if request.method else ("lora", "qlora"),
        )
        reasons.extend(budget_reasons)
        if budget is not None:
            shape = replace(shape, gradient_checkpointing=budget.gradient_checkpointing)
    count = (
        choice.count
        if recipe.hyper == choice.hyper
        else count_adapters(
            inventory,
            recipe.targets,
            recipe.hyper.rank,
            rank_pattern=recipe.hyper.rank_patterns(),
            dropout=recipe.hyper.dropout,
        )
    )
    peak = budget.peak_bytes if budget is not None else recipe_peak_bytes(inventory, recipe, shape)
    if peak is None:
        notes.append("the memory estimator cannot estimate this model: memory figures are adapter state only")

    findings = run_checks(
        CheckContext(
            inventory=inventory,
            facts=facts,
            targets=recipe.targets,
            task=request.task,
            added_tokens=request.added_tokens,
            dropout=recipe.hyper.dropout,
            seq_len=request.seq_len,
            rank=recipe.hyper.rank,
        ),
        skip=request.skip_checks,
    )
    return Recommendation(
        model_id=facts.model_id,
        architecture=inventory.architecture,
        model_type=inventory.model_type,
        total_params=inventory.total,
        request=request,
        recipe=recipe,
        preset=selection.preset,
        lora_params=count.lora_params,
        trainable=count.trainable,
        by_role=count.by_role(inventory),
        modules=tuple(compact_paths((*count.module_paths, *count.parameter_paths), limit=40)),
        presets=_presets(inventory, recipe, request, shape) if alternatives else (),
        ranks=_ranks(inventory, selection, recipe, shape) if alternatives else (),
        reasons=tuple(reasons),
        findings=findings,
        peak_bytes=peak,
        budget=budget,
        notes=tuple(notes),
        plan=training_plan(recipe, shape) if peak is not None else None,
    )


def _selection(inventory: Inventory, request: RecommendRequest, reasons: list[Reason]) -> TargetSelection:
    if request.targets is not None:
        count = count_adapters(inventory, request.targets, 1)
        reasons.append(Reason("targets.given", "targets as given (checked below, not replaced)"))
        return TargetSelection("custom", request.targets, count.module_paths, count.parameter_paths)
    preset = request.preset or default_preset(inventory)
    selection = resolve_preset(inventory, preset, task=request.task)
    reasons.extend(_modality_reasons(inventory, preset, request.preset is None))
    if request.preset:
        reasons.append(Reason("targets.given", f"preset {preset} as given: {PRESET_HELP[preset]}"))
    elif preset == "attention":
        reasons.append(
            Reason(
                "targets.vision-attention",
                "the attention projections (q, k, v, o) of every encoder block: peft's ViT recipe adapts query "
                "and value; the mlp preset adds fc1/fc2 (all-linear covers both) where the attention alone "
                "underfits",
                ("peft-vit", "lora"),
            )
        )
    elif selection.parameters:
        reasons.append(
            Reason(
                "targets.all-linear-experts",
                "every linear layer plus the fused experts: the experts hold most of the parameters, LoRA on "
                "the MLP/MoE layers matters most, and a budget spread over more matrices beats a higher rank",
                ("lwr", "lora", "qlora"),
            )
        )
    else:
        reasons.append(
            Reason(
                "targets.all-linear",
                "every linear layer (peft's all-linear): LoRA on all linear layers is what matches full "
                "fine-tuning, and a budget spread over more matrices beats a higher rank on fewer",
                ("qlora", "lora", "lwr"),
            )
        )
    return selection


_ATTENTION_ROLES = frozenset(
    {"attention.q", "attention.k", "attention.v", "attention.o", "attention.qkv", "attention.other"}
)


def _modality_reasons(inventory: Inventory, preset: str, chosen_here: bool) -> list[Reason]:
    """What common recipes do with a vision-language model's towers, or with an image encoder's layers."""
    towers = {t.name: t for t in split_towers(inventory)}
    if towers:
        vision, projector = towers[VISION], towers[PROJECTOR]
        save = projector.modules[-1].rpartition(".")[2] if projector.modules else ""
        projector_text = (
            f"the projector ({', '.join(projector.modules)}, {count(projector.params)} parameters) is trained in "
            f"LLaVA-1.5's recipes and frozen by LLaMA-Factory's default; to train it beside the adapter, add "
            f"modules_to_save: [{save}] (+{count(projector.params)} trainable)"
            if projector.modules
            else "the model has no separate projector"
        )
        return [
            Reason(
                "targets.language-model",
                f"the adapter goes on the language model only; the vision tower ({', '.join(vision.modules)}, "
                f"{count(vision.params)} parameters) stays frozen, as LLaVA-1.5 and LLaMA-Factory keep it; "
                + projector_text,
                ("llava", "llamafactory-mm"),
            )
        ]
    if not is_vision_encoder(inventory):
        return []
    reasons: list[Reason] = []
    convs = [m for m in inventory.modules if m.type == "Conv2d"]
    conv_params = sum(m.own_params for m in convs)
    if convs:
        names = ", ".join(compact_paths([m.path for m in convs], limit=4))
        reasons.append(
            Reason(
                "targets.conv2d",
                f"{len(convs)} Conv2d layers ({names}; {count(conv_params)} parameters) are not linear, so "
                "no preset and not all-linear adapts them; peft's LoRA wraps an nn.Conv2d named in "
                "target_modules (LoRA on its kernel); a depthwise convolution (groups = channels, ConvNeXt's dwconv) "
                "only at a rank its groups divide, which peft checks",
                ("peft-vit",),
            )
        )
    if any(m.role == "classifier" for m in inventory.modules):
        reasons.append(
            Reason(
                "targets.classifier",
                "a new label set trains the classification head in full: --task classification puts it in "
                "modules_to_save, as peft's image classification recipe does",
                ("peft-vit",),
            )
        )
    return reasons


def _presets(
    inventory: Inventory, recipe: LoraRecipe, request: RecommendRequest, shape: MicroBatch
) -> tuple[PresetOption, ...]:
    rows: list[PresetOption] = []
    for preset in PRESETS:
        try:
            sel = resolve_preset(inventory, preset, task=request.task)
            hyper = hyperparameters_at(
                inventory, sel, recipe.hyper.rank, alpha=recipe.hyper.alpha, use_rslora=recipe.hyper.use_rslora
            )
            dropout = 0.0 if sel.parameters else recipe.hyper.dropout
            hyper = replace(hyper, dropout=dropout)
            count = count_adapters(inventory, sel.spec, hyper.rank, rank_pattern=hyper.rank_patterns(), dropout=dropout)
        except TargetError as exc:
            rows.append(PresetOption(preset, PRESET_HELP[preset], error=str(exc)))
            continue
        variant = replace(recipe, targets=sel.spec, hyper=hyper)
        rows.append(
            PresetOption(
                preset=preset,
                description=PRESET_HELP[preset],
                target_modules=sel.spec.target_modules,
                target_parameters=sel.spec.parameters,
                adapted_modules=len(count.module_paths),
                adapted_parameters=len(count.parameter_paths),
                lora_params=count.lora_params,
                state_bytes=state_bytes(count.trainable),
                peak_bytes=recipe_peak_bytes(inventory, variant, shape),
                notes=sel.notes,
            )
        )
    return tuple(rows)


def _ranks(
    inventory: Inventory, selection: TargetSelection, recipe: LoraRecipe, shape: MicroBatch
) -> tuple[RankOption, ...]:
    down, up = neighbours(recipe.hyper.rank)
    rows: list[RankOption] = []
    for rank in (down, recipe.hyper.rank, up):
        if rank is None:
            continue
        chosen = rank == recipe.hyper.rank
        hyper = recipe.hyper if chosen else hyperparameters_at(inventory, selection, rank, dropout=recipe.hyper.dropout)
        count = count_adapters(
            inventory, recipe.targets, rank, rank_pattern=hyper.rank_patterns(), dropout=recipe.hyper.dropout
        )
        rows.append(
            RankOption(
                rank=rank,
                alpha=hyper.alpha,
                use_rslora=hyper.use_rslora,
                lora_params=count.lora_params,
                state_bytes=state_bytes(count.trainable),
                peak_bytes=recipe_peak_bytes(inventory, recipe.with_hyper(hyper), shape),
                chosen=chosen,
            )
        )
    return tuple(rows)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
