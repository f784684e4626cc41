"""Showing the default report's glance: the training-memory table and the recommendation in one line.

Reads a finished :class:`~peftaudit.report.glance.Glance` and computes nothing;
the terminal and Markdown renderers of the report call it below the parameter
tables, and the HTML renderer takes its cells (:func:`glance_rows`) and lines.
Sizes are GiB (2**30 bytes); GPU classes are the GB on the box.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.render.numbers import gib
from peftaudit.render.text import sentence

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from peftaudit.render.plan import PlanLine
    from peftaudit.report.glance import Glance, MemoryGlance, MemoryRow, RecommendationSummary
    from peftaudit.report.serving_glance import ServingGlance, ServingRow

TITLE = "Training memory at a glance"


def fits_text(row: MemoryRow) -> str:
    """``fits 48 GB (not 24)``, ``fits 24 GB``, or beyond the largest class ``needs 2x 80 GB: zero3`` (the fewest
    GPUs of the largest class, and how the plan is spread over them)."""
    if row.total_bytes is None:
        return "not estimated"
    if row.fits_class_gb is not None:
        below = f" (not {row.too_small_class_gb})" if row.too_small_class_gb is not None else ""
        return f"fits {row.fits_class_gb} GB{below}"
    out = row.scale_out
    largest = f"{row.too_small_class_gb} GB"
    if out is None:  # not written by this version, but a report read back may lack it
        return f"needs more than {largest}"
    if not out.fits:
        return f"does not fit {out.gpus}x {largest}"
    if out.gpus == 1:  # the search switched gradient checkpointing on, on one GPU
        return f"fits {largest} with grad. ckpt"
    setup = out.setup.partition(" ")[2]  # "zero3 + offload both", without the "2x" shown already
    return f"needs {out.gpus}x {largest}: {setup}"


def _peak(row: MemoryRow) -> str:
    return "-" if row.total_bytes is None else gib(row.total_bytes).removesuffix(" GiB")


def _plan(memory: MemoryGlance) -> PlanLine:
    """The plan line the rows share; the table's own checkpointing column carries what differs there."""
    from peftaudit.render.plan import plan_line

    return plan_line([memory.row_plan(r) for r in memory.rows], omit=("checkpointing",))


def _method(row: MemoryRow, rest: str) -> str:
    return f"{row.method} ({rest})" if rest else row.method


#: The memory table's columns; :func:`glance_rows` gives their cells.
COLUMNS: tuple[str, ...] = ("Method", "Checkpointing", "Peak (GiB)", "GPU class")


def glance_rows(memory: MemoryGlance) -> tuple[PlanLine, list[tuple[str, str, str, str]]]:
    """The plan line the rows share, and each row's cells under :data:`COLUMNS`: the method (with what its plan
    does apart from the line: ``qlora (nf4)``), checkpointing, the peak in GiB, the GPU class it fits."""
    plan = _plan(memory)
    rows = [
        (_method(row, rest), "on" if row.gradient_checkpointing else "off", _peak(row), fits_text(row))
        for row, rest in zip(memory.rows, plan.rest, strict=True)
    ]
    return plan, rows


def notes(memory: MemoryGlance) -> list[str]:
    """What the table assumed beyond the plan line (the GPU of each class, LoRA's rank and targets), the
    estimator's warnings by code, and the methods it could not estimate."""
    classes = ", ".join(f"{c.class_gb} GB = {c.gpu} ({gib(c.usable_bytes)})" for c in memory.gpu_classes)
    plan = memory.plan
    targets = plan.get("targets")
    where = "all linear layers" if targets == "all-linear" else f"targets {targets}"
    lines = [
        f"GPU classes (usable memory): {classes}. Peak per GPU, CUDA context included; lora and qlora at rank "
        f"{plan.get('rank')} on {where}."
    ]
    warned: dict[str, dict[str, None]] = {}  # code -> the methods it was raised for, in order
    for row in memory.rows:
        for code in row.warnings:
            warned.setdefault(code, {})[row.method] = None
    if warned:
        shown = "; ".join(f"{code} ({', '.join(methods)})" for code, methods in warned.items())
        lines.append(f"Estimator warnings: {shown}; report --method METHOD explains them.")
    missing = [r for r in memory.rows if r.unavailable]
    for reason in dict.fromkeys(r.unavailable for r in missing):
        methods = ", ".join(dict.fromkeys(r.method for r in missing if r.unavailable == reason))
        lines.append(f"{methods}: not estimated: {reason}")
    return lines


def targets_text(rec: RecommendationSummary) -> str:
    """``all-linear (q_proj, k_proj, v_proj)``, with target parameters and modules to save when there are any."""
    modules = rec.target_modules
    names = modules if isinstance(modules, str) else ", ".join(modules or ())
    parts = [names] if names else []
    if rec.target_parameters:
        parts.append("parameters " + ", ".join(rec.target_parameters))
    if rec.modules_to_save:
        parts.append("saving " + ", ".join(rec.modules_to_save))
    return f"{rec.preset} ({'; '.join(parts)})" if parts else str(rec.preset)


def recommendation_line(rec: RecommendationSummary) -> str:
    """``LoRA on all-linear (q_proj, ...), rank 16, alpha 32``, or why there is none."""
    if rec.unavailable:
        return f"none: {rec.unavailable}"
    method = "QLoRA (4-bit base)" if rec.method == "qlora" else "LoRA"
    rslora = ", rsLoRA" if rec.use_rslora else ""
    return f"{method} on {targets_text(rec)}, rank {rec.rank}, alpha {rec.alpha}{rslora}"


def no_estimate(memory: MemoryGlance) -> str:
    """Why a model the estimator cannot size has no table: ``no estimate: REASON (the parameter counts are exact)``."""
    return f"no estimate: {memory.unavailable} (the parameter counts are exact)"


def unavailable_line(memory: MemoryGlance) -> str:
    """The one line a model the estimator cannot size gets instead of the table."""
    return f"{TITLE}: {no_estimate(memory)}"


def render_glance(glance: Glance, console: Console) -> None:
    """Print the memory table (or why there is none) and the recommendation to a rich console."""
    from rich import box
    from rich.table import Table

    memory = glance.memory
    if memory.unavailable:
        console.print(unavailable_line(memory), markup=False)
    else:
        console.print(TITLE, style="bold", markup=False)
        plan, rows = glance_rows(memory)
        for line in plan.wrapped(console.width):
            console.print(line, markup=False)
        method, checkpointing, peak, gpu_class = COLUMNS
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column(method, no_wrap=True)
        table.add_column(checkpointing, no_wrap=True)
        table.add_column(peak, justify="right", no_wrap=True)
        table.add_column(gpu_class, overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
        for line in notes(memory):
            console.print(line, markup=False, style="bright_black")
    rec = glance.recommendation
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Recommendation", recommendation_line(rec))
    if rec.reason:
        grid.add_row("  why", rec.reason)
    grid.add_row("  more", rec.command)
    console.print()
    console.print(grid)


def glance_markdown(glance: Glance) -> list[str]:
    """The memory table and the recommendation as Markdown lines."""
    memory = glance.memory
    lines = ["", f"### {TITLE}", ""]
    if memory.unavailable:
        lines.append(sentence(no_estimate(memory)))
    else:
        plan, rows = glance_rows(memory)
        lines += [plan.text, "", "| method | checkpointing | peak (GiB) | GPU class |", "|---|---|--:|---|"]
        lines += [f"| {' | '.join(cells)} |" for cells in rows]
        for line in notes(memory):
            lines += ["", line]
    rec = glance.recommendation
    lines += ["", "### Recommendation", "", f"**{recommendation_line(rec)}**"]
    if rec.reason:
        lines += ["", f"Why: {rec.reason}"]
    lines += ["", f"The full recommendation: `{rec.command}`"]
    return lines


SERVING_TITLE = "Serving at a glance"


def serving_table(serving: ServingGlance) -> tuple[str, list[str], list[list[str]]]:
    """The serving glance as (plan line, column headers, rows): one row per precision, one column per GPU class,
    each cell the fewest GPUs of that class that serve a sequence of the context and how many they serve."""
    plan = (
        f"{serving.accounting} at its defaults, {serving.context:,} tokens per sequence, the KV cache in the "
        "weights' dtype (peftaudit serve MODEL sizes any other plan)"
    )
    classes: list[tuple[int, str]] = []
    for row in serving.rows:
        if (row.class_gb, row.gpu) not in classes:
            classes.append((row.class_gb, row.gpu))
    header = ["Weights", *(f"{gb} GB ({gpu})" for gb, gpu in classes)]
    rows: list[list[str]] = []
    for label in dict.fromkeys(r.label for r in serving.rows):
        cells = [label]
        for gb, gpu in classes:
            row = next(r for r in serving.rows if r.label == label and (r.class_gb, r.gpu) == (gb, gpu))
            cells.append(_serving_cell(row))
        rows.append(cells)
    return plan, header, rows


def _serving_cell(row: ServingRow) -> str:
    gpus = "1 GPU" if row.gpus == 1 else f"{row.gpus} GPUs"
    if not row.fits:
        return f"not on {gpus}"
    return f"{gpus}: {row.sequences:,} sequences ({row.kv_cache_tokens:,} KV tokens per GPU)"
