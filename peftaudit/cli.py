"""The ``peftaudit`` command line: argument parsing and exit codes, no logic.

Each subcommand lives in ``peftaudit.commands.<name>`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. Those modules import
nothing heavy at module level, so ``peftaudit --help`` and ``--version`` never
import torch or transformers.

Exit codes (:class:`peftaudit.exit_codes.ExitCode`): 0 success, 1 findings at
or above ``--fail-on`` or a failed verification, 2 usage or input error (one
line on stderr, never a traceback), 3 an internal error (a bug; one line too,
the traceback with ``PEFTAUDIT_DEBUG=1``), 130 interrupted. Output that cannot be
written (stdout on a full disk or ``/dev/full``) is exit 2 with one line too:
1 would read as "findings". A reader that closes the pipe early (``| head``)
is not an error. Libraries' Python warnings are not shown (our own notes are
``peftaudit: note:`` lines); ``PEFTAUDIT_DEBUG=1`` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from peftaudit._version import __version__
from peftaudit.commands._output import silence_stdout, stdout_failed
from peftaudit.errors import PeftauditError
from peftaudit.exit_codes import ExitCode

#: Subcommand modules under ``peftaudit.commands``, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "report",
    "catalog",
    "recommend",
    "gpus",
    "fit",
    "plan",
    "serve",
    "snapshot",
    "verify",
    "plugins",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"peftaudit: error: {message}\n")
        sys.exit(ExitCode.USAGE)

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse ignores a failed write, so `--help > /dev/full` would print nothing and exit 0: let it raise.
        if message:
            (file or sys.stderr).write(message)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = _Parser(
        prog="peftaudit",
        description=(
            "Audit a transformer model before fine-tuning: exact parameter counts, "
            "per layer, trainable and frozen, tied and shared."
        ),
    )
    parser.add_argument("--version", action="version", version=f"peftaudit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"peftaudit.commands.{name}")
        module.add_parser(sub)
    # Then plugins' commands (peftaudit_register_commands), after the built-ins so none is shadowed.
    from peftaudit.plugins import add_commands

    add_commands(sub)
    return parser


def console_main() -> int:
    """The ``peftaudit`` console script and ``python -m peftaudit``: :func:`main` in a process of its own."""
    from peftaudit.sources.load import one_shot_process

    one_shot_process()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except OSError as exc:  # --help or --version could not be printed
        raise SystemExit(_write_failed(exc)) from None
    except SystemExit as exc:  # --help and --version exit from inside argparse: flush before leaving
        failed = _flush_stdout(quiet=bool(exc.code))
        if failed is not None and not exc.code:
            raise SystemExit(failed) from None
        raise
    # Libraries we import log their own set-up chatter (bitsandbytes' CPU kernels, say) to stderr.
    for name in ("bitsandbytes", "diffusers", "accelerate", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.command is None:
        try:
            parser.print_help()
        except OSError as exc:
            return _write_failed(exc)
        return _flush_stdout() or ExitCode.USAGE
    with warnings.catch_warnings():
        # ... and warn through Python's warnings (torch.load's pickle-protocol UserWarning, say):
        # stderr holds our own lines only, so an error stays one line.
        if not os.environ.get("PEFTAUDIT_DEBUG"):
            warnings.simplefilter("ignore")
        code = _run(args)
    # After an error (its line is out already), a failed flush adds no second line and keeps the code.
    said = code in (ExitCode.USAGE, ExitCode.INTERNAL, ExitCode.INTERRUPTED)
    failed = _flush_stdout(quiet=said)
    return code if failed is None or said else failed


def _run(args: argparse.Namespace) -> int:
    try:
        # Left before any error line below is written: a progress bar is gone by then.
        with _progress(args):
            code: int = args.run(args)
    except PeftauditError as exc:
        sys.stderr.write(f"peftaudit: error: {_one_line(str(exc))}\n")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        sys.stderr.write("peftaudit: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # `peftaudit report ... | head` closed stdout early: not an error.
        silence_stdout()
        return ExitCode.OK
    except Exception as exc:  # a bug in peftaudit or a library: still one line, unless debugging
        if os.environ.get("PEFTAUDIT_DEBUG"):
            raise
        sys.stderr.write(
            f"peftaudit: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(a bug: PEFTAUDIT_DEBUG=1 shows the traceback)\n"
        )
        return ExitCode.INTERNAL
    return code


def _progress(args: argparse.Namespace) -> AbstractContextManager[None]:
    """The progress bar for long work (:mod:`peftaudit.progress`), when :func:`shows_progress` says so."""
    from peftaudit.commands._output import shows_progress
    from peftaudit.progress import reporting

    if not shows_progress(args):
        return reporting(None)
    from peftaudit.render.progress import BarReporter

    return reporting(BarReporter())


def _flush_stdout(*, quiet: bool = False) -> int | None:
    """Flush stdout now, so a failed write is one line and exit 2 here, not a traceback at exit.

    Returns the exit code for a failed write (``None``: written, or the reader left like ``| head``).
    """
    try:
        sys.stdout.flush()
    except OSError as exc:
        code = _write_failed(exc, quiet=quiet)
        return None if code == ExitCode.OK else code
    return None


def _write_failed(exc: OSError, *, quiet: bool = False) -> int:
    """The exit code for output that could not be written: 0 for a closed pipe (``| head``), else 2 and one line."""
    if isinstance(exc, BrokenPipeError):
        silence_stdout()
        return ExitCode.OK
    error = stdout_failed(exc)
    if not quiet:
        sys.stderr.write(f"peftaudit: error: {error}\n")
    return ExitCode.USAGE


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
