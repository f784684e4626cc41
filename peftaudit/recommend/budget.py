"""Memory: what a recipe costs on one GPU, and budget-driven choices.

Kept apart from the rules in :mod:`peftaudit.recommend.rank` on purpose: the
rank and targets follow from the task and the data, and only then does the
budget decide *how* to run them (LoRA or QLoRA, gradient checkpointing), with
lowering the rank as the last resort. Hu et al. found that spreading a fixed
parameter budget over more matrices beats a higher rank, so a tight budget
never drops targets; and the adapter is a small part of the peak anyway.

All figures come from the memory estimator (:func:`peftaudit.memory.estimate`);
when it cannot estimate a model (it raises a
:class:`~peftaudit.errors.PeftauditError` saying why), budget choices are
skipped with a note and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from peftaudit.recommend.rank import Reason, hyperparameters_at

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.memory import TrainingPlan
    from peftaudit.recommend.recipe import LoraRecipe
    from peftaudit.recommend.targets import TargetSelection

#: fp32 adapter weight, fp32 gradient and AdamW's two fp32 moments per trainable parameter
#: (peft keeps adapters in fp32 by default: ``autocast_adapter_dtype=True``).
STATE_BYTES_PER_PARAM = 16

#: The lowest rank a budget may push the recommendation to.
MIN_BUDGET_RANK = 4


@dataclass(frozen=True)
class MicroBatch:
    """The micro-batch the memory figures are for (per GPU), and whether it is checkpointed."""

    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    stack: tuple[tuple[str, str], ...] = ()
    """Releases the run uses (``TrainingPlan.stack``)."""
    expandable_segments: bool = False
    """``TrainingPlan.expandable_segments``: how the caching allocator is set up."""
    lengths: str = "fixed"
    """``TrainingPlan.lengths``: fixed or varied batch lengths."""
    objective: tuple[tuple[str, Any], ...] = ()
    """The training objective's plan fields as given (``objective``, ``generations``, ...); empty: sft.
    ``batch_size`` counts what the objective's batch counts (pairs, GRPO's prompts)."""


@dataclass(frozen=True)
class BudgetFit:
    """How a recipe was fitted into a memory budget, and what each try would have taken."""

    budget_bytes: int
    gpu: str | None
    fits: bool
    method: str
    gradient_checkpointing: bool
    rank: int
    peak_bytes: int
    tried: tuple[tuple[str, int], ...]
    """Each configuration tried, in order, with its estimated peak."""


def state_bytes(trainable: int) -> int:
    """Adapter weights, gradients and AdamW moments for ``trainable`` parameters, in fp32."""
    return trainable * STATE_BYTES_PER_PARAM


def training_plan(recipe: LoraRecipe, micro_batch: MicroBatch) -> TrainingPlan:
    """The memory estimator's plan for a recipe at one micro-batch."""
    from peftaudit.memory import TrainingPlan

    t = recipe.targets
    return TrainingPlan(
        method=recipe.method,
        rank=recipe.hyper.rank,
        alpha=float(recipe.hyper.alpha),
        dropout=recipe.hyper.dropout,
        targets=t.target_modules,
        target_parameters=t.parameters,
        exclude=t.exclude,
        modules_to_save=t.modules_to_save,
        rank_pattern=recipe.hyper.rank_pattern,
        batch_size=micro_batch.batch_size,
        seq_len=micro_batch.seq_len,
        gradient_checkpointing=micro_batch.gradient_checkpointing,
        stack=micro_batch.stack,
        expandable_segments=micro_batch.expandable_segments,
        lengths=micro_batch.lengths,
        **dict(micro_batch.objective),
    )


def recipe_peak_bytes(inventory: Inventory, recipe: LoraRecipe, micro_batch: MicroBatch) -> int | None:
    """Estimated peak GPU memory of one training step of ``recipe``, or ``None`` where the estimator cannot tell.

    Only the estimator's own refusals (:class:`~peftaudit.errors.PeftauditError`:
    a plan it cannot estimate, a config it cannot read) mean "cannot tell"; any
    other exception is a bug and surfaces.
    """
    from peftaudit.errors import PeftauditError
    from peftaudit.memory import estimate

    try:
        return int(estimate(inventory, training_plan(recipe, micro_batch)).total_bytes)
    except PeftauditError:
        return None


def fit_budget(
    inventory: Inventory,
    selection: TargetSelection,
    recipe: LoraRecipe,
    budget_bytes: int,
    micro_batch: MicroBatch,
    *,
    gpu: str | None = None,
    methods: tuple[str, ...] = ("lora", "qlora"),
) -> tuple[LoraRecipe, BudgetFit | None, tuple[Reason, ...]]:
    """The cheapest change that makes ``recipe`` fit ``budget_bytes``, tried in order of cost to quality.

    Each of ``methods`` (LoRA, then QLoRA with a 4-bit base) without and with
    gradient checkpointing (without only, where the model cannot checkpoint: ConvNeXt, said in a
    reason); then halving the rank down to :data:`MIN_BUDGET_RANK`. The
    first that fits wins. Returns the (possibly changed) recipe, the fit (``None``
    when the estimator cannot estimate this model) and the reasons.
    """
    from peftaudit.memory.checkpointing import checkpointing_refused

    refused = checkpointing_refused(inventory, training_plan(recipe, replace(micro_batch, gradient_checkpointing=True)))
    checkpoint = refused is None
    skipped = () if checkpoint else (Reason("budget.no-checkpointing", f"gradient checkpointing not tried: {refused}"),)
    tries: list[tuple[str, LoraRecipe, bool]] = []
    for method in methods:
        variant = replace(recipe, quantization="nf4" if method == "qlora" else None)
        name = "QLoRA (nf4)" if method == "qlora" else "LoRA"
        tries.append((name, variant, False))
        if checkpoint:
            tries.append((f"{name} + gradient checkpointing", variant, True))
    methods_only = len(tries)
    base = tries[-1][1]
    rank = recipe.hyper.rank // 2
    while rank >= MIN_BUDGET_RANK:
        hyper = hyperparameters_at(inventory, selection, rank, dropout=recipe.hyper.dropout)
        label = f"{'QLoRA' if base.quantization else 'LoRA'} rank {rank}" + (" + checkpointing" if checkpoint else "")
        tries.append((label, base.with_hyper(hyper), checkpoint))
        rank //= 2

    tried: list[tuple[str, int]] = []
    for label, candidate, checkpointing in tries:
        peak = recipe_peak_bytes(inventory, candidate, replace(micro_batch, gradient_checkpointing=checkpointing))
        if peak is None:
            return (
                recipe,
                None,
                (Reason("budget.unavailable", "the memory estimator cannot estimate this model: budget not applied"),),
            )
        tried.append((label, peak))
        if peak <= budget_bytes:
            candidate = replace(candidate, gradient_checkpointing=checkpointing)
            fit = BudgetFit(
                budget_bytes, gpu, True, candidate.method, checkpointing, candidate.hyper.rank, peak, tuple(tried)
            )
            first = len(tried) == 1  # then checkpointing was not needed: nothing to say about skipping it
            return candidate, fit, (_fit_reason(fit, first=first), *(() if first else skipped))
    # Nothing fits: keep the recommended rank (a lower one did not help) on the cheapest method.
    final = replace(tries[methods_only - 1][1], gradient_checkpointing=checkpoint)
    peak = tried[methods_only - 1][1]
    fit = BudgetFit(budget_bytes, gpu, False, final.method, checkpoint, final.hyper.rank, peak, tuple(tried))
    return final, fit, (_fit_reason(fit, first=False), *skipped)


def _fit_reason(fit: BudgetFit, *, first: bool) -> Reason:
    where = f"{fit.gpu} ({_gib(fit.budget_bytes)})" if fit.gpu else _gib(fit.budget_bytes)
    if not fit.fits:
        cheapest = min(fit.tried, key=lambda item: item[1])
        return Reason(
            "budget.no-fit",
            f"nothing tried fits {where}: even {cheapest[0]} peaks at {_gib(cheapest[1])}. Kept rank "
            f"{fit.rank} with {fit.method}{' and gradient checkpointing' if fit.gradient_checkpointing else ''}; "
            "use more GPUs (sharding), shorter sequences, or a smaller model",
        )
    if first:
        return Reason("budget.fits", f"{fit.tried[0][0]} as recommended peaks at {_gib(fit.peak_bytes)}: fits {where}")
    steps = "; ".join(f"{label}: {_gib(peak)}" for label, peak in fit.tried)
    return Reason(
        "budget.fitted",
        f"to fit {where}: {steps}. Targets are kept and the rank is lowered last, because spreading "
        "parameters over more matrices beats a higher rank",
        ("lora", "qlora"),
    )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
