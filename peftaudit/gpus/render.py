"""Showing sizing answers: tables, a terminal chart, Markdown. Nothing here computes."""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from peftaudit.render.numbers import gib

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from peftaudit.gpus.catalog import GPU
    from peftaudit.gpus.sizing import Fit, Largest, LargestFit, LargestGenerationFit, RunCost
    from peftaudit.memory.plan import TrainingPlan
    from peftaudit.render.plan import PlanLine


def console(width: int, color: bool) -> tuple[Console, io.StringIO]:
    from rich.console import Console

    buffer = io.StringIO()
    return (
        Console(file=buffer, width=width, force_terminal=color, no_color=not color, highlight=False, emoji=False),
        buffer,
    )


def catalog_table(gpus: Sequence[GPU], out: Console) -> None:
    """The GPU catalog: vendor memory apart from usable memory, dense throughput, price if set."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="GPUs (usable = what the driver reports; TFLOPS dense)", title_justify="left", box=box.SIMPLE_HEAD
    )
    for name, justify in (
        ("GPU", "left"),
        ("Vendor GB", "right"),
        ("Usable GiB", "right"),
        ("GB/s", "right"),
        ("BF16", "right"),
        ("FP8", "right"),
        ("$/h", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for g in gpus:
        usable = f"{g.usable_gib:.1f}" + ("*" if g.usable_estimated else "")
        bf16, fp8 = g.dense_tflops("bf16"), g.dense_tflops("fp8")
        table.add_row(
            g.name,
            f"{g.memory_gb:g}",
            usable,
            f"{g.bandwidth_gbs:,.0f}",
            f"{bf16:g}" if bf16 else "-",
            f"{fp8:g}" if fp8 else "-",
            f"{g.price_per_hour:g}" if g.price_per_hour is not None else "",
        )
    out.print(table)
    if any(g.usable_estimated for g in gpus):
        out.print("* estimated: no observed total published (see docs/gpus.md)")


def _cell(f: Fit) -> str:
    if not f.fits:
        return f"no: {gib(f.peak_bytes)} per GPU even at {f.setup()}"
    return f"{f.setup()} ({gib(f.headroom_bytes)} free)"


def sweep_table(rows: Sequence[Sequence[Fit]], methods: Sequence[str], gpus: Sequence[GPU], out: Console) -> None:
    """One row per GPU, one column per method: the smallest setup that fits, with headroom."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="Smallest setup that fits (per-GPU headroom at the peak)", title_justify="left", box=box.SIMPLE_HEAD
    )
    table.add_column("GPU")
    table.add_column("Usable", justify="right")
    for m in methods:
        table.add_column(m, overflow="fold")
    for gpu, fits in zip(gpus, rows, strict=True):
        # What the training step may use: less a colocated vLLM's share where the plans have one.
        usable = fits[0].usable_bytes if fits else gpu.usable_bytes
        table.add_row(gpu.name, gib(usable), *(_cell(f) for f in fits))
    out.print(table)
    held = next((f for fits in rows for f in fits if f.vllm_bytes), None)
    if held is not None:
        share = held.vllm_bytes / (held.usable_bytes + held.vllm_bytes)
        out.print(f"Usable: what the training step gets after vLLM's {share:.0%} of each GPU", markup=False)


def usable_words(usable_bytes: int, vllm_bytes: int = 0) -> str:
    """``79.3 GiB usable``, and ``, 23.8 GiB of it held by vLLM`` where a colocated vLLM engine holds some."""
    text = f"{usable_bytes / 2**30:.1f} GiB usable"
    return text + (f", {vllm_bytes / 2**30:.1f} GiB of it held by vLLM" if vllm_bytes else "")


def seq_chart(
    curve: dict[str, list[tuple[int, int]]],
    limits: Sequence[tuple[str, int]],
    out: Console,
    width: int = 40,
    *,
    by: str | None = None,
) -> None:
    """A terminal chart of peak memory against sequence length (or what ``by`` names), one bar per method
    and length.

    ``|`` marks each GPU's usable memory on the scale; a bar past a mark does not fit that GPU.
    """
    peak = max([b for points in curve.values() for _, b in points] + [b for _, b in limits] + [1])
    scale = width / peak
    marks = sorted({min(width - 1, int(b * scale)): name for name, b in limits}.items())
    out.print(f"Peak memory per GPU by {by or 'sequence length'} (bar width {width} = {gib(peak)})", markup=False)
    legend = "  ".join(f"{name}={gib(b)}" for name, b in limits)
    if legend:
        out.print(f"GPU limits (|): {legend}")
    label = max((len(m) for m in curve), default=4)
    for method, points in curve.items():
        for seq, b in points:
            cells = ["#" if i < int(b * scale) else " " for i in range(width)]
            for pos, _ in marks:
                cells[pos] = "|" if cells[pos] == " " else "+"
            out.print(f"{method:<{label}} {seq:>7,} {''.join(cells)} {gib(b)}", markup=False)


def plan_lines(plans: Sequence[TrainingPlan], out: Console, *, omit: Collection[str] = ()) -> PlanLine:
    """Print the plan line the plans share (wrapped at the console's width); returns it, with each plan's rest."""
    from peftaudit.render.plan import plan_line

    line = plan_line(plans, omit=omit)
    for text in line.wrapped(out.width):
        out.print(text, markup=False)
    return line


def fit_table(results: Sequence[LargestFit], out: Console) -> None:
    """The plan line, then rows: method, checkpointing, max batch, max seq, and the sizes they were searched at.

    The batch and the length come from the searches, so the plan line leaves them to the table; a value the
    search's cap stopped (the model's context, the batch search's maximum) says so.
    """
    from rich import box
    from rich.table import Table

    line = plan_lines([r.plan for r in results], out, omit=("batch", "checkpointing"))
    table = Table(
        title="Largest that fits (searched with the estimator; one step more does not fit)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    # A pairs objective's batch counts preference pairs (two sequences each): the headers say so.
    from peftaudit.gpus.sizing import batch_unit

    batch = "pairs" if results and batch_unit(results[0].plan) == "pairs" else "batch"
    for name in ("Method", "Grad. ckpt", f"Max {batch}", "at seq", "Max seq len", f"at {batch}"):
        table.add_column(name, justify="left" if name in ("Method", "Grad. ckpt") else "right")
    for r, rest in zip(results, line.rest, strict=True):
        table.add_row(
            f"{r.plan.method} ({rest})" if rest else r.plan.method,
            "on" if r.plan.gradient_checkpointing else "off",
            _largest(r.batch),
            f"{r.plan.seq_len:,}",
            _largest(r.seq),
            f"{r.plan.batch_size:,}",
        )
    out.print(table)
    capped = [("batch", r.batch) for r in results if r.batch.capped] + [("seq", r.seq) for r in results if r.seq.capped]
    for what, cap, reason in dict.fromkeys((what, found.cap, found.cap_reason) for what, found in capped):
        out.print(_cap_note(what, cap, reason), markup=False)


def generation_fit_table(results: Sequence[LargestGenerationFit], out: Console) -> None:
    """GRPO's fit table: the plan line, then rows: method, checkpointing, the prompts and their length, the most
    generations per prompt (at the completion length) and the longest completion (at the generations)."""
    from rich import box
    from rich.table import Table

    line = plan_lines([r.plan for r in results], out, omit=("batch", "checkpointing"))
    table = Table(
        title="Largest that fits (searched with the estimator; one step more does not fit)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    # The searches keep the prompts and their length: one line says them where every plan shares them.
    prompts = {(r.plan.batch_size, r.prompt_len) for r in results}
    shared = len(prompts) == 1
    names = ("Method", "Grad. ckpt", *(() if shared else ("Prompts", "Prompt len")), "Max generations")
    for name in (*names, "at completion", "Max completion", "at generations"):
        table.add_column(name, justify="left" if name in ("Method", "Grad. ckpt") else "right")
    for r, rest in zip(results, line.rest, strict=True):
        table.add_row(
            f"{r.plan.method} ({rest})" if rest else r.plan.method,
            "on" if r.plan.gradient_checkpointing else "off",
            *(() if shared else (f"{r.plan.batch_size:,}", f"{r.prompt_len:,}")),
            _largest(r.generations),
            f"{r.plan.completion_len:,}",
            _largest(r.completion),
            f"{r.plan.generations:,}",
        )
    if shared:
        count, length = next(iter(prompts))
        plural = "s" if count != 1 else ""
        words = f"{count:,} prompt{plural} of {length:,} tokens"
        out.print(f"searched at {words} (--batch-size; --seq-len less --completion-len)", markup=False)
    out.print(table)
    capped = [("generations", r.generations, 0) for r in results if r.generations.capped]
    capped += [("completion", r.completion, r.prompt_len) for r in results if r.completion.capped]
    for what, cap, reason, prompt in dict.fromkeys((w, found.cap, found.cap_reason, p) for w, found, p in capped):
        out.print(_cap_note(what, cap, reason, prompt), markup=False)


def _largest(found: Largest) -> str:
    """``"832"``, ``"none"``, or ``"131,072 (capped)"`` where the search's cap, not the memory, stopped it."""
    if not found.value:
        return "none"
    return f"{found.value:,}" + (" (capped)" if found.capped else "")


def _cap_note(what: str, cap: int, reason: str, prompt: int = 0) -> str:
    """The line under the fit table that says which cap a ``(capped)`` value met: more may fit in memory."""
    if what in ("batch", "generations"):
        return f"(capped): the {what} search stops at its maximum, {cap:,}"
    if what == "completion":
        if reason == "context":
            return (
                f"(capped): the completion search stops at the model's context (max_position_embeddings) less "
                f"the {prompt:,}-token prompt, {cap:,} tokens"
            )
        return f"(capped): the completion search stops at its maximum, {cap:,} tokens"
    if reason == "context":
        return f"(capped): the length search stops at the model's context, {cap:,} tokens (max_position_embeddings)"
    return f"(capped): the length search stops at its maximum, {cap:,} tokens"


def cost_lines(setup: Fit, cost: RunCost, steps: int, step_seconds: float) -> list[str]:
    hours = cost.seconds / 3600
    lines = [
        f"Setup: {setup.setup()} {setup.gpu} ({gib(setup.peak_bytes)} peak of {gib(setup.usable_bytes)} per GPU)",
        f"Compute: {cost.flops_per_token:.3g} FLOPs/token x {cost.tokens:,} tokens = {cost.total_flops:.3g} FLOPs",
        f"Throughput: {cost.gpus} x {cost.peak_tflops:g} TFLOPS dense {cost.dtype} at {cost.mfu:.0%} MFU",
        f"Time: {hours:,.2f} h ({steps:,} optimizer steps of {step_seconds:.3g} s), {cost.gpu_hours:,.1f} GPU-hours",
    ]
    if cost.cost is not None:
        lines.append(f"Cost: {cost.cost:,.2f} at {cost.price_per_gpu_hour:g} per GPU-hour")
    else:
        lines.append("Cost: give --price (per GPU-hour) or set price_per_hour in your GPU file")
    return lines
