"""``peftaudit fit MODEL --gpu NAME``: the largest micro-batch and the longest sequence that fit."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._model import add_model_arguments
from peftaudit.commands._output import emit, table_or_json, use_color, width
from peftaudit.commands._plan import add_plan_arguments, model_and_plans
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "fit",
        help="the largest batch and the longest sequence that fit a GPU",
        description=(
            "Search the memory estimator for the largest micro-batch (at --seq-len) and the longest sequence "
            "(at --batch-size, in steps of 64 tokens) that fit one GPU, with and without gradient checkpointing. "
            "For --objective grpo: the most --generations (at --completion-len) and the longest completion (at "
            "--generations, in steps of 64 tokens), both at --batch-size prompts of the same prompt length."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--gpu", required=True, metavar="NAME", help="the GPU (see `peftaudit gpus`)")
    add_plan_arguments(parser, run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.gpus import find_gpu, render
    from peftaudit.gpus.sizing import (
        LargestFit,
        LargestGenerationFit,
        checkpointing_notes,
        checkpointing_skipped,
        largest_for_objective,
        vllm_bytes,
    )

    fmt = table_or_json(args, "fit")
    gpu = find_gpu(args.gpu)
    model, plans = model_and_plans(args, "lora")
    inventory = model.inventory
    # A method or model that refuses gradient checkpointing (prefix tuning, ConvNeXt) is searched without it only.
    # GRPO searches its generations and completion length, the other objectives their batch and length.
    results = [
        largest_for_objective(inventory, base.with_(gradient_checkpointing=gc), gpu)
        for base in plans
        for gc in (False, True)
        if not (gc and checkpointing_skipped(inventory, base))
    ]
    notes = checkpointing_notes(inventory, plans)
    objective = plans[0].objective  # one --objective for every plan
    held = vllm_bytes(plans[0], gpu)  # and one --generation and --vllm-memory
    if fmt == "json":
        data: dict[str, Any] = {"model": model.resolved.id, "gpu": gpu.name, "usable_bytes": gpu.usable_bytes}
        if objective != "sft":
            data["objective"] = objective
        if objective == "grpo":
            data["vllm_bytes"] = held  # out of usable_bytes: each result's usable_bytes is what is left
        data.update(stack=dict(plans[0].stack), results=[r.to_dict() for r in results], notes=notes)
        emit(dumps(data) + "\n", args)
        return ExitCode.OK
    out, buffer = render.console(width(args), use_color(args))
    out.print(f"{model.resolved.id} on one {gpu.name} ({render.usable_words(gpu.usable_bytes, held)})", markup=False)
    if objective == "grpo":
        render.generation_fit_table([r for r in results if isinstance(r, LargestGenerationFit)], out)
    else:
        render.fit_table([r for r in results if isinstance(r, LargestFit)], out)
    for note in notes:
        out.print(note, markup=False)
    emit(buffer.getvalue(), args)
    return ExitCode.OK
