"""Calibration: the estimate against every published GPU memory figure, compared like with like.

    python benchmarks/calibration.py                  # writes benchmarks/results/calibration.md
    python benchmarks/calibration.py --no-stack       # every row at the installed stack
    python benchmarks/calibration.py --only fms-      # rows whose id starts with fms- (printed only)

The figures and their sources are in ``tests/memory/data/measurements.json`` (``peaks``,
``static`` and ``published``; each row names its GPU, software stack, what was measured and
the settings). Each row is estimated with ``peftaudit.memory.estimate`` on the catalog model or
the config the row names, with the row's settings and, where the plan takes one, the row's
stack. The figure it is compared with depends on what the source measured:

- ``max_memory_allocated``: the estimate's allocated peak (total less CUDA context and allocator margin);
- ``max_memory_reserved`` and ``memory_reserved_after_step_p99``: the estimate's reserved memory with
  room to spare (``reserved_bytes``; reserved memory does not hold the CUDA context);
- ``nvidia-smi``: that reserved memory plus the CUDA context;
- ``fits_in_capacity`` (the card's capacity) and ``unknown``: the whole total (what sizing decides with);
- ``memory_allocated_after_step``: the optimizer step's allocated peak less its scratch (what
  ``memory_allocated()`` reads right after ``optimizer.step()``).

The summary (median and worst error) covers the rows with a known stack and known settings; the
others are listed apart, not dropped. Rows that miss by more than 15 % say what the estimate
likely lacks.

``fits_in_capacity`` rows (Unsloth's "largest context that fits" tables) are also compared the
other way round: the longest sequence the estimate fits on the card, searched to the token with
:func:`peftaudit.gpus.sizing.max_seq_len` (the search and the fit decision ``peftaudit fit``
uses), against the published length. The card's capacity is the usable memory of the catalog
GPU the row names in ``usable_gpu`` (what ``--gpu`` would use), else the row's own reading.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "memory" / "data" / "measurements.json"
OUT = ROOT / "benchmarks" / "results" / "calibration.md"

UNITS: dict[str, float] = {"B": 1, "MiB": 2**20, "GiB": 2**30, "GB": 1e9}
KINDS: tuple[str, ...] = (
    "max_memory_allocated",
    "max_memory_reserved",
    "memory_reserved_after_step_p99",
    "nvidia-smi",
    "fits_in_capacity",
    "memory_allocated_after_step",
    "unknown",
)
MISS = 0.15
#: Issue 14's criterion for a "largest context that fits" boundary (reported, not asserted).
BOUNDARY_MISS = 0.10
#: Row-id prefixes and the sources they stand for (the summary's per-source lines).
SOURCES: dict[str, str] = {
    "llamafactory": "LLaMA-Factory wiki",
    "peft": "PEFT MetaMathQA results",
    "fms": "fms-acceleration benchmarks",
    "unsloth": "Unsloth benchmarks (HF + FA2 baseline)",
    "hf": "transformers docs",
    "swift": "ms-swift Benchmark",
    "litgpt": "LitGPT resource tables",
}


@dataclass(frozen=True)
class Row:
    """One published figure with everything needed to estimate it."""

    id: str
    source: str
    url: str
    model: str
    gpu: str
    stack: dict[str, str]
    stack_known: bool
    kind: str
    measured: float
    unit: str
    plan: dict[str, Any]
    settings_known: bool
    settings_note: str
    reading: str = ""
    """The data's own reading of a known miss (``likely_gap``), shown before the generic reasons."""
    usable_gpu: str = ""
    """``fits_in_capacity`` rows: the catalog GPU whose usable memory is the card's capacity."""
    plan_when_supported: tuple[tuple[str, Any], ...] = ()
    """Plan fields of the row's run (e.g. ``lengths: varied``) passed only where the plan has them."""

    @property
    def measured_bytes(self) -> float:
        return self.measured * UNITS[self.unit]

    @property
    def known(self) -> bool:
        """Whether the row counts in the summary: stack, settings and the measured counter all known."""
        return self.stack_known and self.settings_known and self.kind != "unknown"


@dataclass(frozen=True)
class Result:
    """A row, the comparable figure of its estimate, and the estimate itself."""

    row: Row
    estimate_bytes: float
    stack_applied: bool
    total_bytes: int
    allocated_bytes: int
    reference_bytes: float
    """What the estimate is compared with: the measured figure, or the card's capacity."""

    @property
    def error(self) -> float:
        return self.estimate_bytes / self.reference_bytes - 1


@dataclass(frozen=True)
class Boundary:
    """A ``fits_in_capacity`` row: the estimate's longest fitting sequence against the published one."""

    row: Row
    capacity_bytes: int
    capacity_basis: str
    length: int
    """The longest sequence (tokens) whose estimate fits the card; 0 when not even one token does."""

    @property
    def published(self) -> int:
        return int(self.row.plan["seq_len"])

    @property
    def error(self) -> float:
        return self.length / self.published - 1


def load_rows(path: Path = DATA) -> list[Row]:
    """Every GPU measurement of the data file (peaks, static and published; not the simulated traces)."""
    data = json.loads(path.read_text())
    rows = []
    for group in ("peaks", "static", "published"):
        for entry in data[group]:
            kind = entry["measured_kind"]
            if kind not in KINDS:
                raise ValueError(f"{entry['id']}: unknown measured_kind {kind!r}")
            rows.append(
                Row(
                    id=entry["id"],
                    source=entry["source"],
                    url=entry.get("url", ""),
                    model=entry["model"],
                    gpu=entry["gpu"],
                    stack=dict(entry["stack"]),
                    stack_known=bool(entry["stack_known"]),
                    kind=kind,
                    measured=float(entry["measured"]),
                    unit=entry["unit"],
                    plan=dict(entry["plan"]),
                    settings_known=bool(entry["settings_known"]),
                    settings_note=entry.get("settings_note", ""),
                    reading=entry.get("likely_gap", ""),
                    usable_gpu=entry.get("usable_gpu", ""),
                    plan_when_supported=tuple(entry.get("plan_when_supported", {}).items()),
                )
            )
    return rows


@cache
def _models() -> dict[str, Any]:
    return dict(json.loads(DATA.read_text())["models"])


def skeleton(model: str) -> Any:
    """A fresh meta-device model of a catalog id (``org/name``) or of a config named in the data file's ``models``.

    Not cached: a trace applies the plan's method to the model it is given (and watches its storages).
    """
    from peftaudit.sources.base import SourceOptions, resolve
    from peftaudit.sources.build import build_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model in _models():
            return build_from_config(_models()[model]["config"], model_id=model)
        resolved, source = resolve(model)
        return source.build(resolved, SourceOptions())


@cache
def inventory(model: str) -> Any:
    """The inventory of :func:`skeleton`'s model."""
    from peftaudit.inventory import take_inventory

    return take_inventory(skeleton(model))


def plan_stack(row: Row) -> dict[str, str]:
    """The row's versions a plan can model: concrete versions of the four packages, nothing unknown."""
    from peftaudit.memory.stack import PACKAGES

    stack = {}
    for package in PACKAGES:
        version = row.stack.get(package, "unknown")
        if version and version[0].isdigit():
            stack[package] = version
    return stack


def make_plan(row: Row, use_stack: bool) -> tuple[Any, bool]:
    """The row's :class:`TrainingPlan`, with its stack when the plan takes one (and whether it did)."""
    from peftaudit.memory import TrainingPlan

    fields_ = dict(row.plan)
    names = {f.name for f in fields(TrainingPlan)}
    fields_.update((name, value) for name, value in row.plan_when_supported if name in names)
    stack = plan_stack(row) if use_stack and row.stack_known else {}
    applied = bool(stack) and "stack" in names
    if applied:
        fields_["stack"] = stack
    return TrainingPlan.from_dict(fields_), applied


def comparable(e: Any, plan: Any, kind: str) -> float:
    """The estimate's figure that means what the source measured (see the module docstring)."""
    context = e.components.get("cuda_context", 0)
    reserved = e.reserved_bytes  # what max_memory_reserved shows with memory to spare (no context)
    if kind == "max_memory_allocated":
        return float(e.allocated_bytes)
    if kind in ("max_memory_reserved", "memory_reserved_after_step_p99"):
        return float(reserved)
    if kind == "nvidia-smi":
        return float(reserved + context)
    if kind == "memory_allocated_after_step":
        return float(e.phase_peaks["optimizer step"] - _step_scratch(e, plan))
    return float(e.total_bytes)


def _step_scratch(e: Any, plan: Any) -> int:
    # The foreach step's temporaries are freed by the time memory_allocated() is read after it.
    from peftaudit.memory.optimizers import TrainableTensor, optimizer_memory

    if plan.optimizer_impl == "fused":
        return 0
    dtype = plan.weight_dtype if plan.method == "full" else "fp32"
    return optimizer_memory(
        plan.optimizer, plan.optimizer_impl, [TrainableTensor((e.trainable_params,), dtype)]
    ).step_temporaries


def card(row: Row) -> Any:
    """The :class:`~peftaudit.gpus.catalog.GPU` a ``fits_in_capacity`` row's length fitted on.

    A row that names a catalog GPU (``usable_gpu``) gets the bundled entry, whose usable memory
    (with its source) is what ``peftaudit fit --gpu`` decides with; an unnamed card gets the
    row's own reading of its size (``measured`` in ``unit``), said so in ``usable_source``.
    """
    from dataclasses import replace

    from peftaudit.gpus.catalog import bundled_gpus

    if row.usable_gpu:
        named = [gpu for gpu in bundled_gpus() if gpu.name == row.usable_gpu]
        if not named:
            raise ValueError(f"{row.id}: usable_gpu {row.usable_gpu!r} is not a bundled GPU")
        return named[0]
    # Any bundled entry lends the fields sizing does not read; name and memory are the row's.
    return replace(
        bundled_gpus()[0],
        name=row.gpu,
        usable_bytes=round(row.measured_bytes),
        usable_source=f"the row's reading: {row.measured:g} {row.unit}",
        usable_estimated=True,
        aliases=(),
    )


def evaluate(row: Row, use_stack: bool = True) -> Result:
    """Estimate one row and take the figure that compares with it."""
    from peftaudit.errors import PeftauditError
    from peftaudit.memory import estimate

    plan, applied = make_plan(row, use_stack)
    inv = inventory(row.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            e = estimate(inv, plan)
        except PeftauditError:
            if not applied:
                raise
            # A stack the estimator refuses (a release outside every profile): the installed one.
            plan, applied = make_plan(row, use_stack=False)
            e = estimate(inv, plan)
    reference = card(row).usable_bytes if row.kind == "fits_in_capacity" else row.measured_bytes
    return Result(row, comparable(e, plan, row.kind), applied, e.total_bytes, e.allocated_bytes, reference)


def boundary(row: Row, use_stack: bool = True) -> Boundary:
    """The longest sequence, to the token, whose estimate fits the row's card (``fits_in_capacity`` rows).

    The search and the decision are :func:`peftaudit.gpus.sizing.max_seq_len`'s, the ones
    ``peftaudit fit`` reports, so whatever figure sizing decides with (today the estimate's
    total: allocated peak, allocator margin and CUDA context) is the one compared here.
    """
    from peftaudit.gpus.sizing import max_seq_len

    plan, _ = make_plan(row, use_stack)
    gpu = card(row)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        length = max_seq_len(inventory(row.model), plan, gpu, step=1)
    basis = f"catalog {gpu.name}: {gpu.usable_source}" if row.usable_gpu else gpu.usable_source
    return Boundary(row, gpu.usable_bytes, basis, max(length, 0))


#: Runs that published both an allocated and a reserved (or nvidia-smi) figure, whose reserved
#: figure the allocator replay of the whole traced model is compared with (``--replay``): the
#: row with the reserved figure and its allocated twin.
REPLAYED: tuple[tuple[str, str], ...] = (
    ("fms-mistral7b-full-bs4-nvidia-smi", "fms-mistral7b-full-bs4-allocated"),
    ("fms-mistral7b-lora16-bs4-nvidia-smi", "fms-mistral7b-lora16-bs4-allocated"),
    ("fms-mistral7b-qlora16-bs4-nvidia-smi", "fms-mistral7b-qlora16-bs4-allocated"),
    ("peft-metamathqa-full", "peft-metamathqa-full-allocated"),
    ("peft-metamathqa-lora32-qv", "peft-metamathqa-lora32-qv-allocated"),
)


@dataclass(frozen=True)
class Replayed:
    """A published reserved figure against the allocator replay of the whole model's traced steps."""

    row: Row
    allocated_row: Row
    traced: Any
    """The trace's :class:`~peftaudit.memory.result.MemoryEstimate` (``allocator_source`` ``replay``)."""

    @property
    def estimate_bytes(self) -> float:
        return comparable(self.traced, None, self.row.kind)

    @property
    def error(self) -> float:
        return self.estimate_bytes / self.row.measured_bytes - 1


def replayed(row: Row, allocated_row: Row) -> Replayed:
    """Trace ``row``'s plan on the whole model (fake tensors) and replay it through the allocator model.

    The trace runs the installed stack (``trace`` models no other); the rows' allocated twins
    show how far that is from the run's own allocated peak.
    """
    from peftaudit.memory import trace

    plan, _ = make_plan(row, use_stack=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(skeleton(row.model), plan)
    return Replayed(row, allocated_row, traced)


def render_replayed(replays: Sequence[Replayed]) -> list[str]:
    """The replay table: published reserved figures against the replay of the traced steps."""
    lines = [
        "The trace (`peftaudit report MODEL --trace`) runs two training steps of the whole model on fake "
        "tensors and replays every allocation and free through the model of PyTorch's caching allocator "
        "(`peftaudit/memory/allocator/`). For runs that published both an allocated and a reserved "
        "figure, the replay's peak reserved (plus the 1 GiB CUDA context for nvidia-smi readings) against "
        "the published one. The last column sets the run's own allocated figure (with its counter: the "
        "peak, or what was allocated right after the optimizer step) beside the traced allocated peak.",
        "",
        "| row | measured | published | replay | error | the run's allocated figure (its counter) / traced peak |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in replays:
        unit = _unit(r.row)
        twin_unit = _unit(r.allocated_row)
        lines.append(
            f"| [{r.row.id}]({r.row.url}) | {r.row.kind} | {r.row.measured_bytes / UNITS[unit]:.2f} {unit} "
            f"| {r.estimate_bytes / UNITS[unit]:.2f} {unit} | {100 * r.error:+.1f} % "
            f"| {r.allocated_row.measured_bytes / UNITS[twin_unit]:.2f} ({r.allocated_row.kind}) / "
            f"{r.traced.allocated_bytes / UNITS[twin_unit]:.2f} {twin_unit} |"
        )
    errors = [abs(r.error) for r in replays]
    if errors:
        within = sum(e <= 0.05 for e in errors)
        lines += [
            "",
            f"{within} of {len(errors)} within 5 %; median |error| {100 * statistics.median(errors):.1f} %, "
            f"worst {100 * max(errors):.1f} %.",
        ]
    return lines


def likely_gap(result: Result) -> str:
    """What the estimate likely lacks, for a row that misses by more than 15 %."""
    row, error = result.row, result.error
    if abs(error) <= MISS:
        return ""
    reasons = [row.reading] if row.reading else []
    if row.stack.get("transformers", "").startswith("n/a"):
        reasons.append("a different framework (its own model code, LoRA and loss), not transformers + peft")
    elif not row.stack_known:
        reasons.append("an unknown, older stack's behaviour")
    if (
        row.kind in ("max_memory_reserved", "memory_reserved_after_step_p99", "nvidia-smi")
        and error < 0
        and not row.reading
    ):
        reasons.append(
            "the caching allocator's reserved memory above allocated (above the estimate's allocator margin)"
        )
    if row.kind == "nvidia-smi" and row.plan.get("gpus", 1) > 1 and error < 0 and not row.reading:
        reasons.append("NCCL and FSDP communication buffers")
    if row.kind == "memory_reserved_after_step_p99" and error > 0:
        reasons.append("the 99th-percentile step was shorter than the 768-token bound the plan uses")
    if row.kind == "max_memory_reserved" and not row.settings_known and error < 0:
        reasons.append("evaluation and generation inside the measured maximum")
    if row.kind == "fits_in_capacity":
        reasons.append(
            "the baseline needed more memory than modelled at that length (unknown settings)"
            if error < 0
            else "the estimate would not fit where the run did (unknown settings)"
        )
    elif not row.settings_known and not reasons:
        reasons.append("unknown settings: " + row.settings_note)
    return "; ".join(reasons) or "not explained by the row's known settings"


def short_stack(row: Row) -> str:
    parts = []
    for package, label in (("transformers", "tf"), ("peft", "peft"), ("bitsandbytes", "bnb"), ("torch", "torch")):
        version = row.stack.get(package, "unknown")
        if version.startswith("n/a") and package == "transformers":
            return version.removeprefix("n/a (").removesuffix(")") + f", torch {row.stack.get('torch', '?')}"
        if version not in ("unknown", "n/a"):
            parts.append(f"{label} {version.split('+')[0]}")
    return " / ".join(parts) or "unknown"


def _gb(value: float, unit: str) -> str:
    return f"{value / UNITS[unit]:.2f} {unit if unit != 'B' else 'GB'}"


def _unit(row: Row) -> str:
    return "GB" if row.unit == "B" else ("GiB" if row.unit == "MiB" else row.unit)


def render(
    results: Sequence[Result],
    boundaries: Sequence[Boundary] = (),
    installed: Sequence[Result] = (),
    replays: Sequence[Replayed] = (),
) -> str:
    """The markdown report: summary, the rows that count, the rows listed apart, the fit boundaries."""
    known = [r for r in results if r.row.known]
    apart = [r for r in results if not r.row.known]
    lines = ["# Calibration against published GPU memory figures", ""]
    lines += [
        "Written by `benchmarks/calibration.py` from `tests/memory/data/measurements.json` (sources, stacks, "
        "GPUs, what each figure measured and the settings are in that file). Each row is the estimate "
        "of the row's plan compared like with like: allocated with allocated, reserved with what the "
        "caching allocator reserves with memory to spare (`reserved_bytes`), nvidia-smi with that plus "
        "the CUDA context, card capacities with the total sizing decides with (the least memory the "
        "step runs in, CUDA context included). Error = estimate / measured - 1.",
        "",
    ]
    lines += _summary(known, apart, boundaries)
    lines += ["", "## Rows with known stack and settings", ""]
    lines += _table(known)
    lines += ["", "## Rows listed apart (stack, settings or the measured counter unknown)", ""]
    lines += _table(apart, with_note=True)
    moved = [
        (r, i)
        for r, i in zip(results, installed, strict=False)
        if r.stack_applied and abs(r.estimate_bytes / i.estimate_bytes - 1) > 0.005
    ]
    if installed:
        lines += ["", "## What the named stack changes", ""]
        if not moved:
            lines.append("No row's estimate moves by more than 0.5 % between its named stack and the installed one.")
        else:
            lines += [
                "| row | stack | installed-stack estimate | named-stack estimate | change |",
                "| --- | --- | ---: | ---: | ---: |",
            ]
            for r, i in moved:
                unit = _unit(r.row)
                lines.append(
                    f"| {r.row.id} | {short_stack(r.row)} | {i.estimate_bytes / UNITS[unit]:.2f} {unit} | "
                    f"{r.estimate_bytes / UNITS[unit]:.2f} {unit} | "
                    f"{100 * (r.estimate_bytes / i.estimate_bytes - 1):+.1f} % |"
                )
    if boundaries:
        lines += ["", "## Largest context that fits", ""]
        lines += render_boundaries(boundaries)
    if replays:
        lines += ["", "## Reserved memory from the allocator replay", ""]
        lines += render_replayed(replays)
    return "\n".join(lines) + "\n"


def render_boundaries(boundaries: Sequence[Boundary]) -> list[str]:
    """The boundary table: the estimate's longest fitting sequence against the published one, per card."""
    lines = [
        "Unsloth's Hugging Face + FA2 baseline columns publish the longest padded sequence that ran on a "
        "card. Here the same plan is searched, to the token, for the longest sequence whose estimate fits "
        "the card (`peftaudit.gpus.sizing.max_seq_len`, the search and fit decision of `peftaudit fit`). "
        "A card the catalog names is read as its usable memory (source in the table; ref is "
        "`shared/reference/gpus.md`); an unnamed card as the row's reading of its size. "
        "Length error = ours / published - 1; issue 14 asks for "
        f"{100 * BOUNDARY_MISS:.0f} %.",
        "",
        "| row | card | capacity (basis) | published length | estimate's longest length | length error |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for b in boundaries:
        lines.append(
            f"| {b.row.id} | {b.row.gpu} | {b.capacity_bytes / UNITS['GiB']:.2f} GiB ({b.capacity_basis}) | "
            f"{b.published:,} | {b.length:,} | {100 * b.error:+.1f} % |"
        )
    lines += ["", "- " + boundary_summary(boundaries)]
    lines += [f"- {line}" for line in _lines(boundaries)]
    return lines


def boundary_summary(boundaries: Sequence[Boundary]) -> str:
    """One line: how many boundaries, median and worst length error, how many within 10 %."""
    errors = [abs(b.error) for b in boundaries]
    worst = max(boundaries, key=lambda b: abs(b.error))
    return (
        f"Largest context that fits: {len(boundaries)} rows, median |length error| "
        f"{100 * statistics.median(errors):.1f} %, worst {100 * worst.error:+.1f} % ({worst.row.id}); "
        f"{sum(e <= BOUNDARY_MISS for e in errors)} of {len(boundaries)} within {100 * BOUNDARY_MISS:.0f} %."
    )


def _lines(boundaries: Sequence[Boundary]) -> list[str]:
    # A model with three or more cards: fit length = slope x size + intercept. The published lengths
    # against the card size as printed (the row's reading), ours against the capacity searched. The
    # slope is tokens per GiB (per-token memory), the size at zero length the fixed memory: the two
    # say which one the estimate gets wrong.
    lines = []
    for model in dict.fromkeys(b.row.model for b in boundaries):
        group = [b for b in boundaries if b.row.model == model and b.length > 0]
        if len(group) < 3:
            continue
        printed = [b.row.measured_bytes / UNITS["GiB"] for b in group]
        published = statistics.linear_regression(printed, [float(b.published) for b in group])
        residual = max(
            abs(b.published - (published.slope * x + published.intercept)) for b, x in zip(group, printed, strict=True)
        )
        capacity = [b.capacity_bytes / UNITS["GiB"] for b in group]
        ours = statistics.linear_regression(capacity, [float(b.length) for b in group])
        lines.append(
            f"{model}, {len(group)} cards: the published lengths lie on one line of the printed card size within "
            f"{residual:,.0f} tokens ({published.slope:,.1f} tokens per GiB, zero length at "
            f"{-published.intercept / published.slope:.2f} GiB); the estimate's boundaries: "
            f"{ours.slope:,.1f} tokens per GiB, zero length at {-ours.intercept / ours.slope:.2f} GiB."
        )
    return lines


def _summary(known: Sequence[Result], apart: Sequence[Result], boundaries: Sequence[Boundary] = ()) -> list[str]:
    lines = ["## Summary", ""]
    if known:
        errors = [abs(r.error) for r in known]
        worst = max(known, key=lambda r: abs(r.error))
        lines.append(
            f"- {len(known)} rows with known stack and settings: "
            f"median |error| {100 * statistics.median(errors):.1f} %, "
            f"worst {100 * worst.error:+.1f} % ({worst.row.id}); {sum(e > MISS for e in errors)} beyond 15 %, "
            f"{sum(e > 0.20 for e in errors)} beyond 20 %."
        )
        for source in dict.fromkeys(r.row.id.split("-")[0] for r in known):
            group = [abs(r.error) for r in known if r.row.id.split("-")[0] == source]
            lines.append(
                f"  - {SOURCES.get(source, source)}: {len(group)} rows, median {100 * statistics.median(group):.1f} %, "
                f"worst {100 * max(group):.1f} %"
            )
        for kind in KINDS:
            group = [abs(r.error) for r in known if r.row.kind == kind]
            if group:
                lines.append(
                    f"  - {kind}: {len(group)} rows, median {100 * statistics.median(group):.1f} %, "
                    f"worst {100 * max(group):.1f} %"
                )
    if apart:
        errors = [abs(r.error) for r in apart]
        lines.append(
            f"- {len(apart)} rows listed apart (stack, settings or counter unknown): median |error| "
            f"{100 * statistics.median(errors):.1f} %, worst {100 * max(errors):.1f} %."
        )
    applied = sum(r.stack_applied for r in [*known, *apart])
    lines.append(f"- The row's stack was passed to the plan for {applied} of {len(known) + len(apart)} rows.")
    if boundaries:
        lines.append(f"- {boundary_summary(boundaries)}")
    return lines


def _table(results: Sequence[Result], with_note: bool = False) -> list[str]:
    head = "| row | stack | GPU | measured | published | estimate | error | likely missing (> 15 %) |"
    rule = "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"
    if with_note:
        head += " unknown |"
        rule += " --- |"
    lines = [head, rule]
    for r in results:
        row = r.row
        unit = _unit(row)
        cells = [
            f"[{row.id}]({row.url})" if row.url else row.id,
            short_stack(row),
            row.gpu,
            row.kind,
            f"{r.reference_bytes / UNITS[unit]:.2f} {unit}",
            f"{r.estimate_bytes / UNITS[unit]:.2f} {unit}",
            f"{100 * r.error:+.1f} %",
            likely_gap(r),
        ]
        if with_note:
            checks = (("stack", row.stack_known), ("settings", row.settings_known), ("counter", row.kind != "unknown"))
            missing = [name for name, ok in checks if not ok]
            cells.append(", ".join(missing))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-stack", action="store_true", help="estimate every row at the installed stack")
    parser.add_argument("--only", default="", help="rows whose id starts with this (printed, not written)")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the markdown (default: %(default)s)")
    parser.add_argument(
        "--no-replay", action="store_true", help="skip tracing and replaying the whole models of REPLAYED (~1 min)"
    )
    args = parser.parse_args(argv)
    rows = [row for row in load_rows() if row.id.startswith(args.only)]
    results = []
    for row in rows:
        result = evaluate(row, use_stack=not args.no_stack)
        print(f"{row.id}: {100 * result.error:+.1f} %", file=sys.stderr)
        results.append(result)
    boundaries = [boundary(row, not args.no_stack) for row in rows if row.kind == "fits_in_capacity"]
    for b in boundaries:
        print(
            f"{b.row.id}: longest {b.length:,} tokens, published {b.published:,} ({100 * b.error:+.1f} %)",
            file=sys.stderr,
        )
    installed = [] if args.no_stack else [evaluate(r.row, use_stack=False) for r in results]
    by_id = {row.id: row for row in load_rows()}
    replays = []
    for reserved_id, allocated_id in [] if args.no_replay else REPLAYED:
        if reserved_id.startswith(args.only):
            replays.append(replayed(by_id[reserved_id], by_id[allocated_id]))
            print(f"{reserved_id}: replay {100 * replays[-1].error:+.1f} %", file=sys.stderr)
    text = render(results, boundaries, installed, replays)
    if args.only:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
