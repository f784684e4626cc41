"""``--format html``: the report as one self-contained page to share (attach it, mail it, open it on a phone).

Everything is in the one file: the CSS in a ``<style>``, the charts as inline
SVG, no script, and nothing fetched from anywhere (no stylesheet, font,
picture or script from elsewhere; no links out: provenance URLs are plain
text). Every piece of text from the report is escaped.

The page shows what the terminal report shows, in the same words (the cells
come from :mod:`.rows`, the memory table's from :mod:`.glance`, the
estimates' from :mod:`peftaudit.memory.render`): the summary, the tables per
tower, layer and kind, the module tree with ``--tree``, then the memory table
at a glance with its sizing chart and the recommendation, or the detailed
estimates (``--method``/``--compare``) with theirs, and the findings
(``--checks``). The sizing chart of the glance draws each row's peak against
the usable memory of the GPU classes it was placed on; the chart of detailed
estimates stacks each peak by component, as the terminal's bar chart does,
without class lines: the report carries no GPU figures for those plans
(``peftaudit gpus`` sizes them).

Readable on a phone: the page follows the screen's width, long names wrap,
and the wide tables scroll sideways inside their own box instead of widening
the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from peftaudit.render.numbers import gib
from peftaudit.render.text import sentence
from peftaudit.report.render import RenderOptions
from peftaudit.report.render.rows import Table, kinds_table, layers_table, summary_rows, towers_table, tree_label

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.result import MemoryEstimate
    from peftaudit.recommend.findings import Finding
    from peftaudit.report.glance import Glance
    from peftaudit.report.model import Report, TreeNode
    from peftaudit.report.serving_glance import ServingGlance

#: Colours of the charts and legends: per method (the glance) and per component (detailed estimates).
#: Each class sets ``fill`` for the SVG and ``background`` for the legend's swatches.
_COLOURS: dict[str, str] = {
    "m-full": "#e15759",
    "m-lora": "#4e79a7",
    "m-qlora": "#59a14f",
    "c-base_weights": "#4e79a7",
    "c-quantization_constants": "#a0cbe8",
    "c-trainable_weights": "#76b7b2",
    "c-gradients": "#b07aa1",
    "c-optimizer_states": "#e15759",
    "c-master_weights": "#ff9d9a",
    "c-reference_weights": "#d4a6c8",
    "c-weight_copies": "#499894",
    "c-activations": "#59a14f",
    "c-kv_cache": "#8cd17d",
    "c-logits_and_loss": "#edc948",
    "c-temporaries": "#f28e2b",
    "c-cuda_context": "#bab0ac",
    "c-allocator_margin": "#79706e",
}

_CSS = """\
:root{color-scheme:light dark;--fg:#1f2328;--muted:#59636e;--bg:#fff;--line:#d1d9e0;--head:#f6f8fa;--warn:#9a6700}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;--line:#3d444d;\
--head:#151b23;--warn:#d29922}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);\
font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:60rem;margin:0 auto;padding:1rem}
h1{font-size:1.35rem;line-height:1.3;margin:.5rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:2rem 0 .5rem;padding-bottom:.2rem;border-bottom:1px solid var(--line)}
p,li{overflow-wrap:anywhere}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em}
/* a table wider than the screen scrolls in its box; a shadow shows at an edge with more beyond it */
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%;margin:.5rem 0;\
background:linear-gradient(to right,var(--bg) 30%,transparent) 0 0/2.5rem 100%,\
linear-gradient(to left,var(--bg) 30%,transparent) 100% 0/2.5rem 100%,\
radial-gradient(farthest-side at 0 50%,rgba(0,0,0,.25),transparent) 0 0/.8rem 100%,\
radial-gradient(farthest-side at 100% 50%,rgba(0,0,0,.25),transparent) 100% 0/.8rem 100%;\
background-repeat:no-repeat;background-attachment:local,local,scroll,scroll}
table{border-collapse:collapse;font-size:.9rem}
th,td{padding:.3rem .6rem;text-align:left;vertical-align:top;border-bottom:1px solid var(--line)}
thead th{background:var(--head)}
.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{white-space:nowrap}
tfoot td{font-weight:600}
table.summary th{white-space:nowrap;font-weight:600}
table.summary tr.sub th{font-weight:400;padding-left:1.6rem}
table.summary td{overflow-wrap:anywhere;min-width:12rem}
.plan,.note{color:var(--muted);font-size:.9rem}
.answer{font-weight:600}
.warning{color:var(--warn)}
figure{margin:1rem 0}
figcaption{color:var(--muted);font-size:.85rem}
svg.chart{display:block;width:100%;max-width:26rem;height:auto}
svg.chart text{fill:currentColor;paint-order:stroke;stroke:var(--bg);stroke-width:3px;stroke-linejoin:round}
svg.chart text.inside{fill:#fff;stroke:none}
svg.chart .mark{stroke:var(--muted);stroke-width:1;stroke-dasharray:4 3}
svg.chart .mark-label{fill:var(--muted)}
svg.chart .break{stroke:var(--bg);stroke-width:2}
svg.chart .ckpt{fill-opacity:.6}
ul.legend{list-style:none;padding:0;font-size:.9rem}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:baseline;border-radius:2px}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:1.1rem;border-left:1px solid var(--line)}
ul.tree{font-size:.9rem;padding-left:.6rem}
ul.findings{padding-left:1.2rem}
ul.findings li{margin-bottom:.6rem}
footer{margin-top:2.5rem;color:var(--muted);font-size:.85rem}
@media (max-width:30rem){main{padding:.75rem}table{font-size:.85rem}th,td{padding:.25rem .35rem}}
"""


def _style() -> str:
    colours = "\n".join(f".{name}{{fill:{c};background:{c}}}" for name, c in _COLOURS.items())
    return f"<style>\n{_CSS}{colours}\n</style>"


class HtmlRenderer:
    name = "html"
    description = "one self-contained HTML page to share (inline CSS and SVG, no scripts, nothing fetched)"

    def render(self, report: Report, options: RenderOptions) -> str:
        model = escape(report.model.id)
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="peftaudit {escape(report.peftaudit_version)}">',
            f"<title>peftaudit report: {model}</title>",
            _style(),
            "</head>",
            "<body>",
            "<main>",
            f"<h1>peftaudit report: <code>{model}</code></h1>",
            _summary(report),
        ]
        if report.towers:
            parts.append(_table_section("towers", towers_table(report)))
        parts.append(_table_section("layers", layers_table(report)))
        parts.append(_table_section("kinds", kinds_table(report)))
        if options.tree and report.tree is not None:
            parts.append(_tree(report.tree))
        if report.glance is not None:
            parts.append(_glance(report.glance))
        if report.estimates:
            parts.append(_estimates(report.estimates))
        if report.findings:
            parts.append(_findings(report.findings))
        classes = " GPU classes are the GB on the box." if report.glance is not None else ""
        parts += [
            "<footer>",
            f"<p>Written by peftaudit {escape(report.peftaudit_version)} (report schema "
            f"{report.schema_version}). Counts are exact; sizes are GiB (1 GiB = 2^30 bytes).{classes} "
            "<code>--format json</code> gives the same figures as data.</p>",
            "</footer>",
            "</main>",
            "</body>",
            "</html>",
        ]
        return "\n".join(parts) + "\n"


def _lines(text: str) -> str:
    """Escaped text whose line breaks stay breaks."""
    return "<br>".join(escape(line) for line in text.split("\n"))


def _summary(report: Report) -> str:
    rows = []
    for row in summary_rows(report):
        sub = ' class="sub"' if row.sub else ""
        rows.append(f'<tr{sub}><th scope="row">{escape(row.label)}</th><td>{_lines(row.value)}</td></tr>')
    table = ['<div class="scroll"><table class="summary"><tbody>', *rows, "</tbody></table></div>"]
    return "\n".join(['<section id="summary">', *table, "</section>"])


def _cells(cells: Sequence[str], numeric: Sequence[bool], tag: str = "td") -> str:
    def text(cell: str) -> str:
        return escape(cell).replace("\u00ad", "&shy;")  # a soft hyphen, visible in the source

    return "".join(
        f'<{tag} class="num">{text(c)}</{tag}>' if num else f"<{tag}>{text(c)}</{tag}>"
        for c, num in zip(cells, numeric, strict=True)
    )


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], total: Sequence[str] = ()
) -> str:
    """A table in a box that scrolls sideways when it is wider than the screen."""
    out = ['<div class="scroll"><table>', f"<thead><tr>{_cells(header, numeric, 'th')}</tr></thead>", "<tbody>"]
    out += [f"<tr>{_cells(row, numeric)}</tr>" for row in rows]
    out.append("</tbody>")
    if total:
        out.append(f"<tfoot><tr>{_cells(total, numeric)}</tr></tfoot>")
    out.append("</table></div>")
    return "\n".join(out)


def _table_section(ident: str, table: Table) -> str:
    numeric = [c.numeric for c in table.columns]
    body = _table([c.name for c in table.columns], table.rows, numeric, table.total or ())
    return f'<section id="{ident}">\n<h2>{escape(table.title)}</h2>\n{body}\n</section>'


def _tree(root: TreeNode) -> str:
    def node(n: TreeNode) -> list[str]:
        if not n.children:
            return [f"<li>{escape(tree_label(n))}</li>"]
        out = [f"<li>{escape(tree_label(n))}", "<ul>"]
        for child in n.children:
            out += node(child)
        return [*out, "</ul>", "</li>"]

    return "\n".join(
        [
            '<section id="tree">',
            "<h2>Module tree</h2>",
            "<details open>",
            "<summary>Modules with their parameters per copy; (xN): N identical copies</summary>",
            '<ul class="tree">',
            *node(root),
            "</ul>",
            "</details>",
            "</section>",
        ]
    )


def _glance(glance: Glance) -> str:
    from peftaudit.report.render.glance import (
        COLUMNS,
        TITLE,
        glance_rows,
        no_estimate,
        notes,
        recommendation_line,
    )
    from peftaudit.report.render.svg import Bar, Line, Segment, bar_chart

    memory = glance.memory
    out = ['<section id="memory">', f"<h2>{escape(TITLE)}</h2>"]
    if memory.unavailable:
        out.append(f"<p>{escape(sentence(no_estimate(memory)))}</p>")
    else:
        plan, rows = glance_rows(memory)
        out.append(f'<p class="plan">{escape(plan.text)}</p>')
        # A phone's screen holds the four columns when the long header may break (a soft hyphen).
        header = [c.replace("Checkpointing", "Check\u00adpointing") for c in COLUMNS]
        out.append(_table(header, rows, (False, False, True, False)))
        bars = [
            Bar(
                label=f"{cells[0]} · checkpointing {cells[1]}",
                segments=(
                    Segment(row.total_bytes, f"m-{row.method}" + (" ckpt" if row.gradient_checkpointing else "")),
                ),
                figure=gib(row.total_bytes),
            )
            for row, cells in zip(memory.rows, rows, strict=True)
            if row.total_bytes is not None
        ]
        lines = [Line(c.usable_bytes, f"{c.class_gb} GB") for c in memory.gpu_classes]
        classes = ", ".join(f"{c.class_gb} GB = {c.gpu} ({gib(c.usable_bytes)})" for c in memory.gpu_classes)
        if bars:
            desc = (
                "Peak memory per GPU: "
                + "; ".join(f"{b.label}: {b.figure}" for b in bars)
                + f". Dashed lines: the usable memory of each GPU class: {classes}."
            )
            chart = bar_chart(bars, lines, title=f"{TITLE}: peak per GPU", desc=desc, ident="glance-chart")
            out += [
                "<figure>",
                chart,
                "<figcaption>Peak per GPU; dashed lines: the usable memory of each GPU class (below).</figcaption>",
                "</figure>",
            ]
        out += [f'<p class="note">{escape(line)}</p>' for line in notes(memory)]
    out.append("</section>")
    rec = glance.recommendation
    out += ['<section id="recommendation">', "<h2>Recommendation</h2>"]
    out.append(f'<p class="answer">{escape(recommendation_line(rec))}</p>')
    if rec.reason:
        out.append(f"<p>Why: {escape(rec.reason)}</p>")
    out.append(f"<p>The full recommendation: <code>{escape(rec.command)}</code></p>")
    out.append("</section>")
    if glance.serving is not None:
        out.append(_serving(glance.serving))
    return "\n".join(out)


def _serving(serving: ServingGlance) -> str:
    from peftaudit.report.render.glance import SERVING_TITLE, serving_table

    out = ['<section id="serving">', f"<h2>{escape(SERVING_TITLE)}</h2>"]
    if serving.unavailable:
        out.append(f"<p>{escape(sentence('not sized for serving: ' + serving.unavailable))}</p>")
    else:
        plan, header, rows = serving_table(serving)
        out.append(f'<p class="plan">{escape(plan)}</p>')
        out.append(_table(header, rows, (False, *([False] * (len(header) - 1)))))
    out.append("</section>")
    return "\n".join(out)


def _estimates(estimates: Sequence[MemoryEstimate]) -> str:
    from peftaudit.memory.render import estimate_table, reserved_line
    from peftaudit.report.render.svg import Bar, Segment, bar_chart

    table = estimate_table(estimates)
    numeric = [False, *([True] * (len(table.components) + 1)), False]
    out = [
        '<section id="estimates">',
        "<h2>Memory estimate</h2>",
        f'<p class="plan">{escape(table.plan.text)}</p>',
        _table(table.header, table.rows, numeric),
    ]
    names = table.header[1 : 1 + len(table.components)]
    bars = [
        Bar(
            label=label,
            segments=tuple(
                Segment(e.components.get(c, 0), f"c-{c}", f"{name}: {cell} GiB")
                for c, name, cell in zip(table.components, names, cells, strict=True)
            ),
            figure=f"{peak} GiB",
        )
        for e, (label, *cells, peak, _phase) in zip(estimates, table.rows, strict=True)
    ]
    desc = "Peak memory per GPU by component: " + "; ".join(
        f"{b.label}: {b.figure} (" + ", ".join(f"{s.name}" for s in b.segments if s.value) + ")" for b in bars
    )
    legend = [
        f'<li><span class="swatch c-{escape(c)}"></span><strong>{escape(name)}</strong>: {escape(meaning)}</li>'
        for c, (name, meaning) in zip(table.components, table.legend, strict=True)
    ]
    out += [
        "<figure>",
        bar_chart(bars, (), title="Peak memory per GPU by component", desc=desc, ident="estimate-chart"),
        "<figcaption>Each peak by component (GiB); the table above has the figures.</figcaption>",
        "</figure>",
        '<ul class="legend">',
        *legend,
        "</ul>",
    ]
    reserved = reserved_line(estimates)
    if reserved:
        out.append(f'<p class="note">{escape(sentence(reserved))}</p>')
    for label, code, message in table.warnings:
        out.append(f'<p class="warning">warning ({escape(label)}, <code>{escape(code)}</code>): {escape(message)}</p>')
    for label, line in table.notes:
        out.append(f'<p class="note">note ({escape(label)}, base storage): {escape(line)}</p>')
    out.append("</section>")
    return "\n".join(out)


def _findings(findings: Sequence[Finding]) -> str:
    from peftaudit.recommend.render import tally_line

    out = ['<section id="findings">', "<h2>Readiness</h2>", f"<p>{escape(tally_line(findings))}</p>"]
    out.append('<ul class="findings">')
    for f in findings:
        severity = escape(f.severity.value)
        item = f"<li><strong>{severity}</strong> <code>{escape(f.id)}</code>: {escape(f.title)}"
        if f.modules:
            item += "<br>modules: " + ", ".join(f"<code>{escape(m)}</code>" for m in f.modules)
        item += f"<br>fix: {escape(f.fix)}</li>"
        out.append(item)
    out += ["</ul>", "</section>"]
    return "\n".join(out)


__all__ = ["HtmlRenderer"]
