"""Showing a verdict: a rich table for people, JSON for machines. Nothing here computes."""

from __future__ import annotations

import sys
from typing import TextIO

from peftaudit.render.json import dumps
from peftaudit.severity import Severity
from peftaudit.verification.causes import Cause
from peftaudit.verification.verdict import Finding, Verdict, format_size

_MARK = {Severity.ERROR: "FAIL", Severity.WARNING: "warn", Severity.INFO: "note"}
_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
#: Findings shown without --verbose.
DEFAULT_ROWS = 40


def to_json(verdict: Verdict) -> str:
    """The verdict as indented JSON (``Verdict.to_dict``)."""
    return dumps(verdict.to_dict())


def render_text(
    verdict: Verdict,
    *,
    file: TextIO | None = None,
    verbose: bool = False,
    color: bool = False,
    width: int | None = None,
) -> None:
    """Print the summary, a table of findings and a legend of the causes named."""
    from rich.console import Console
    from rich.table import Table

    console = Console(
        file=file or sys.stdout,
        highlight=False,
        soft_wrap=False,
        color_system="auto" if color else None,
        force_terminal=color or None,
        width=width,
    )
    style = "bold green" if verdict.ok else "bold red"
    console.print(f"[{style}]{verdict.summary()}[/]")
    console.print(f"before: {verdict.before}\nafter:  {verdict.after}", markup=False)
    if verdict.expectations:
        console.print(f"expectations from: {', '.join(verdict.expectations)}", markup=False)
    if not verdict.findings:
        return
    ordered = sorted(verdict.findings, key=lambda f: -f.severity.rank)  # failures first
    shown = ordered if verbose else ordered[:DEFAULT_ROWS]
    table = Table(show_header=True, header_style="bold", expand=True)
    table.add_column("", no_wrap=True)
    table.add_column("problem", no_wrap=True)
    table.add_column("tensor", overflow="fold", ratio=3)
    table.add_column("detail", overflow="fold", ratio=3)
    table.add_column("likely cause", no_wrap=True)
    for finding in shown:
        table.add_row(
            f"[{_STYLE[finding.severity]}]{_MARK[finding.severity]}[/]",
            finding.problem.value,
            finding.name,
            _detail(finding),
            finding.cause.value if finding.cause else "",
        )
    console.print(table)
    if len(ordered) > len(shown):
        console.print(f"... and {len(ordered) - len(shown)} more findings (use -v to list all)")
    named = sorted({f.cause for f in verdict.findings if f.cause is not None}, key=lambda c: list(Cause).index(c))
    for cause in named:
        console.print(f"  {cause.value}: {cause.explanation}", markup=False)


def _detail(finding: Finding) -> str:
    text = finding.message
    if finding.size is not None:
        text += f"\n{format_size(finding.size)}"
    return text
