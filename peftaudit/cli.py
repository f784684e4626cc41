"""The ``peftaudit`` command line: argument parsing and exit codes, no logic.

Each subcommand lives in ``peftaudit.commands.<name>`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. Those modules import
nothing heavy at module level, so ``peftaudit --help`` and ``--version`` never
import torch or transformers.

Exit codes: 0 success, 1 findings at or above ``--fail-on``, 2 usage or input
error (one line on stderr, never a traceback), 3 an internal error (a bug; one
line too, the traceback with ``PEFTAUDIT_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from peftaudit._version import __version__
from peftaudit.errors import PeftauditError

#: Subcommand modules under ``peftaudit.commands``, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "report",
    "catalog",
    "recommend",
    "gpus",
    "fit",
    "plan",
    "snapshot",
    "verify",
    "plugins",
)

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"peftaudit: error: {message}\n")
        sys.exit(EXIT_USAGE)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries we import log their own set-up chatter (bitsandbytes' CPU kernels, say) to stderr.
    for name in ("bitsandbytes", "diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.run(args)
    except PeftauditError as exc:
        sys.stderr.write(f"peftaudit: error: {_one_line(str(exc))}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("peftaudit: interrupted\n")
        return 130
    except BrokenPipeError:
        # `peftaudit report ... | head` closed stdout early: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a bug in peftaudit or a library: still one line, unless debugging
        if os.environ.get("PEFTAUDIT_DEBUG"):
            raise
        sys.stderr.write(
            f"peftaudit: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(a bug: PEFTAUDIT_DEBUG=1 shows the traceback)\n"
        )
        return EXIT_INTERNAL
    return code


def _one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
