"""``peftaudit plan MODEL --tokens N --gpu NAME``: the setup, time and cost of a training run."""

from __future__ import annotations

import argparse
import math
from typing import Any

from peftaudit.commands._model import add_model_arguments
from peftaudit.commands._output import emit, non_negative_float, positive_float, table_or_json, use_color, width
from peftaudit.commands._plan import add_plan_arguments, model_and_plans
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "plan",
        help="how many GPUs a run needs, how long it takes and what it costs",
        description=(
            "Find the smallest setup of --gpu that fits the training plan (or check --gpus N), then estimate "
            "the run's time from its FLOPs at the stated model-FLOPs utilisation, and its cost at --price."
        ),
    )
    add_model_arguments(parser)
    run_group = parser.add_argument_group("the run")
    run_group.add_argument("--gpu", required=True, metavar="NAME", help="the GPU (see `peftaudit gpus`)")
    run_group.add_argument("--tokens", required=True, metavar="N", help="training tokens, e.g. 500M or 2B")
    run_group.add_argument(
        "--price", type=non_negative_float, metavar="PER_HOUR", help="price per GPU-hour (default: GPU file)"
    )
    run_group.add_argument(
        "--mfu", type=positive_float, default=0.4, help="model-FLOPs utilisation, at most 1 (default %(default)s)"
    )
    add_plan_arguments(parser, run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.errors import PeftauditError
    from peftaudit.gpus import find_gpu, render
    from peftaudit.gpus.sizing import checkpointing_skipped, fit, run_cost, smallest_setup
    from peftaudit.memory.objectives import objective_step
    from peftaudit.units import parse_tokens

    fmt = table_or_json(args, "plan")
    tokens = parse_tokens(args.tokens)
    gpu = find_gpu(args.gpu)
    model, plans = model_and_plans(args, "lora")
    inventory = model.inventory
    rows: list[dict[str, Any]] = []
    lines: list[list[str]] = []
    for plan in plans:
        chosen = fit(inventory, plan, gpu) if plan.gpus > 1 else smallest_setup(inventory, plan, gpu)
        if not chosen.fits:
            skipped = None if plan.gradient_checkpointing else checkpointing_skipped(inventory, plan)
            raise PeftauditError(
                f"{plan.method} on {gpu.name}: no setup up to {chosen.gpus} GPUs fits "
                f"({chosen.peak_bytes / 2**30:.1f} GiB per GPU needed)"
                + (f"; gradient checkpointing not tried ({skipped})" if skipped else "")
            )
        sized = chosen.applied_to(plan)  # the plan the setup runs: its FLOPs include any recompute
        cost = run_cost(inventory, sized, gpu, tokens=tokens, mfu=args.mfu, price_per_gpu_hour=args.price)
        # The sequences one micro-batch trains: a pair objective's batch counts pairs, GRPO's prompts (x G).
        sequences = objective_step(sized).rows
        tokens_per_step = sequences * sized.seq_len * sized.gpus * sized.gradient_accumulation
        steps = math.ceil(tokens / tokens_per_step)
        step_seconds = cost.seconds / steps
        rows.append(
            {
                "method": plan.method,
                "setup": chosen.to_dict(),
                "run": cost.to_dict(),
                "steps": steps,
                "tokens_per_step": tokens_per_step,
                "seconds_per_step": step_seconds,
            }
        )
        lines.append(render.cost_lines(chosen, cost, steps, step_seconds))
    if fmt == "json":
        data = {"model": model.resolved.id, "gpu": gpu.name, "tokens": tokens, "stack": dict(plans[0].stack)}
        emit(dumps({**data, "plans": rows}) + "\n", args)
        return ExitCode.OK
    out, buffer = render.console(width(args), use_color(args))
    out.print(f"{model.resolved.id}: {tokens:,} tokens on {gpu.name}", markup=False)
    plan_line = render.plan_lines(plans, out)
    for plan, rest, answer in zip(plans, plan_line.rest, lines, strict=True):
        out.print(f"{plan.method} ({rest}):" if rest else f"{plan.method}:", markup=False)
        for line in answer:
            out.print(f"  {line}", markup=False)
    emit(buffer.getvalue(), args)
    return ExitCode.OK
