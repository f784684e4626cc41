"""``peftaudit snapshot CHECKPOINT -o FILE``: per-tensor fingerprints to compare later."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from peftaudit.commands._output import _positive_int
from peftaudit.exit_codes import ExitCode


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "snapshot",
        help="fingerprint every tensor of a checkpoint into a small JSON file",
        description=(
            "Hash every tensor of a checkpoint (xxh3 over its raw bytes) and keep a small sample of "
            "its values, so `peftaudit verify SNAPSHOT AFTER` can later prove what changed, from "
            "another process or machine. The checkpoint is only read."
        ),
    )
    parser.add_argument(
        "source",
        metavar="CHECKPOINT",
        help="a checkpoint directory, a .safetensors file, or a sharded model.safetensors.index.json",
    )
    parser.add_argument(
        "--output", "-o", metavar="FILE", help="write the snapshot to FILE (atomically) instead of stdout"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="let -o replace an existing file that is not a snapshot (refused by default: it may be a checkpoint)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights with torch.load(weights_only=True) (refused by default)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=512,
        metavar="N",
        help="values kept per large tensor to size later changes (0: digests only; default 512)",
    )
    parser.add_argument("--workers", type=_positive_int, metavar="N", help="hashing threads (default: cores, max 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.commands._output import emit
    from peftaudit.commands.verify import progress_for
    from peftaudit.errors import PeftauditError
    from peftaudit.verification.api import snapshot
    from peftaudit.verification.fingerprint import SamplePolicy
    from peftaudit.verification.snapshots import check_snapshot_target

    if args.sample < 0:
        raise PeftauditError("--sample must be 0 or more")
    if args.output:  # before hashing: a refusal should not cost a pass over the checkpoint
        check_snapshot_target(args.output, source=args.source, force=args.force)
    start = time.perf_counter()
    policy = SamplePolicy(points=args.sample, whole_below=4096 if args.sample else 0)
    with progress_for([args.source], args) as progress:
        snap = snapshot(
            args.source, policy=policy, allow_pickle=args.allow_pickle, workers=args.workers, progress=progress
        )
    seconds = time.perf_counter() - start
    if args.output:
        snap.save(args.output, force=args.force)
    else:
        from peftaudit.render.json import dumps

        emit(dumps(snap.to_dict(), compact=True) + "\n", args)
    gigabytes = snap.nbytes / 1e9
    where = f" -> {args.output}" if args.output else ""
    sys.stderr.write(f"peftaudit: {len(snap)} tensors, {gigabytes:.2f} GB fingerprinted in {seconds:.2f} s{where}\n")
    return ExitCode.OK
