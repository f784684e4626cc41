"""Shared output plumbing for commands: format choice, colour, width, atomic files."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from peftaudit.errors import PeftauditError


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--json``, ``--output`` and ``--width``, the same on every command."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--format",
        "-f",
        default=None,
        metavar="NAME",
        help="output format: table (default), json, markdown, or one a plugin adds",
    )
    group.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")
    group.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write to FILE (atomically: complete or not at all) instead of stdout",
    )
    group.add_argument("--width", type=_positive_int, metavar="COLUMNS", help="terminal width for tables")


def table_or_json(args: argparse.Namespace, command: str) -> str:
    """The ``--format`` of a command that prints only a table or JSON (``table`` by default)."""
    fmt: str = args.format or "table"
    if fmt not in ("table", "json"):
        raise PeftauditError(f"{command} supports --format table or json, not '{fmt}'")
    return fmt


def use_color(args: argparse.Namespace) -> bool:
    """Colour only for a terminal on stdout, never with NO_COLOR or --output."""
    if os.environ.get("NO_COLOR") or getattr(args, "output", None):
        return False
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def width(args: argparse.Namespace) -> int:
    explicit: int | None = getattr(args, "width", None)
    if explicit:
        return explicit
    if sys.stdout.isatty():
        return max(60, shutil.get_terminal_size((100, 24)).columns)
    return 100


def emit(text: str, args: argparse.Namespace) -> None:
    """Print ``text`` or write it to ``--output`` atomically."""
    path = getattr(args, "output", None)
    if not path:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from peftaudit.files import write_atomic

    write_atomic(path, text)


def warn(message: str) -> None:
    """A warning on stderr, so stdout stays parseable."""
    sys.stderr.write(f"peftaudit: note: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
