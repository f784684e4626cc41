"""``--format html``: one page that is well formed, shows every section with the JSON report's numbers,
escapes what it shows and references nothing outside itself.

The page is read back with the standard library's HTML parser into a small
tree; every figure it shows is compared with the JSON report of the same
model (and the total with the catalog's published count), the chart's
geometry with the bytes it draws.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from peftaudit import __version__
from peftaudit.cli import main
from peftaudit.report import RenderOptions, Report
from peftaudit.report.glance import MemoryGlance
from peftaudit.report.model import LayerRow, TreeNode
from peftaudit.report.render.html import HtmlRenderer
from peftaudit.report.render.svg import Bar, Line, Segment, bar_chart

LLAMA_8B = "meta-llama/Llama-3.1-8B"
LLAMA_1B = "meta-llama/Llama-3.2-1B"
GIB = 2**30
SAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "report-llama-3.1-8b.html"

#: HTML elements that never have content (no end tag).
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
#: Every element the page may hold: anything else (script, img, iframe, link, object, a) fails.
ALLOWED = {
    *("html", "head", "meta", "title", "style", "body", "main", "footer", "section", "h1", "h2", "p", "br"),
    *("div", "table", "thead", "tbody", "tfoot", "tr", "th", "td", "code", "strong", "span", "ul", "li"),
    *("details", "summary", "figure", "figcaption", "svg", "desc", "line", "rect", "text"),
}
#: Attributes that load or run something, or point elsewhere.
REFERENCING = {"src", "srcset", "href", "xlink:href", "action", "formaction", "poster", "background", "data", "ping"}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str, **attrs: str) -> list[Node]:
        """The elements below this one with ``tag`` (and these attribute values), in document order."""
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and all(child.attrs.get(k) == v for k, v in attrs.items()):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def one(self, tag: str, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}>"
        return found[0]


class Page(HTMLParser):
    """The page as a tree, and everything wrong with its nesting."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open: list[Node] = [self.root]
        self.errors: list[str] = []
        self.doctype: str | None = None
        self.feed(text)
        self.close()
        if len(self.open) != 1:
            self.errors.append(f"never closed: {[n.tag for n in self.open[1:]]}")

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not any(n.tag == "svg" for n in self.open) and tag not in VOID:
            self.errors.append(f"<{tag}/> outside SVG (HTML has no self-closing {tag})")
        self.open[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if self.open[-1].tag != tag:
            self.errors.append(f"</{tag}> closes <{self.open[-1].tag}>")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.open[-1].children.append(data)

    def elements(self) -> Iterator[Node]:
        def walk(node: Node) -> Iterator[Node]:
            for child in node.children:
                if isinstance(child, Node):
                    yield child
                    yield from walk(child)

        return walk(self.root)

    def section(self, ident: str) -> Node:
        return self.root.one("section", id=ident)

    def section_ids(self) -> list[str]:
        return [s.attrs["id"] for s in self.root.all("section")]


def table_rows(node: Node) -> tuple[list[str], list[list[str]], list[str]]:
    """A table's header, body rows and footer row, as the cells' text."""
    table = node.one("table")
    header = [th.text() for th in table.one("thead").all("th")]
    body = [[td.text() for td in tr.all("td")] for tr in table.one("tbody").all("tr")]
    feet = table.all("tfoot")
    return header, body, [td.text() for td in feet[0].all("td")] if feet else []


def assert_self_contained(page: Page, text: str) -> None:
    """Well formed, only the allowed elements, and nothing that loads, runs or points anywhere else."""
    assert page.errors == []
    assert page.doctype is not None and page.doctype.lower() == "doctype html"
    assert text.startswith("<!DOCTYPE html>\n")
    tags = {n.tag for n in page.elements()}
    assert tags <= ALLOWED, f"elements outside the allowed set: {tags - ALLOWED}"
    for node in page.elements():
        for name, value in node.attrs.items():
            assert name not in REFERENCING and not name.startswith("on"), f"<{node.tag} {name}=...>"
            for bad in ("http:", "https:", "//", "url(", "javascript:"):
                assert bad not in value.lower(), f"<{node.tag} {name}={value!r}>"
    (style,) = page.root.all("style")
    css = style.text()
    for bad in ("url(", "@import", "http", "//", "@font-face"):
        assert bad not in css, bad
    head = page.root.one("head")
    assert head.one("meta", charset="utf-8")
    assert "width=device-width" in head.one("meta", name="viewport").attrs["content"]


def _cli(argv: list[str], path: Path) -> str:
    assert main([*argv, "--no-cache", "-o", str(path)]) == 0
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The default report of Llama-3.1-8B as the CLI writes it with --format html, and as JSON."""
    folder = tmp_path_factory.mktemp("html")
    page = _cli(["report", LLAMA_8B, "--format", "html"], folder / "report.html")
    data = json.loads(_cli(["report", LLAMA_8B, "--format", "json"], folder / "report.json"))
    return page, data


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """Detailed estimates, findings and the tree: the JSON report read back and rendered as HTML."""
    folder = tmp_path_factory.mktemp("html")
    argv = ["report", LLAMA_1B, "--compare", "full,lora,qlora", "--seq-len", "1024", "--checks", "--format", "json"]
    data = json.loads(_cli(argv, folder / "report.json"))
    return HtmlRenderer().render(Report.from_dict(data), RenderOptions(tree=True)), data


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


def test_the_cli_page_is_the_renderer_of_the_json_report(llama_8b: tuple[str, dict[str, Any]]) -> None:
    text, data = llama_8b
    assert HtmlRenderer().render(Report.from_dict(data), RenderOptions()) == text


def test_the_page_is_well_formed_and_references_nothing_outside(llama_8b: tuple[str, dict[str, Any]]) -> None:
    text, _ = llama_8b
    page = Page(text)
    assert_self_contained(page, text)
    assert page.section_ids() == ["summary", "layers", "kinds", "memory", "recommendation", "serving"]
    for table in page.root.all("table"):  # wide tables scroll in their own box, not the page
        boxes = page.root.all("div", **{"class": "scroll"})
        assert any(any(child is table for child in div.children) for div in boxes)


def test_the_figures_are_the_json_reports(llama_8b: tuple[str, dict[str, Any]]) -> None:
    text, data = llama_8b
    page = Page(text)
    params = data["params"]
    assert page.root.one("h1").text() == f"peftaudit report: {LLAMA_8B}"
    summary = {
        tr.one("th").text(): tr.one("td") for tr in page.section("summary").all("tr")
    }  # "Parameters" -> its cell
    total, published = (str(c) for c in summary["Parameters"].children if isinstance(c, str))
    assert int(total.split(" ")[0].replace(",", "")) == params["total"] == data["model"]["published_params"]["total"]
    assert published == f"published {params['total']:,}: matches"
    assert summary["Architecture"].text() == f"{data['model']['architecture']} ({data['model']['model_type']})"

    header, rows, total_row = table_rows(page.section("layers"))
    weights = header.index("Weights")
    assert sum(int(r[weights].replace(",", "")) for r in rows) == params["weights"] == 8_030_261_248
    assert total_row[weights] == f"{params['weights']:,}"
    assert [r[0] for r in rows] == [layer["name"] for layer in data["layers"]]

    _, kinds, _ = table_rows(page.section("kinds"))
    assert {k: int(n.replace(",", "")) for k, n, _ in kinds} == {k: n for k, n in data["by_kind"].items() if n}

    memory = page.section("memory")
    glance = data["memory_at_a_glance"]
    _, rows, _ = table_rows(memory)
    assert len(rows) == len(glance["rows"]) == 6
    for cells, row in zip(rows, glance["rows"], strict=True):
        assert cells[0].split(" ")[0] == row["method"]
        assert cells[1] == ("on" if row["gradient_checkpointing"] else "off")
        assert cells[2] == _gib(row["total_bytes"])
        assert cells[3].startswith(f"fits {row['fits_class_gb']} GB")
    assert memory.one("p", **{"class": "plan"}).text().startswith("plan: batch 1 x 2,048 tokens")

    recommendation = data["recommendation"]
    section = page.section("recommendation")
    answer = section.one("p", **{"class": "answer"}).text()
    assert answer.startswith("LoRA on all-linear (q_proj")
    assert answer.endswith(f"rank {recommendation['rank']}, alpha {recommendation['alpha']}")
    assert section.one("code").text() == recommendation["command"] == f"peftaudit recommend {LLAMA_8B}"

    # Serving: each cell is the JSON row's GPU count, sequences and KV tokens, rows by precision.
    serving = data["serving_at_a_glance"]
    header, rows, _ = table_rows(page.section("serving"))
    assert header == ["Weights", "24 GB (A10G)", "48 GB (L40S)", "80 GB (H100 SXM)"]
    assert [r[0] for r in rows] == ["bf16 (the checkpoint's dtype)", "AWQ 4-bit, group 128"]
    cells = [cell for r in rows for cell in r[1:]]
    assert len(cells) == len(serving["rows"]) == 6
    for cell, row in zip(cells, serving["rows"], strict=True):
        gpus = "1 GPU" if row["gpus"] == 1 else f"{row['gpus']} GPUs"
        assert cell == f"{gpus}: {row['sequences']:,} sequences ({row['kv_cache_tokens']:,} KV tokens per GPU)"


def test_the_chart_draws_the_glances_peaks_against_the_gpu_classes(llama_8b: tuple[str, dict[str, Any]]) -> None:
    text, data = llama_8b
    glance = data["memory_at_a_glance"]
    svg = Page(text).section("memory").one("svg")
    assert svg.attrs["width"] == "100%" and svg.attrs["viewbox"].startswith("0 0 ")  # the parser lowercases names
    assert svg.attrs["role"] == "img"
    title, desc = svg.one("title"), svg.one("desc")
    assert svg.attrs["aria-labelledby"] == f"{title.attrs['id']} {desc.attrs['id']}"
    for row in glance["rows"]:
        assert f"{_gib(row['total_bytes'])} GiB" in desc.text()
    # One dashed line per class at its usable memory, one bar per row: on one scale from the left edge.
    left = float(svg.all("rect")[0].attrs["x"])
    lines = {t.text(): float(t.attrs["x"]) for t in svg.all("text", **{"class": "mark-label"})}
    assert list(lines) == [f"{c['class_gb']} GB" for c in glance["gpu_classes"]]
    widths = [float(r.attrs["width"]) for r in svg.all("rect")]
    assert len(widths) == len(glance["rows"])
    largest = glance["gpu_classes"][-1]
    scale = (lines[f"{largest['class_gb']} GB"] - left) / largest["usable_bytes"]
    for width, row in zip(widths, glance["rows"], strict=True):
        assert width == pytest.approx(row["total_bytes"] * scale, abs=0.1)
    for gpu_class in glance["gpu_classes"]:
        assert lines[f"{gpu_class['class_gb']} GB"] - left == pytest.approx(gpu_class["usable_bytes"] * scale, abs=0.1)
    figures = [t.text() for t in svg.all("text") if "figure" in t.attrs.get("class", "")]
    assert figures == [f"{_gib(r['total_bytes'])} GiB" for r in glance["rows"]]


def test_estimates_findings_and_the_tree(llama_1b: tuple[str, dict[str, Any]]) -> None:
    text, data = llama_1b
    page = Page(text)
    assert_self_contained(page, text)
    assert page.section_ids() == ["summary", "layers", "kinds", "tree", "estimates", "findings"]

    estimates = page.section("estimates")
    header, rows, _ = table_rows(estimates)
    peak = header.index("peak (GiB)")
    assert [r[peak] for r in rows] == [_gib(e["total_bytes"]) for e in data["estimates"]]
    assert [r[0].split(" ")[0] for r in rows] == ["full", "lora", "qlora"]
    # The chart stacks each estimate's components; no GPU lines (the report has no GPU figures for these plans).
    svg = estimates.one("svg")
    assert svg.all("line") == []
    bars: list[list[Node]] = []
    for node in svg.children:
        if isinstance(node, Node) and "bar-label" in node.attrs.get("class", ""):
            bars.append([])
        elif isinstance(node, Node) and node.tag == "rect":
            bars[-1].append(node)
    totals = [e["total_bytes"] for e in data["estimates"]]
    widths = [sum(float(r.attrs["width"]) for r in rects) for rects in bars]
    for width, total in zip(widths, totals, strict=True):  # each stack on one scale (0.5 units per tiny part)
        assert width / widths[0] == pytest.approx(total / totals[0], abs=0.01)
    legend = [li.one("strong").text() for li in estimates.one("ul").all("li")]
    assert legend == header[1:peak]

    findings = page.section("findings")
    assert [c.text() for c in findings.all("code")] == [f["id"] for f in data["findings"]]

    tree = page.section("tree")
    details = tree.one("details")
    assert "open" in details.attrs

    def count(node: dict[str, Any]) -> int:
        return 1 + sum(count(c) for c in node.get("children", ()))

    items = details.all("li")
    assert len(items) == count(data["tree"])
    assert items[0].text().startswith(f"(root)  {data['model']['architecture']}  {data['params']['total']:,}")


def test_params_only_has_no_memory_and_no_recommendation(llama_8b: tuple[str, dict[str, Any]]) -> None:
    report = dataclasses.replace(Report.from_dict(llama_8b[1]), glance=None)
    text = HtmlRenderer().render(report, RenderOptions())
    page = Page(text)
    assert_self_contained(page, text)
    assert page.section_ids() == ["summary", "layers", "kinds"]
    assert page.root.all("svg") == []


def test_a_model_without_an_estimate_gets_the_reason_and_no_chart(llama_8b: tuple[str, dict[str, Any]]) -> None:
    report = Report.from_dict(llama_8b[1])
    assert report.glance is not None
    memory = report.glance.memory
    unsized = MemoryGlance(plan=memory.plan, gpu_classes=memory.gpu_classes, rows=(), unavailable="no <b>program</b>")
    report = dataclasses.replace(report, glance=dataclasses.replace(report.glance, memory=unsized))
    text = HtmlRenderer().render(report, RenderOptions())
    page = Page(text)
    assert_self_contained(page, text)
    section = page.section("memory")
    assert section.all("svg") == [] and section.all("table") == []
    assert section.one("p").text() == "No estimate: no <b>program</b> (the parameter counts are exact)."


def test_hostile_strings_are_shown_as_text(llama_8b: tuple[str, dict[str, Any]]) -> None:
    report = Report.from_dict(llama_8b[1])
    assert report.glance is not None
    script = "<script>alert(1)</script>"
    image = '"><img src=x onerror=alert(1)>'
    style = "</style><script src=https://example.com/x.js></script>"
    layer = LayerRow(name=image, type=script, weights=1, biases=0, trainable=1)
    tree = TreeNode(name=image, type=style, params=1, children=(TreeNode(name="x", type=script, params=1),))
    rec = dataclasses.replace(report.glance.recommendation, command=f"peftaudit recommend '{script}'")
    report = dataclasses.replace(
        report,
        model=dataclasses.replace(report.model, id=script, architecture=style),
        layers=(*report.layers, layer),
        by_kind={**report.by_kind, style: 1},
        tree=tree,
        glance=dataclasses.replace(report.glance, recommendation=rec),
    )
    text = HtmlRenderer().render(report, RenderOptions(tree=True))
    page = Page(text)
    assert_self_contained(page, text)  # no <script> or <img> element, no onerror attribute, no URL anywhere
    assert page.root.one("head").one("title").text() == f"peftaudit report: {script}"
    assert page.root.one("h1").text() == f"peftaudit report: {script}"
    _, rows, _ = table_rows(page.section("layers"))
    assert rows[-1][:2] == [image, script]
    assert [r for r in table_rows(page.section("kinds"))[1] if r[0] == style]
    assert page.section("tree").all("li")[0].text().startswith(image)
    assert page.section("recommendation").one("code").text() == rec.command


def test_bars_far_beyond_the_lines_are_broken_and_crowded_labels_take_two_rows() -> None:
    lines = [Line(22 * GIB, "24 GB"), Line(45 * GIB, "48 GB"), Line(80 * GIB, "80 GB")]
    bars = [
        Bar("full", (Segment(500 * GIB, "m-full"),), "500.00 GiB"),
        Bar("lora", (Segment(40 * GIB, "m-lora"),), "40.00 GiB"),
    ]
    page = Page(bar_chart(bars, lines, title="t", desc="d", ident="c"))
    assert page.errors == []
    full, lora = (float(r.attrs["width"]) for r in page.root.all("rect"))
    # The axis stops at twice the largest line: the 500 GiB bar is drawn to 160 GiB, and broken.
    assert full / lora == pytest.approx(160 / 40, abs=0.01)
    assert len(page.root.all("line", **{"class": "break"})) == 2
    (inside,) = [t for t in page.root.all("text") if t.attrs.get("class") == "figure inside"]
    assert inside.text() == "500.00 GiB"
    # 24 and 48 GB are too close for their labels on one row at this scale: the second goes below.
    labels = page.root.all("text", **{"class": "mark-label"})
    assert [t.attrs["y"] for t in labels] == ["11", "24", "11"]
    lines_x = [float(t.attrs["x"]) for t in labels]
    assert lines_x[1] - lines_x[0] < 0.6 * 11 * 5 + 3 < lines_x[2] - lines_x[0]  # "24 GB": 5 characters, 3 apart


def test_the_docs_sample_is_current(llama_8b: tuple[str, dict[str, Any]]) -> None:
    """docs/examples/ shows this page; rewrite it with
    ``peftaudit report meta-llama/Llama-3.1-8B --no-cache --format html -o docs/examples/report-llama-3.1-8b.html``."""
    version = re.compile(re.escape(f"peftaudit {__version__}"))
    expected = version.sub("peftaudit <version>", llama_8b[0])
    committed = re.sub(r"peftaudit \d[\w.+-]*", "peftaudit <version>", SAMPLE.read_text(encoding="utf-8"))
    assert committed == expected, f"{SAMPLE} is stale"
