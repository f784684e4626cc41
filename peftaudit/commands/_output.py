"""Shared output plumbing for commands: format choice, colour, width, atomic files, number flags."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

from peftaudit.errors import PeftauditError


def add_output_arguments(parser: argparse.ArgumentParser, formats: str = "table (default), json, markdown") -> None:
    """``--format``, ``--json``, ``--output`` and ``--width``, the same on every command (``formats``: the
    built-in formats its help names)."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--format",
        "-f",
        default=None,
        metavar="NAME",
        help=f"output format: {formats}, or one a plugin adds",
    )
    group.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")
    group.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help=(
            "write to FILE instead of stdout (a file is replaced atomically: complete or not at all; "
            "symlinks are followed; devices and FIFOs are written through)"
        ),
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


def shows_progress(args: argparse.Namespace) -> bool:
    """A progress bar on stderr only for a person at a terminal: stderr and stdout (unless ``--output``)
    are terminals, and not ``--format json``, ``--no-progress``, ``NO_COLOR`` or ``TERM=dumb``.

    Piped or captured output (scripts, CI, pytest) never carries a bar.
    """
    if getattr(args, "no_progress", False) or getattr(args, "format", None) == "json":
        return False
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return _is_terminal(sys.stderr) and (bool(getattr(args, "output", None)) or _is_terminal(sys.stdout))


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # None, a closed stream, an object without isatty
        return False


def width(args: argparse.Namespace) -> int:
    explicit: int | None = getattr(args, "width", None)
    if explicit:
        return explicit
    if sys.stdout.isatty():
        return max(60, shutil.get_terminal_size((100, 24)).columns)
    return 100


def emit(text: str, args: argparse.Namespace) -> None:
    """Print ``text``, or write it to ``--output`` (:func:`peftaudit.files.write_atomic` says how).

    A stdout that cannot take it (a full disk) is a one-line :class:`PeftauditError`.
    """
    path = getattr(args, "output", None)
    if not path:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # `| head` closed the pipe: the CLI ends quietly
        except OSError as exc:
            raise stdout_failed(exc) from None
        return
    from peftaudit.files import write_atomic

    write_atomic(path, text)


def stdout_failed(exc: OSError) -> PeftauditError:
    """The one-line error for output that cannot be written (``> /dev/full``, a full disk).

    Points standard output at ``/dev/null`` first: what is still buffered
    there would otherwise fail again, with a traceback, when Python exits.
    """
    silence_stdout()
    return PeftauditError(f"cannot write to standard output: {exc.strerror or exc}")


def silence_stdout() -> None:
    """Point standard output at ``/dev/null``, so nothing still buffered can fail at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


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


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused, as strict JSON refuses them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above zero."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number, zero or above."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value
