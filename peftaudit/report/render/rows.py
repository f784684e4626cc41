"""What the report's tables say, cell by cell, for every renderer that shows them as the terminal does.

The terminal (:mod:`.terminal`) and HTML (:mod:`.html`) reports lay the same
cells out differently; the words and numbers of each cell are decided here,
once. Reads a finished :class:`~peftaudit.report.model.Report`; computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftaudit.render.numbers import count, gib, percent, short

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report.model import Report, TreeNode


@dataclass(frozen=True)
class SummaryRow:
    """One line of the report's summary: ``Parameters``, or a detail under it (``sub``: ``trainable``)."""

    label: str
    value: str
    """May hold line breaks (``\\n``): the published total goes under ours."""
    sub: bool = False


@dataclass(frozen=True)
class Column:
    name: str
    numeric: bool = False
    """A right-aligned column of numbers, never broken across lines."""


@dataclass(frozen=True)
class Table:
    """A table of the report: its title, columns, rows of cells and the total row, if any."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    total: tuple[str, ...] | None = None


def origin(report: Report) -> str:
    """Where the config came from: the bundled catalog (offline), or the source with its revision and path."""
    m = report.model
    if m.source == "catalog":
        return "bundled catalog (offline; --online for the hub's current config)"
    revision = f" @ {m.revision}" if m.revision else ""
    return f"{m.source}{revision}: {m.origin}"


def summary_rows(report: Report) -> list[SummaryRow]:
    """The summary above the tables: architecture, provenance, the totals and their parts, the weights' size."""
    p, m = report.params, report.model
    model_type = f" ({m.model_type})" if m.model_type else ""
    rows = [SummaryRow("Architecture", f"{m.architecture}{model_type}"), SummaryRow("Config from", origin(report))]
    total = f"{count(p.total)} ({short(p.total)})"
    if report.published is not None:
        pub = report.published
        shown = count(pub.value) if isinstance(pub.value, int) else pub.value
        verdict = "matches" if pub.matches else "DIFFERS"
        total += f"\npublished {shown}: {verdict}"
    rows += [
        SummaryRow("Parameters", total),
        SummaryRow("weights", count(p.weights), sub=True),
        SummaryRow("biases", count(p.biases), sub=True),
        SummaryRow("trainable", f"{count(p.trainable)} ({percent(p.trainable, p.total)})", sub=True),
        SummaryRow("frozen", count(p.frozen), sub=True),
    ]
    if p.tied:
        names = "; ".join(" = ".join(t.names) for t in report.tied[:2])
        more = f" (+{len(report.tied) - 2} more)" if len(report.tied) > 2 else ""
        rows.append(SummaryRow("tied", f"{count(p.tied)} counted once: {names}{more}", sub=True))
    if p.quantized:
        rows.append(SummaryRow("quantized", count(p.quantized), sub=True))
    if report.moe is not None:
        moe = report.moe
        rows.append(
            SummaryRow(
                "active/token",
                f"{count(moe.active_params)} ({short(moe.active_params)}): "
                f"{moe.experts_per_token} of {moe.num_experts} experts",
                sub=True,
            )
        )
    rows.append(SummaryRow("Buffers", f"{count(p.buffers)} (not parameters)"))
    dtype = f" in {m.dtype}" if m.dtype else ""
    rows.append(SummaryRow("Weights size", f"{gib(p.bytes)}{dtype} (binary units: 1 GiB = 2^30 bytes)"))
    return rows


def towers_table(report: Report) -> Table:
    """Parameters per tower of a multimodal model (no rows for other models)."""
    from peftaudit.towers import TOWER_LABELS

    rows = tuple(
        (
            TOWER_LABELS.get(tower.name, tower.name),
            count(tower.params),
            percent(tower.params, report.params.total),
            ", ".join(tower.modules),
        )
        for tower in report.towers
    )
    columns = (Column("Tower"), Column("Parameters", True), Column("Share", True), Column("Modules"))
    return Table("Parameters per tower", columns, rows)


def layers_table(report: Report) -> Table:
    """Parameters per layer; runs of identical blocks get their count and per-block size (only where
    there are any); a tied module names the one whose tensor it is."""
    repeated = any(row.repeat > 1 for row in report.layers)
    columns = [Column("Layer"), Column("Type"), Column("Weights", True), Column("Biases", True)]
    if repeated:
        columns += [Column("x", True), Column("Per block", True)]
    rows = []
    for row in report.layers:
        if row.tied_to:
            owner = row.tied_to.rpartition(".")[0] or row.tied_to
            cells = [f"{row.name} = {owner}", row.type, "tied", "-"]
        else:
            cells = [row.name, row.type, count(row.weights), count(row.biases)]
        if repeated:
            cells += [str(row.repeat), count(row.per_block)] if row.repeat > 1 else ["", ""]
        rows.append(tuple(cells))
    p = report.params
    total = ["Total", "", count(p.weights), count(p.biases)]
    return Table("Parameters per layer", tuple(columns), tuple(rows), tuple([*total, "", ""] if repeated else total))


def kinds_table(report: Report) -> Table:
    """Parameters per kind (weight, norm, embedding, ...), the kinds the model has."""
    rows = tuple((kind, count(n), percent(n, report.params.total)) for kind, n in report.by_kind.items() if n)
    return Table("Parameters per kind", (Column("Kind"), Column("Parameters", True), Column("Share", True)), rows)


def tree_label(node: TreeNode, sep: str = "  ") -> str:
    """A node of the module tree: ``transformer.h (x12)  GPT2Block  7,087,872`` (parameters per copy)."""
    repeat = f" (x{node.repeat})" if node.repeat > 1 else ""
    return f"{node.name}{repeat}{sep}{node.type}{sep}{count(node.params)}"


__all__ = [
    "Column",
    "SummaryRow",
    "Table",
    "kinds_table",
    "layers_table",
    "origin",
    "summary_rows",
    "towers_table",
    "tree_label",
]
