"""``peftaudit report MODEL``: the parameter inventory of a model, without its weights."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._output import add_output_arguments, emit, use_color, warn, width

FAIL_ON_LEVELS = ("info", "warning", "error", "never")


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "report",
        help="count a model's parameters per layer, trainable and frozen, tied and shared",
        description=(
            "Build MODEL on the meta device (no weights are downloaded or allocated) and report "
            "its parameters: totals, per layer, per kind, tied groups, MoE active parameters."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a hub id (meta-llama/Llama-3.1-8B), a bundled catalog name, a directory "
        "with config.json, or a config.json file",
    )
    source = parser.add_argument_group("model source")
    source.add_argument("--online", action="store_true", help="fetch the hub's current config even for catalog models")
    source.add_argument("--revision", metavar="REV", help="hub revision: branch, tag or commit")
    source.add_argument("--token", metavar="TOKEN", help="hub token (default: HF_TOKEN or the saved login)")
    source.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow running the model repository's own Python code (off by default)",
    )
    source.add_argument("--no-cache", action="store_true", help="rebuild the report instead of reusing a cached one")
    shown = parser.add_argument_group("what to show")
    shown.add_argument("--tree", action="store_true", help="also show the module tree with counts")
    shown.add_argument(
        "--fail-on",
        choices=FAIL_ON_LEVELS,
        default="never",
        help="exit 1 when a finding reaches this severity (for CI; default: never)",
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.plugins import renderers
    from peftaudit.render import RenderOptions
    from peftaudit.report import report_for
    from peftaudit.sources.base import SourceOptions, resolve

    fmt = args.format or "table"
    available = renderers()
    renderer = available.get(fmt)
    if renderer is None:
        from peftaudit.errors import PeftauditError

        raise PeftauditError(f"unknown --format '{fmt}'; choose from {', '.join(sorted(available))}")
    options = SourceOptions(
        online=args.online,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        token=args.token,
    )
    resolved, source = resolve(args.model, options)
    for note in resolved.notes:
        warn(note)
    report = report_for(resolved, source, options, use_cache=not args.no_cache)
    text = renderer.render(report, RenderOptions(width=width(args), color=use_color(args), tree=args.tree))
    emit(text, args)
    return 0
