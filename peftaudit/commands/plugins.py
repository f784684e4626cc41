"""``peftaudit plugins``: which plugins are loaded and which hooks each implements."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._output import add_output_arguments, emit, table_or_json
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "plugins",
        help="list loaded plugins and the hooks they implement",
        description=(
            "List the plugins peftaudit loaded (built-ins first, then the 'peftaudit' entry-point "
            "group unless PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD is set) and their hooks."
        ),
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.plugins import describe

    rows = describe()
    fmt = table_or_json(args, "plugins")
    if fmt == "json":
        emit(dumps([{"name": n, "hooks": h} for n, h in rows]) + "\n", args)
    else:
        lines = []
        for name, hooks in rows:
            lines.append(name)
            lines += [f"  {hook}" for hook in hooks]
        emit("\n".join(lines) + "\n", args)
    return ExitCode.OK
