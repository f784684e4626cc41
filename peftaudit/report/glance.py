"""The default report's answers at a glance: training memory on the common GPU classes, and the recommendation.

``peftaudit report MODEL`` without ``--method``/``--compare`` answers the three
questions the tool exists for on one screen: the parameters (the report itself),
training memory for full fine-tuning, LoRA and QLoRA at the estimator's default
plan, with and without gradient checkpointing, and what to train. This module
computes the last two once from a loaded model (:func:`glance_for`) as plain
data that the report carries (``Report.glance``), its cache stores and its
renderers show (:mod:`peftaudit.report.render.glance`); nothing here renders.

Nothing is decided twice: each row's peak is :func:`peftaudit.memory.estimate`'s
``total_bytes``, whether a GPU class holds it is :func:`peftaudit.gpus.sizing.fit`'s
answer, a row no class holds is sized by :func:`peftaudit.gpus.sizing.smallest_setup`,
and the recommendation is :func:`peftaudit.recommend.recommend`'s, at its default request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.gpus.catalog import GPU
    from peftaudit.inventory import Inventory
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.recommend.facts import ModelFacts
    from peftaudit.recommend.recommendation import Recommendation
    from peftaudit.report.serving_glance import ServingGlance

#: The methods of the memory table, each without and with gradient checkpointing.
METHODS: tuple[str, ...] = ("full", "lora", "qlora")

#: One catalog GPU stands for each memory class, smallest first: the common rented card of each
#: size (AWS's A10G, the L40S, the H100 SXM). ``peftaudit gpus MODEL`` sizes every other GPU.
GPU_CLASSES: tuple[tuple[int, str], ...] = ((24, "A10G"), (48, "L40S"), (80, "H100 SXM"))

#: The plan fields the rows vary; the rest is the estimator's default plan, shared by every row.
_ROW_FIELDS = ("method", "gradient_checkpointing")


@dataclass(frozen=True)
class GpuClass:
    """A memory class and the catalog GPU that stands for it."""

    class_gb: int
    """The class: 24, 48 or 80 (GB on the box)."""
    gpu: str
    """The catalog name of the GPU that stands for it (``A10G``)."""
    usable_bytes: int
    """That GPU's usable memory, what :func:`~peftaudit.gpus.sizing.fit` compares the peak with."""


@dataclass(frozen=True)
class ScaleOut:
    """Where no class holds a plan on one GPU: the fewest GPUs of the largest class that do
    (:func:`~peftaudit.gpus.sizing.smallest_setup`), or the last setup it tried when none does."""

    gpu: str
    gpus: int
    sharding: str
    offload: str
    gradient_checkpointing: bool
    """Switched on by the search as a last resort when the row's plan had it off."""
    peak_bytes: int
    fits: bool
    setup: str
    """``2x zero3 + offload both + grad. ckpt``: :meth:`~peftaudit.gpus.sizing.Fit.setup`."""


@dataclass(frozen=True)
class MemoryRow:
    """One method at one checkpointing setting: its peak per GPU and the classes it fits."""

    method: str
    gradient_checkpointing: bool
    total_bytes: int | None
    """The estimate's peak per GPU (CUDA context included); ``None`` when it cannot be estimated."""
    fits_class_gb: int | None = None
    """The smallest class that holds the peak; ``None`` when none does."""
    fits_gpu: str | None = None
    too_small_class_gb: int | None = None
    """The largest class that does not hold it; ``None`` when the smallest does."""
    too_small_gpu: str | None = None
    scale_out: ScaleOut | None = None
    """Set when no class holds it on one GPU."""
    activations_source: str | None = None
    """``program``, ``derived`` or ``stand-in`` (an approximation): the estimate's ``activations_source``."""
    warnings: tuple[str, ...] = ()
    """The estimate's warning codes (``experts-not-quantized``); ``report --method`` shows their messages."""
    unavailable: str | None = None
    """Why this row has no estimate (the estimator's one-line reason)."""


@dataclass(frozen=True)
class MemoryGlance:
    """Training memory at the default plan for every method of :data:`METHODS`, on :data:`GPU_CLASSES`."""

    plan: dict[str, Any]
    """The plan every row shares (``TrainingPlan.to_dict()`` without ``method`` and
    ``gradient_checkpointing``, which each row gives)."""
    gpu_classes: tuple[GpuClass, ...]
    rows: tuple[MemoryRow, ...]
    unavailable: str | None = None
    """Why there is no row at all (a model the estimator cannot size); ``rows`` is then empty."""

    def row_plan(self, row: MemoryRow) -> dict[str, Any]:
        """The whole plan of one row, as ``TrainingPlan.to_dict()`` writes it."""
        return {**self.plan, "method": row.method, "gradient_checkpointing": row.gradient_checkpointing}

    def to_dict(self) -> dict[str, Any]:
        return {
            "unavailable": self.unavailable,
            "plan": dict(self.plan),
            "gpu_classes": [_plain(c) for c in self.gpu_classes],
            "rows": [{**_plain(r), "scale_out": _plain(r.scale_out) if r.scale_out else None} for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryGlance:
        rows = []
        for row in data["rows"]:
            scale_out = row.get("scale_out")
            rows.append(
                MemoryRow(
                    **{k: v for k, v in row.items() if k not in ("scale_out", "warnings")},
                    scale_out=ScaleOut(**scale_out) if scale_out else None,
                    warnings=tuple(row.get("warnings", ())),
                )
            )
        return cls(
            plan=dict(data["plan"]),
            gpu_classes=tuple(GpuClass(**c) for c in data["gpu_classes"]),
            rows=tuple(rows),
            unavailable=data.get("unavailable"),
        )


@dataclass(frozen=True)
class RecommendationSummary:
    """The recommendation in one line: :func:`~peftaudit.recommend.recommend` at its default request."""

    command: str
    """The command for the full recommendation: ``peftaudit recommend MODEL``."""
    method: str | None = None
    """``lora`` or ``qlora``; ``None`` (as every field below) when ``unavailable``."""
    preset: str | None = None
    """The target preset (``all-linear``), or ``custom``."""
    target_modules: str | tuple[str, ...] | None = None
    """peft's ``target_modules``: the names, or one regular expression."""
    target_parameters: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    rank: int | None = None
    alpha: int | None = None
    use_rslora: bool | None = None
    reason: str | None = None
    """The main reason: the recommendation's first reason (why these targets)."""
    reason_rule: str | None = None
    """Its stable rule id (``targets.all-linear``)."""
    unavailable: str | None = None
    """Why there is no recommendation (the recommender's one-line error)."""

    def to_dict(self) -> dict[str, Any]:
        data = _plain(self)
        for key in ("target_parameters", "modules_to_save"):
            data[key] = list(data[key])
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecommendationSummary:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("target_parameters", "modules_to_save"):
            values[key] = tuple(values.get(key, ()))
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass(frozen=True)
class Glance:
    """What the default report adds to the counts: the memory table, the recommendation, and serving."""

    memory: MemoryGlance
    recommendation: RecommendationSummary
    serving: ServingGlance | None = None
    """Serving on the GPU classes (:mod:`peftaudit.report.serving_glance`); ``None`` read back from a report
    written before it existed."""


def glance_for(inventory: Inventory, facts: ModelFacts, *, model_id: str) -> Glance:
    """The memory table, the recommendation and serving for a loaded model (``model_id`` as the user names it)."""
    from peftaudit.report.serving_glance import serving_glance

    return Glance(
        memory=memory_glance(inventory),
        recommendation=recommendation_summary(inventory, facts, model_id),
        serving=serving_glance(inventory, model_id=model_id),
    )


def default_plans() -> list[TrainingPlan]:
    """The rows' plans: the estimator's default plan for each of :data:`METHODS`, without and with checkpointing."""
    from peftaudit.memory.plan import TrainingPlan

    return [TrainingPlan(method=m, gradient_checkpointing=gc) for m in METHODS for gc in (False, True)]


def gpu_classes() -> list[tuple[int, GPU]]:
    """The GPU of each class from the GPU catalog (the user's GPU file may override its figures)."""
    from peftaudit.gpus.catalog import find_gpu

    return [(gb, find_gpu(name)) for gb, name in GPU_CLASSES]


def memory_glance(inventory: Inventory) -> MemoryGlance:
    """Estimate every row of :func:`default_plans` and place it on :func:`gpu_classes`.

    A model the estimator cannot size (no layer program, no trace, no stand-in)
    gets no rows and the estimator's reason, as ``report --method`` warns
    ``estimate-unavailable``; a method it cannot apply (QLoRA on a model without
    linear layers) gets a row with its reason.
    """
    plans = default_plans()
    classes = gpu_classes()
    rows = tuple(_row(inventory, plan, classes) for plan in plans)
    shared = {k: v for k, v in plans[0].to_dict().items() if k not in _ROW_FIELDS}
    described = tuple(GpuClass(gb, gpu.name, gpu.usable_bytes) for gb, gpu in classes)
    if all(r.unavailable for r in rows):
        return MemoryGlance(plan=shared, gpu_classes=described, rows=(), unavailable=rows[0].unavailable)
    return MemoryGlance(plan=shared, gpu_classes=described, rows=rows)


def _row(inventory: Inventory, plan: TrainingPlan, classes: Sequence[tuple[int, GPU]]) -> MemoryRow:
    from peftaudit.gpus.sizing import fit, smallest_setup
    from peftaudit.memory import PlanError, estimate

    try:
        result = estimate(inventory, plan)
    except PlanError as exc:
        return MemoryRow(plan.method, plan.gradient_checkpointing, None, unavailable=str(exc))
    total = int(result.total_bytes)

    def known(_inventory: Inventory, _plan: TrainingPlan) -> int:
        return total  # the estimate just made: fit() compares it with each GPU, no second estimate

    fitting = [fit(inventory, plan, gpu, peak=known).fits for _, gpu in classes]
    first = next((i for i, fits in enumerate(fitting) if fits), None)
    below = [i for i, fits in enumerate(fitting[:first]) if not fits]
    too_small = classes[below[-1]] if below else None
    scale_out = None
    if first is None:
        largest = classes[-1][1]
        found = smallest_setup(inventory, plan, largest)
        scale_out = ScaleOut(
            gpu=largest.name,
            gpus=found.gpus,
            sharding=found.sharding,
            offload=found.offload,
            gradient_checkpointing=found.gradient_checkpointing,
            peak_bytes=found.peak_bytes,
            fits=found.fits,
            setup=found.setup(),
        )
    return MemoryRow(
        method=plan.method,
        gradient_checkpointing=plan.gradient_checkpointing,
        total_bytes=total,
        fits_class_gb=classes[first][0] if first is not None else None,
        fits_gpu=classes[first][1].name if first is not None else None,
        too_small_class_gb=too_small[0] if too_small else None,
        too_small_gpu=too_small[1].name if too_small else None,
        scale_out=scale_out,
        activations_source=result.activations_source,
        warnings=tuple(dict.fromkeys(w.code for w in result.warnings)),
    )


def recommendation_summary(inventory: Inventory, facts: ModelFacts, model_id: str) -> RecommendationSummary:
    """What ``peftaudit recommend MODEL`` recommends, in one line, with the command that explains it."""
    import shlex

    from peftaudit.errors import PeftauditError
    from peftaudit.recommend.recommendation import recommend

    command = f"peftaudit recommend {shlex.quote(model_id)}"
    try:
        rec = recommend(inventory, facts, alternatives=False)  # the one line needs no other presets or ranks
    except PeftauditError as exc:
        return RecommendationSummary(command=command, unavailable=str(exc))
    return summarize(rec, command)


def summarize(rec: Recommendation, command: str) -> RecommendationSummary:
    """The one-line summary of a finished recommendation."""
    recipe = rec.recipe
    main = rec.reasons[0] if rec.reasons else None
    return RecommendationSummary(
        command=command,
        method=recipe.method,
        preset=rec.preset,
        target_modules=recipe.targets.target_modules,
        target_parameters=recipe.targets.parameters,
        modules_to_save=recipe.targets.modules_to_save,
        rank=recipe.hyper.rank,
        alpha=recipe.hyper.alpha,
        use_rslora=recipe.hyper.use_rslora,
        reason=main.text if main else None,
        reason_rule=main.rule if main else None,
    )


def is_current(glance: Glance) -> bool:
    """Whether a cached glance still holds: each class's GPU has the usable memory it was placed with.

    The cache key covers the model and the library versions; a GPU file edited
    since (the user's own usable memory for an A10G) changes which class fits.
    """
    from peftaudit.errors import PeftauditError

    try:
        current = {gpu.name: gpu.usable_bytes for _, gpu in gpu_classes()}
    except PeftauditError:  # an unreadable GPU file: recompute, and let the recomputation report it
        return False
    if glance.serving is None:  # cached before the report served: compute it now
        return False
    return all(current.get(c.gpu) == c.usable_bytes for c in glance.memory.gpu_classes)


def _plain(obj: Any) -> dict[str, Any]:
    """A flat dataclass's fields as a dict (nested dataclasses are handled by the callers)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


__all__ = [
    "GPU_CLASSES",
    "METHODS",
    "Glance",
    "GpuClass",
    "MemoryGlance",
    "MemoryRow",
    "RecommendationSummary",
    "ScaleOut",
    "default_plans",
    "glance_for",
    "gpu_classes",
    "is_current",
    "memory_glance",
    "recommendation_summary",
    "summarize",
]
