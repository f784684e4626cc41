"""``--format markdown``: the summary and per-layer table for a PR comment or a wiki."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit.render.numbers import count, gib, percent
from peftaudit.report.render import RenderOptions
from peftaudit.report.render.rows import tree_label

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report.model import Report, TreeNode


class MarkdownRenderer:
    name = "markdown"
    description = "Markdown tables for pull requests and wikis"

    def render(self, report: Report, options: RenderOptions) -> str:
        p, m = report.params, report.model
        lines = [
            f"## peftaudit report: `{m.id}`",
            "",
            "| | |",
            "|---|---|",
            f"| Architecture | `{m.architecture}` ({m.model_type or 'unknown type'}) |",
            f"| Config from | {m.source}: {m.origin} |",
            f"| Parameters | {count(p.total)} |",
            f"| Weights / biases | {count(p.weights)} / {count(p.biases)} |",
            f"| Trainable / frozen | {count(p.trainable)} ({percent(p.trainable, p.total)}) / {count(p.frozen)} |",
            f"| Buffers (not parameters) | {count(p.buffers)} |",
            f"| Weights size | {gib(p.bytes)} in {m.dtype} |",
        ]
        if report.published is not None:
            pub = report.published
            shown = count(pub.value) if isinstance(pub.value, int) else pub.value
            lines.append(f"| Published total | {shown} ({'matches' if pub.matches else 'differs'}) |")
        if p.tied:
            lines.append(
                f"| Tied (counted once) | {count(p.tied)}: {'; '.join(' = '.join(t.names) for t in report.tied)} |"
            )
        if report.moe is not None:
            lines.append(
                f"| Active per token | {count(report.moe.active_params)} "
                f"({report.moe.experts_per_token} of {report.moe.num_experts} experts) |"
            )
        if report.towers:
            from peftaudit.towers import TOWER_LABELS

            lines += ["", "| Tower | Parameters | Share | Modules |", "|---|--:|--:|---|"]
            for tower in report.towers:
                modules = ", ".join(f"`{m}`" for m in tower.modules)
                label = TOWER_LABELS.get(tower.name, tower.name)
                lines.append(f"| {label} | {count(tower.params)} | {percent(tower.params, p.total)} | {modules} |")
        lines += ["", "| Layer | Type | Weights | Biases | Repeat |", "|---|---|--:|--:|--:|"]
        for row in report.layers:
            if row.tied_to:
                lines.append(f"| `{row.name}` | {row.type} | tied to `{row.tied_to}` | | |")
            else:
                lines.append(
                    f"| `{row.name}` | {row.type} | {count(row.weights)} | {count(row.biases)} | {row.repeat} |"
                )
        lines.append(f"| **Total** | | **{count(p.weights)}** | **{count(p.biases)}** | |")
        if options.tree and report.tree is not None:
            lines += ["", "```", *_tree_lines(report.tree, 0), "```"]
        if report.glance is not None:
            from peftaudit.report.render.glance import glance_markdown

            lines += glance_markdown(report.glance)
        if report.estimates:
            from peftaudit.memory.render import estimates_markdown

            lines += ["", "### Memory estimate", "", estimates_markdown(report.estimates).rstrip()]
        if report.findings:
            from peftaudit.recommend.render import render_findings

            lines += ["", render_findings(report.findings, "markdown", model_id=m.id).rstrip()]
        return "\n".join(lines) + "\n"


def _tree_lines(node: TreeNode, depth: int) -> list[str]:
    out = [f"{'  ' * depth}{tree_label(node, ' ')}"]
    for child in node.children:
        out += _tree_lines(child, depth + 1)
    return out
