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
- ``max_memory_reserved`` and ``memory_reserved_after_step_p99``: allocated plus allocator margin
  (reserved memory does not hold the CUDA context);
- ``nvidia-smi``, ``fits_in_capacity`` (the card's size) and ``unknown``: the whole total;
- ``memory_allocated_after_step``: the optimizer step's allocated peak less its scratch (what
  ``memory_allocated()`` reads right after ``optimizer.step()``).

The summary (median and worst error) covers the rows with a known stack and known settings; the
others are listed apart, not dropped. Rows that miss by more than 15 % say what the estimate
likely lacks.
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

    @property
    def error(self) -> float:
        return self.estimate_bytes / self.row.measured_bytes - 1


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
                )
            )
    return rows


@cache
def _models() -> dict[str, Any]:
    return dict(json.loads(DATA.read_text())["models"])


@cache
def inventory(model: str) -> Any:
    """The inventory of a catalog id (``org/name``) or of a config named in the data file's ``models``."""
    from peftaudit.inventory import take_inventory
    from peftaudit.sources.base import SourceOptions, resolve
    from peftaudit.sources.build import build_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model in _models():
            return take_inventory(build_from_config(_models()[model]["config"], model_id=model))
        resolved, source = resolve(model)
        return take_inventory(source.build(resolved, SourceOptions()))


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
    stack = plan_stack(row) if use_stack and row.stack_known else {}
    applied = bool(stack) and "stack" in {f.name for f in fields(TrainingPlan)}
    if applied:
        fields_["stack"] = stack
    return TrainingPlan.from_dict(fields_), applied


def comparable(e: Any, plan: Any, kind: str) -> float:
    """The estimate's figure that means what the source measured (see the module docstring)."""
    context = e.components.get("cuda_context", 0)
    if kind == "max_memory_allocated":
        return float(e.allocated_bytes)
    if kind in ("max_memory_reserved", "memory_reserved_after_step_p99"):
        return float(e.total_bytes - context)
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
    return Result(row, comparable(e, plan, row.kind), applied, e.total_bytes, e.allocated_bytes)


def largest_length(row: Row, use_stack: bool = True) -> int:
    """``fits_in_capacity`` rows: the longest sequence whose estimated total fits the card (bisection)."""
    from peftaudit.memory import TrainingPlan, estimate

    base, _ = make_plan(row, use_stack)
    inv = inventory(row.model)
    low, high = 128, 4 * int(row.plan["seq_len"])

    def fits(length: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = TrainingPlan.from_dict({**base.to_dict(), "seq_len": length})
            return estimate(inv, plan).total_bytes <= row.measured_bytes

    if not fits(low):
        return 0
    while high - low > max(16, low // 100):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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
        reasons.append("the caching allocator's reserved memory above allocated (the estimate adds a flat 10 %)")
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


def render(results: Sequence[Result], lengths: dict[str, int], installed: Sequence[Result] = ()) -> str:
    """The markdown report: summary, the rows that count, the rows listed apart, the fit boundaries."""
    known = [r for r in results if r.row.known]
    apart = [r for r in results if not r.row.known]
    lines = ["# Calibration against published GPU memory figures", ""]
    lines += [
        "Written by `benchmarks/calibration.py` from `tests/memory/data/measurements.json` (sources, stacks, "
        "GPUs, what each figure measured and the settings are in that file). Each row is the estimate "
        "of the row's plan compared like with like: allocated with allocated, reserved with allocated "
        "plus the allocator margin, nvidia-smi and card sizes with the whole total (CUDA context "
        "included). Error = estimate / measured - 1.",
        "",
    ]
    lines += _summary(known, apart)
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
    if lengths:
        lines += ["", "## Largest context that fits (fits_in_capacity rows)", ""]
        lines += [
            "| row | card | published length | estimate's longest length that fits | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in results:
            if r.row.id in lengths:
                published, ours = int(r.row.plan["seq_len"]), lengths[r.row.id]
                lines.append(
                    f"| {r.row.id} | {r.row.measured:g} GiB | {published:,} | {ours:,} | {ours / published:.2f} |"
                )
    return "\n".join(lines) + "\n"


def _summary(known: Sequence[Result], apart: Sequence[Result]) -> list[str]:
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
            f"{row.measured_bytes / UNITS[unit]:.2f} {unit}",
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
    args = parser.parse_args(argv)
    rows = [row for row in load_rows() if row.id.startswith(args.only)]
    results = []
    for row in rows:
        result = evaluate(row, use_stack=not args.no_stack)
        print(f"{row.id}: {100 * result.error:+.1f} %", file=sys.stderr)
        results.append(result)
    lengths = {r.row.id: largest_length(r.row, not args.no_stack) for r in results if r.row.kind == "fits_in_capacity"}
    installed = [] if args.no_stack else [evaluate(r.row, use_stack=False) for r in results]
    text = render(results, lengths, installed)
    if args.only:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
