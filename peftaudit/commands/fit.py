"""``peftaudit fit MODEL --gpu NAME``: the largest micro-batch and the longest sequence that fit."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._model import add_model_arguments
from peftaudit.commands._output import emit, table_or_json, use_color, width
from peftaudit.commands._plan import add_plan_arguments, model_and_plans, stack_words
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "fit",
        help="the largest batch and the longest sequence that fit a GPU",
        description=(
            "Search the memory estimator for the largest micro-batch (at --seq-len) and the longest sequence "
            "(at --batch-size, in steps of 64 tokens) that fit one GPU, with and without gradient checkpointing."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--gpu", required=True, metavar="NAME", help="the GPU (see `peftaudit gpus`)")
    add_plan_arguments(parser, run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.gpus import find_gpu, render
    from peftaudit.gpus.sizing import SEQ_STEP, fit, max_batch_size, max_seq_len

    fmt = table_or_json(args, "fit")
    gpu = find_gpu(args.gpu)
    model, plans = model_and_plans(args, "lora")
    inventory = model.inventory
    results: list[dict[str, Any]] = []
    for base in plans:
        for gc in (False, True):
            plan = base.with_(gradient_checkpointing=gc)
            batch = max_batch_size(inventory, plan, gpu)
            seq = max_seq_len(inventory, plan, gpu)
            results.append(
                {
                    "method": plan.method,
                    "gradient_checkpointing": gc,
                    "max_batch_size": batch,
                    "at_seq_len": plan.seq_len,
                    "max_seq_len": seq,
                    "at_batch_size": plan.batch_size,
                    "seq_step": SEQ_STEP,
                    "at_max_batch": fit(inventory, plan.with_(batch_size=max(batch, 1)), gpu).to_dict(),
                    "at_max_seq": fit(inventory, plan.with_(seq_len=max(seq, SEQ_STEP)), gpu).to_dict(),
                }
            )
    if fmt == "json":
        emit(
            dumps(
                {
                    "model": model.resolved.id,
                    "gpu": gpu.name,
                    "usable_bytes": gpu.usable_bytes,
                    "stack": dict(plans[0].stack),
                    "results": results,
                }
            )
            + "\n",
            args,
        )
        return ExitCode.OK
    out, buffer = render.console(width(args), use_color(args))
    out.print(
        f"{model.resolved.id} on one {gpu.name} ({gpu.usable_gib:.1f} GiB usable){stack_words(plans[0])}", markup=False
    )
    render.fit_table(
        [
            (
                r["method"],
                r["gradient_checkpointing"],
                r["max_batch_size"],
                r["at_seq_len"],
                r["max_seq_len"],
                r["at_batch_size"],
            )
            for r in results
        ],
        out,
    )
    emit(buffer.getvalue(), args)
    return ExitCode.OK
