"""Showing estimates: a rich table of components, a terminal bar chart, Markdown, and the table's cells
(:func:`estimate_table`) for the HTML report.

These functions read finished :class:`~peftaudit.memory.result.MemoryEstimate`
objects and never compute; the numbers shown are ``components`` and
``total_bytes`` as they are. Byte counts are shown in GiB (binary), labelled so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftaudit.memory.result import COMPONENT_HELP, COMPONENTS, MemoryEstimate
from peftaudit.render.plan import PlanLine, plan_line
from peftaudit.render.text import sentence
from peftaudit.units import GIB

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

_SHORT: dict[str, str] = {
    "base_weights": "base",
    "quantization_constants": "quant",
    "trainable_weights": "trainable",
    "gradients": "grads",
    "optimizer_states": "optim",
    "master_weights": "master",
    "reference_weights": "reference",
    "weight_copies": "w-copies",
    "activations": "acts",
    "kv_cache": "kv-cache",
    "logits_and_loss": "logits",
    "temporaries": "temps",
    "cuda_context": "context",
    "allocator_margin": "margin",
}
_STYLE: dict[str, str] = {
    "base_weights": "blue",
    "quantization_constants": "bright_blue",
    "trainable_weights": "cyan",
    "gradients": "magenta",
    "optimizer_states": "red",
    "master_weights": "bright_red",
    "reference_weights": "bright_magenta",
    "weight_copies": "bright_cyan",
    "activations": "green",
    "kv_cache": "bright_green",
    "logits_and_loss": "yellow",
    "temporaries": "bright_yellow",
    "cuda_context": "white",
    "allocator_margin": "bright_black",
}
_GLYPH: dict[str, str] = {
    "base_weights": "#",
    "quantization_constants": "q",
    "trainable_weights": "t",
    "gradients": "g",
    "optimizer_states": "o",
    "master_weights": "m",
    "reference_weights": "r",
    "weight_copies": "w",
    "activations": "a",
    "kv_cache": "k",
    "logits_and_loss": "l",
    "temporaries": "~",
    "cuda_context": "c",
    "allocator_margin": ".",
}


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def _label(e: MemoryEstimate) -> str:
    return e.method if e.source == "analytic" else f"{e.method} ({e.source})"


def _plan(estimates: Sequence[MemoryEstimate]) -> PlanLine:
    """The plan line the estimates share; what differs between them (a 4-bit base) goes in their rows."""
    return plan_line([e.plan for e in estimates])


def _row_label(e: MemoryEstimate, rest: str) -> str:
    """The method cell of a table row: the label plus what this plan does apart from the others."""
    if not rest:
        return _label(e)
    return f"{e.method} ({rest})" if e.source == "analytic" else f"{e.method} ({e.source}, {rest})"


def _shown(estimates: Sequence[MemoryEstimate]) -> list[str]:
    """Components that are non-zero in at least one estimate, in the fixed order."""
    return [c for c in COMPONENTS if any(e.components.get(c, 0) for e in estimates)]


@dataclass(frozen=True)
class EstimateTable:
    """The estimates as a table: what Markdown and HTML show (the terminal adds colour and a bar chart)."""

    plan: PlanLine
    components: tuple[str, ...]
    """The components non-zero in at least one estimate, in the fixed order of ``COMPONENTS``."""
    header: tuple[str, ...]
    """``method``, each component's short name, ``peak (GiB)``, ``peak at``."""
    rows: tuple[tuple[str, ...], ...]
    """Per estimate: its label (with what its plan does apart from the plan line), each component's GiB,
    the peak's GiB, the phase of the step where the peak is."""
    legend: tuple[tuple[str, str], ...]
    """Each shown component's short name and what it is."""
    warnings: tuple[tuple[str, str, str], ...]
    """Each estimate's warnings: its label, the warning's code and message."""
    notes: tuple[tuple[str, str], ...]
    """Each estimate of a pre-quantized checkpoint: its label and how its base is stored."""


def estimate_table(estimates: Sequence[MemoryEstimate]) -> EstimateTable:
    """The table of :func:`estimates_markdown` (one row per estimate, GiB), as cells."""
    shown = _shown(estimates)
    plan = _plan(estimates)
    rows = tuple(
        (_row_label(e, rest), *(_gib(e.components.get(c, 0)) for c in shown), _gib(e.total_bytes), e.peak_phase)
        for e, rest in zip(estimates, plan.rest, strict=True)
    )
    return EstimateTable(
        plan=plan,
        components=tuple(shown),
        header=("method", *(_SHORT[c] for c in shown), "peak (GiB)", "peak at"),
        rows=rows,
        legend=tuple((_SHORT[c], COMPONENT_HELP[c]) for c in shown),
        warnings=tuple((_label(e), w.code, w.message) for e in estimates for w in e.warnings),
        notes=tuple((_label(e), line) for e, line in storage_lines(estimates)),
    )


def render_estimates(estimates: Sequence[MemoryEstimate], console: Console, *, width: int = 40) -> None:
    """Print a table (one row per method, one column per component, GiB) and a bar chart."""
    from rich.table import Table
    from rich.text import Text

    if not estimates:
        return
    shown = _shown(estimates)
    plan = _plan(estimates)
    for line in plan.wrapped(console.width):
        console.print(line, markup=False)
    table = Table(title="Peak GPU memory per GPU (GiB)", title_justify="left", box=None, pad_edge=False, padding=(0, 1))
    table.add_column("method", style="bold", no_wrap=True)
    for c in shown:
        table.add_column(_SHORT[c], justify="right", style=_STYLE[c], no_wrap=True)
    table.add_column("peak", justify="right", style="bold", no_wrap=True)
    for e, rest in zip(estimates, plan.rest, strict=True):
        table.add_row(_row_label(e, rest), *(_gib(e.components.get(c, 0)) for c in shown), _gib(e.total_bytes))
    console.print(table)

    # Bar chart: one stacked bar per estimate, all on the same scale.
    top = max(e.total_bytes for e in estimates) or 1
    name_width = max(len(_label(e)) for e in estimates)
    for e in estimates:
        bar = Text(f"{_label(e):<{name_width}} ")
        for c in shown:
            cells = round(width * e.components.get(c, 0) / top)
            if cells:
                bar.append(_GLYPH[c] * cells, style=_STYLE[c])
        bar.append(f" {_gib(e.total_bytes)} GiB, peak in the {e.peak_phase}")
        console.print(bar)
    legend = Text("  ")
    for c in shown:
        legend.append(f"{_GLYPH[c]} {_SHORT[c]}  ", style=_STYLE[c])
    console.print(legend)
    reserved = reserved_line(estimates)
    if reserved:
        console.print(reserved, markup=False, style="bright_black")
    for e in estimates:
        for w in e.warnings:
            console.print(f"[yellow]warning[/yellow] ({_label(e)}, {w.code}): {w.message}")
    for e, line in storage_lines(estimates):
        console.print(Text.assemble(("note", "cyan"), f" ({_label(e)}, base storage): {line}"))


def reserved_line(estimates: Sequence[MemoryEstimate]) -> str:
    """What PyTorch reserves where memory is plentiful, next to the peak (the least memory the step runs in)."""
    known = [e for e in estimates if e.reserved_bytes]
    if not known:
        return ""
    if len(known) == 1:
        figures = f"{_gib(known[0].reserved_bytes)} GiB"
    else:
        figures = ", ".join(f"{_label(e)} {_gib(e.reserved_bytes)}" for e in known) + " GiB"
    # A long run of varying lengths keeps caching blocks wherever there is room; a smaller card is
    # not short of memory for it: its allocator frees that cache and retries.
    varied = any(e.plan.get("lengths") == "varied" for e in known)
    over = " over a long run of varying lengths" if varied else ""
    smaller = "; on a smaller card the allocator frees that cache and the step runs in the peak" if varied else ""
    return (
        "peak: the least memory the step runs in (CUDA context included); with memory to spare "
        f"PyTorch reserves {figures}{over} (max_memory_reserved; nvidia-smi adds the context){smaller}"
    )


def storage_lines(estimates: Sequence[MemoryEstimate]) -> list[tuple[MemoryEstimate, str]]:
    """The base-storage line of each estimate of a pre-quantized checkpoint, with its recipe."""
    out = []
    for e in estimates:
        s = e.base_storage
        if s is not None:
            out.append((e, s.note + (f" ({s.reference})" if s.reference else "")))
    return out


def estimates_markdown(estimates: Sequence[MemoryEstimate]) -> str:
    """A Markdown table of the estimates (GiB, one row per method) with a component legend."""
    if not estimates:
        return ""
    table = estimate_table(estimates)
    lines = [table.plan.text, ""]
    lines += [
        "| " + " | ".join(table.header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(table.components) + 1) + ["---"]) + "|",
    ]
    for *cells, peak, phase in table.rows:
        lines.append("| " + " | ".join([*cells, f"**{peak}**", phase]) + " |")
    lines.append("")
    reserved = reserved_line(estimates)
    if reserved:
        lines += [sentence(reserved), ""]
    for name, meaning in table.legend:
        lines.append(f"- **{name}**: {meaning}")
    if table.warnings:
        lines.append("")
        for label, code, message in table.warnings:
            lines.append(f"> warning ({label}, `{code}`): {message}")
    if table.notes:
        lines.append("")
        for label, line in table.notes:
            lines.append(f"> note ({label}, base storage): {line}")
    return "\n".join(lines) + "\n"
