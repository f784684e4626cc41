"""``peftaudit verify BEFORE [AFTER]``: prove that only the intended tensors changed."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from peftaudit.commands._output import _positive_int, add_output_arguments
from peftaudit.exit_codes import ExitCode

#: Below this many bytes the progress bar would only flicker.
PROGRESS_MIN_BYTES = 256 << 20


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "verify",
        help="prove that only the intended tensors changed between two checkpoints or snapshots",
        description=(
            "Compare BEFORE and AFTER tensor by tensor (bitwise, via xxh3 fingerprints) and report "
            "unexpected changes with their size and likely cause, intended tensors that did not "
            "change, and added, removed, reshaped, retyped or non-finite tensors. With --adapter and "
            "AFTER: AFTER is BEFORE with the adapter merged in; only its targets may change, each by "
            "a delta of rank <= r. With --adapter alone: audit the saved adapter against BEFORE. "
            "Exit 0 when it passes, 1 when it fails, 2 on bad input."
        ),
    )
    parser.add_argument("before", metavar="BEFORE", help="checkpoint (directory, .safetensors, index) or snapshot JSON")
    parser.add_argument("after", metavar="AFTER", nargs="?", help="checkpoint or snapshot JSON to compare with BEFORE")
    rules = parser.add_argument_group("expectations")
    rules.add_argument("--adapter", metavar="DIR", help="a saved peft adapter (adapter_model.safetensors + config)")
    rules.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="PATTERN",
        help="tensors that must change: a glob over dotted name parts (lora_*) or re:REGEX; repeatable",
    )
    rules.add_argument(
        "--allow", action="append", default=[], metavar="PATTERN", help="tensors that may change; repeatable"
    )
    rules.add_argument(
        "--tolerate",
        action="append",
        default=[],
        metavar="CAUSE",
        help="report findings with this cause as warnings, not failures (e.g. merge-rounding); repeatable",
    )
    reading = parser.add_argument_group("reading")
    reading.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights with torch.load(weights_only=True) (refused by default)",
    )
    reading.add_argument(
        "--rank-budget",
        type=_positive_int,
        default=1 << 22,
        metavar="ELEMENTS",
        help="elements read per matrix for the merged low-rank check (default 4194304)",
    )
    reading.add_argument("--workers", type=_positive_int, metavar="N", help="hashing threads (default: cores, max 8)")
    reading.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every finding")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def _weight_bytes(path: str, allow_pickle: bool) -> int:
    from peftaudit.verification.checkpoint import locate
    from peftaudit.verification.errors import CheckpointError
    from peftaudit.verification.snapshots import is_snapshot_file

    if is_snapshot_file(path):
        return 0
    try:
        return sum(os.path.getsize(f) for f in locate(path, allow_pickle=allow_pickle).files)
    except (CheckpointError, OSError):
        return 0  # the real read reports the problem


@contextmanager
def progress_for(paths: Sequence[str | None], args: argparse.Namespace) -> Iterator[Callable[[int], None] | None]:
    """``progress(nbytes)`` for hashing: the progress bar for large checkpoints, when the command
    line shows one (:func:`peftaudit.commands._output.shows_progress`), else ``None``."""
    from peftaudit import progress

    if not progress.active():
        yield None
        return
    total = sum(_weight_bytes(p, args.allow_pickle) for p in paths if p)
    if total < PROGRESS_MIN_BYTES:
        yield None
        return
    with progress.task("hashing", unit="bytes") as bar:
        yield progress.advancing(bar, total)


def run(args: argparse.Namespace) -> int:
    from peftaudit.commands._output import emit, table_or_json, use_color, width
    from peftaudit.errors import PeftauditError
    from peftaudit.verification.api import verify
    from peftaudit.verification.render import render_text, to_json

    fmt = table_or_json(args, "verify")
    if args.after is None and args.adapter is None:
        raise PeftauditError("give AFTER (a checkpoint or snapshot), --adapter, or both")
    with progress_for([args.before, args.after, args.adapter], args) as progress:
        verdict = verify(
            args.before,
            args.after,
            adapter=args.adapter,
            expect=args.expect,
            allow=args.allow,
            tolerate=args.tolerate,
            rank_budget=args.rank_budget,
            allow_pickle=args.allow_pickle,
            workers=args.workers,
            progress=progress,
        )
    if fmt == "json":
        emit(to_json(verdict) + "\n", args)
    else:
        import io

        buffer = io.StringIO()  # then emit(): one place handles --output, a closed pipe and a full stdout
        render_text(verdict, file=buffer, verbose=args.verbose, color=use_color(args), width=width(args))
        emit(buffer.getvalue(), args)
    return ExitCode.OK if verdict.ok else ExitCode.FINDINGS
