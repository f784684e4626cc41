"""``peftaudit catalog``: the models whose configs ship with peftaudit (work offline)."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._output import add_output_arguments, emit, table_or_json, use_color, width
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "catalog",
        help="list the bundled models (answered offline)",
        description="List the models whose configs are bundled with peftaudit, with their published sizes.",
    )
    parser.add_argument("--family", metavar="NAME", help="only this family (llama, qwen2, gemma2, ...)")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.errors import PeftauditError
    from peftaudit.sources.catalog import entries

    chosen = [e for e in entries() if not args.family or e.family.lower() == args.family.lower()]
    if args.family and not chosen:
        families = sorted({e.family for e in entries()})
        raise PeftauditError(f"no catalog family '{args.family}'; families: {', '.join(families)}")
    fmt = table_or_json(args, "catalog")
    if fmt == "json":
        rows = [
            {
                "id": e.id,
                "family": e.family,
                "description": e.description,
                "model_type": e.config.get("model_type"),
                "published_params": e.published_params,
                "aliases": list(e.aliases),
            }
            for e in chosen
        ]
        emit(dumps(rows) + "\n", args)
        return ExitCode.OK
    emit(_table(chosen, args), args)
    return ExitCode.OK


def _table(chosen: list[Any], args: argparse.Namespace) -> str:
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    from peftaudit.render.numbers import count

    table = Table(title=f"Bundled catalog: {len(chosen)} models", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("Model", overflow="fold")
    table.add_column("Family")
    table.add_column("Published params", justify="right")
    for e in chosen:
        total = e.published_params.get("total")
        shown = count(total) if isinstance(total, int) else str(total or "")
        table.add_row(e.id, e.family, shown)
    buffer = io.StringIO()
    color = use_color(args)
    Console(file=buffer, width=width(args), force_terminal=color, no_color=not color, highlight=False).print(table)
    return buffer.getvalue()
