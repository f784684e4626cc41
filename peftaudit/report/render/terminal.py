"""The terminal report (rich): a summary panel, the per-layer table, optionally the tree.

Readable at 80 columns; colour only on a terminal and never with ``NO_COLOR``.
Counts are exact with separators; sizes are GiB (2**30 bytes) and say so.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from peftaudit.render.numbers import count, gib, percent, short
from peftaudit.report.render import RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.tree import Tree

    from peftaudit.report.model import Report, TreeNode


class TerminalRenderer:
    name = "table"
    description = "human-readable tables (the default on a terminal)"

    def render(self, report: Report, options: RenderOptions) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(
            file=buffer,
            width=options.width,
            force_terminal=options.color,
            no_color=not options.color,
            color_system="auto" if options.color else None,
            highlight=False,
            emoji=False,
        )
        _summary(console, report)
        if report.towers:
            _towers(console, report)
        _layers(console, report)
        _kinds(console, report)
        if options.tree and report.tree is not None:
            console.print(_tree(report.tree))
        if report.glance is not None:
            from peftaudit.report.render.glance import render_glance

            render_glance(report.glance, console)
        if report.estimates:
            from peftaudit.memory.render import render_estimates

            render_estimates(report.estimates, console)
        if report.findings:
            from peftaudit.recommend.render import render_findings

            console.print(render_findings(report.findings, "table", model_id=report.model.id), markup=False)
        return buffer.getvalue()


def _summary(console: Console, report: Report) -> None:
    from rich import box
    from rich.panel import Panel
    from rich.table import Table

    p, m = report.params, report.model
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    model_type = f" ({m.model_type})" if m.model_type else ""
    grid.add_row("Architecture", f"{m.architecture}{model_type}")
    grid.add_row("Config from", _origin(report))
    total = f"{count(p.total)} ({short(p.total)})"
    if report.published is not None:
        pub = report.published
        shown = count(pub.value) if isinstance(pub.value, int) else pub.value
        verdict = "matches" if pub.matches else "DIFFERS"
        total += f"\npublished {shown}: {verdict}"
    grid.add_row("Parameters", total)
    grid.add_row("  weights", count(p.weights))
    grid.add_row("  biases", count(p.biases))
    grid.add_row("  trainable", f"{count(p.trainable)} ({percent(p.trainable, p.total)})")
    grid.add_row("  frozen", count(p.frozen))
    if p.tied:
        names = "; ".join(" = ".join(t.names) for t in report.tied[:2])
        more = f" (+{len(report.tied) - 2} more)" if len(report.tied) > 2 else ""
        grid.add_row("  tied", f"{count(p.tied)} counted once: {names}{more}")
    if p.quantized:
        grid.add_row("  quantized", count(p.quantized))
    if report.moe is not None:
        moe = report.moe
        grid.add_row(
            "  active/token",
            f"{count(moe.active_params)} ({short(moe.active_params)}): "
            f"{moe.experts_per_token} of {moe.num_experts} experts",
        )
    grid.add_row("Buffers", f"{count(p.buffers)} (not parameters)")
    dtype = f" in {m.dtype}" if m.dtype else ""
    grid.add_row("Weights size", f"{gib(p.bytes)}{dtype} (binary units: 1 GiB = 2^30 bytes)")
    console.print(Panel(grid, title=f"peftaudit report: {m.id}", title_align="left", box=box.ROUNDED))


def _origin(report: Report) -> str:
    m = report.model
    if m.source == "catalog":
        return "bundled catalog (offline; --online for the hub's current config)"
    revision = f" @ {m.revision}" if m.revision else ""
    return f"{m.source}{revision}: {m.origin}"


def _towers(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    from peftaudit.towers import TOWER_LABELS

    table = Table(title="Parameters per tower", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Tower", no_wrap=True)
    table.add_column("Parameters", justify="right", no_wrap=True)
    table.add_column("Share", justify="right", no_wrap=True)
    table.add_column("Modules", overflow="fold")
    for tower in report.towers:
        label = TOWER_LABELS.get(tower.name, tower.name)
        table.add_row(label, count(tower.params), percent(tower.params, report.params.total), ", ".join(tower.modules))
    console.print(table)


def _layers(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    repeated = any(row.repeat > 1 for row in report.layers)
    table = Table(title="Parameters per layer", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Layer", overflow="fold")
    table.add_column("Type", overflow="fold")
    table.add_column("Weights", justify="right", no_wrap=True)
    table.add_column("Biases", justify="right", no_wrap=True)
    if repeated:
        table.add_column("x", justify="right", no_wrap=True)
        table.add_column("Per block", justify="right", no_wrap=True)
    for row in report.layers:
        if row.tied_to:
            owner = row.tied_to.rpartition(".")[0] or row.tied_to
            cells = [f"{row.name} = {owner}", row.type, "tied", "-"]
        else:
            cells = [row.name, row.type, count(row.weights), count(row.biases)]
        if repeated:
            cells += [str(row.repeat), count(row.per_block)] if row.repeat > 1 else ["", ""]
        table.add_row(*cells)
    p = report.params
    table.add_section()
    total = ["Total", "", count(p.weights), count(p.biases)]
    table.add_row(*([*total, "", ""] if repeated else total), style="bold")
    console.print(table)


def _kinds(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="Parameters per kind", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Kind")
    table.add_column("Parameters", justify="right")
    table.add_column("Share", justify="right")
    for kind, n in report.by_kind.items():
        if n:
            table.add_row(kind, count(n), percent(n, report.params.total))
    console.print(table)


def _tree(node: TreeNode) -> Tree:
    from rich.tree import Tree

    def label(n: TreeNode) -> str:
        repeat = f" (x{n.repeat})" if n.repeat > 1 else ""
        return f"{n.name}{repeat}  {n.type}  {count(n.params)}"

    def add(parent: Tree, n: TreeNode) -> None:
        branch = parent.add(label(n))
        for child in n.children:
            add(branch, child)

    root = Tree(label(node))
    for child in node.children:
        add(root, child)
    return root
