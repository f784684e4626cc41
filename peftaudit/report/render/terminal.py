"""The terminal report (rich): a summary panel, the per-layer table, optionally the tree.

Readable at 80 columns; colour only on a terminal and never with ``NO_COLOR``.
Counts are exact with separators; sizes are GiB (2**30 bytes) and say so.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from peftaudit.report.render import RenderOptions
from peftaudit.report.render.rows import kinds_table, layers_table, summary_rows, towers_table, tree_label

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

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for row in summary_rows(report):
        grid.add_row(f"  {row.label}" if row.sub else row.label, row.value)
    console.print(Panel(grid, title=f"peftaudit report: {report.model.id}", title_align="left", box=box.ROUNDED))


def _towers(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    towers = towers_table(report)
    table = Table(title=towers.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Tower", no_wrap=True)
    table.add_column("Parameters", justify="right", no_wrap=True)
    table.add_column("Share", justify="right", no_wrap=True)
    table.add_column("Modules", overflow="fold")
    for cells in towers.rows:
        table.add_row(*cells)
    console.print(table)


def _layers(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    layers = layers_table(report)
    table = Table(title=layers.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in layers.columns:
        if column.numeric:
            table.add_column(column.name, justify="right", no_wrap=True)
        else:
            table.add_column(column.name, overflow="fold")
    for cells in layers.rows:
        table.add_row(*cells)
    table.add_section()
    table.add_row(*(layers.total or ()), style="bold")
    console.print(table)


def _kinds(console: Console, report: Report) -> None:
    from rich import box
    from rich.table import Table

    kinds = kinds_table(report)
    table = Table(title=kinds.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Kind")
    table.add_column("Parameters", justify="right")
    table.add_column("Share", justify="right")
    for cells in kinds.rows:
        table.add_row(*cells)
    console.print(table)


def _tree(node: TreeNode) -> Tree:
    from rich.tree import Tree

    def add(parent: Tree, n: TreeNode) -> None:
        branch = parent.add(tree_label(n))
        for child in n.children:
            add(branch, child)

    root = Tree(tree_label(node))
    for child in node.children:
        add(root, child)
    return root
