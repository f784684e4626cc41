"""Text, Markdown and JSON for recommendations and findings. Reads finished objects; computes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from peftaudit.recommend.findings import Finding, counts
from peftaudit.recommend.recommendation import Recommendation
from peftaudit.recommend.references import REFERENCES
from peftaudit.render.json import dumps
from peftaudit.render.numbers import count, gib, percent, short
from peftaudit.render.plan import plan_line

FORMATS: tuple[str, ...] = ("table", "markdown", "json")


def render_recommendation(rec: Recommendation, fmt: str = "table") -> str:
    """The recommendation in ``fmt`` (``table``, ``markdown`` or ``json``)."""
    if fmt == "json":
        return dumps(rec.to_dict()) + "\n"
    md = fmt == "markdown"
    out: list[str] = []
    recipe, hyper = rec.recipe, rec.recipe.hyper
    req = rec.request
    title = f"{rec.model_id} ({rec.architecture}, {short(rec.total_params)} parameters)"
    out.append(f"# LoRA recommendation: {title}" if md else f"LoRA recommendation for {title}")
    asked = [f"task {req.task}"]
    if req.tokens:
        asked.append(f"{short(req.tokens)} training tokens")
    if req.budget_bytes:
        asked.append(f"budget {req.gpu + ' ' if req.gpu else ''}{gib(req.budget_bytes)}")
    out.append(", ".join(asked))
    if rec.plan is not None:  # what the memory figures below assume (stack, allocator settings included)
        out += ["", plan_line(rec.plan).text] if md else [plan_line(rec.plan).text]
    out.append("")

    t = recipe.targets
    names = t.pattern if t.pattern is not None else ", ".join(t.names)
    rows = [
        ("method", "QLoRA (4-bit nf4 base)" if recipe.quantization else "LoRA"),
        ("targets", f"{rec.preset}: {names or '(none by name)'}"),
    ]
    if t.parameters:
        rows.append(("target_parameters", ", ".join(t.parameters)))
    if t.modules_to_save:
        rows.append(("modules_to_save", ", ".join(t.modules_to_save)))
    rows += [
        (
            "rank / alpha",
            f"{hyper.rank} / {hyper.alpha} (scale {hyper.scale:.3g}, rsLoRA {'on' if hyper.use_rslora else 'off'})",
        ),
    ]
    if hyper.rank_pattern:
        rows.append(("rank_pattern", ", ".join(f"{k}: {v}" for k, v in hyper.rank_pattern)))
    if hyper.alpha_pattern:
        rows.append(("alpha_pattern", ", ".join(f"{k}: {v}" for k, v in hyper.alpha_pattern)))
    rows.append(("dropout", f"{hyper.dropout:g}"))
    if t.fan_in_fan_out:
        rows.append(("fan_in_fan_out", "True (Conv1D targets)"))
    rows.append(("trainable", f"{count(rec.trainable)} ({percent(rec.trainable, rec.total_params)} of the model)"))
    memory = f"adapter state {gib(rec.trainable * 16)}"
    if rec.peak_bytes is not None:
        memory = f"peak {gib(rec.peak_bytes)} per GPU; " + memory
    rows.append(("memory", memory))
    out += _pairs(rows, md)

    out += _section("Why", md)
    used: list[str] = []
    for reason in rec.reasons:
        cites = ", ".join(reason.sources)
        used += [s for s in reason.sources if s not in used]
        out.append(f"- {reason.text}" + (f" [{cites}]" if cites else "") + (f" ({reason.rule})" if not md else ""))
    for note in rec.notes:
        out.append(f"- note: {note}")

    out += _section(f"Presets at rank {hyper.rank}", md)
    header: tuple[str, ...] = ("preset", "modules", "LoRA params", "adapter state", "peak", "")
    body: list[tuple[str, ...]] = []
    for p in rec.presets:
        if p.error:
            body.append((p.preset, "-", "-", "-", "-", "does not apply here"))
            continue
        mark = "<- recommended" if p.preset == rec.preset else ""
        targets = p.adapted_modules + p.adapted_parameters
        peak = gib(p.peak_bytes) if p.peak_bytes is not None else "-"
        body.append((p.preset, str(targets), count(p.lora_params), gib(p.state_bytes), peak, mark))
    out += _table(header, body, md)

    out += _section("Rank, one step down and up", md)
    header = ("rank", "alpha", "rsLoRA", "LoRA params", "change", "peak", "")
    chosen = next((r for r in rec.ranks if r.chosen), None)
    body = []  # a new table
    for r in rec.ranks:
        delta = r.lora_params - chosen.lora_params if chosen else 0
        change = "-" if r.chosen else f"{'+' if delta >= 0 else ''}{count(delta)}"
        peak = gib(r.peak_bytes) if r.peak_bytes is not None else "-"
        body.append(
            (
                str(r.rank),
                str(r.alpha),
                "on" if r.use_rslora else "off",
                count(r.lora_params),
                change,
                peak,
                "<-" if r.chosen else "",
            )
        )
    out += _table(header, body, md)

    out += _section("Readiness", md)
    out += render_findings_lines(rec.findings, md)

    if used:
        out += _section("Sources", md)
        for key in used:
            ref = REFERENCES.get(key)
            if ref is not None:
                out.append(f"- [{key}] {ref.title}: {ref.url}")
    return "\n".join(out) + "\n"


def render_findings(findings: Sequence[Finding], fmt: str = "table", *, model_id: str | None = None) -> str:
    """Findings alone (``peftaudit report --checks``) in ``fmt``."""
    if fmt == "json":
        data = {"model": model_id, "counts": counts(findings), "findings": [f.to_dict() for f in findings]}
        return dumps(data) + "\n"
    md = fmt == "markdown"
    out = [
        f"## Readiness{': ' + model_id if model_id else ''}"
        if md
        else f"Readiness{' of ' + model_id if model_id else ''}"
    ]
    out += render_findings_lines(findings, md)
    return "\n".join(out) + "\n"


def render_findings_lines(findings: Sequence[Finding], md: bool = False) -> list[str]:
    if not findings:
        return ["no findings"]
    out = [tally_line(findings)]
    for f in findings:
        if md:
            out.append(f"- **{f.severity}** `{f.id}`: {f.title}")
            if f.modules:
                out.append(f"  - modules: {', '.join(f'`{m}`' for m in f.modules)}")
            out.append(f"  - fix: {f.fix}")
        else:
            out.append(f"{f.severity.upper():8s}{f.id}: {f.title}")
            if f.modules:
                out.append(f"{'':8s}modules: {', '.join(f.modules)}")
            out.append(f"{'':8s}fix: {f.fix}")
    return out


def tally_line(findings: Sequence[Finding]) -> str:
    """How many findings of each severity, most severe first: ``1 error, 2 warnings``."""
    tally = counts(findings)
    return ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in reversed(tally.items()) if n)


def _section(title: str, md: bool) -> list[str]:
    return ["", f"## {title}" if md else title]


def _pairs(rows: list[tuple[str, str]], md: bool) -> list[str]:
    if md:
        return ["| | |", "|---|---|", *(f"| {k} | {_md_cell(v)} |" for k, v in rows)]
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def _table(header: Sequence[str], body: Sequence[Sequence[str]], md: bool) -> list[str]:
    if md:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 or i == len(header) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    return ["  " + fmt.format(*header).rstrip(), *("  " + fmt.format(*row).rstrip() for row in body)]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")
