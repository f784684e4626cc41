"""``peftaudit serve MODEL``: what serving the model (and its adapters) takes, per GPU and for a GPU count."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from peftaudit.commands._model import add_model_arguments, load_model
from peftaudit.commands._output import add_output_arguments, emit, use_color, width
from peftaudit.commands._serving import add_serving_arguments, serving_plan
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.gpus.catalog import GPU
    from peftaudit.serving.plan import ServingPlan


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "serve",
        help="what serving the model and its adapters takes: weights, KV cache, concurrency, GPUs",
        description=(
            "Size serving MODEL: its weights at the serving precision, the KV cache per token and per sequence, "
            "and what a GPU holds as vLLM accounts for it at start-up (the GPU's share, the weights, the profile "
            "run's activation peak, non-torch memory, CUDA graphs; then KV blocks, tokens and concurrency). "
            "With --gpu: that GPU, with the fewest of 1, 2, 4, 8 in tensor parallel that fit (or "
            "--tensor-parallel-size); without: every GPU ranked. Flags take vLLM's names."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--gpu", metavar="NAME", help="the GPU (see `peftaudit gpus`); default: rank them all")
    add_serving_arguments(parser, adapters=True)
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.gpus import find_gpu, gpus

    plan = serving_plan(args)  # bad flags: refused before loading
    chosen = [find_gpu(args.gpu)] if args.gpu else list(gpus())
    return show(args, plan, chosen, one=bool(args.gpu))


def show(args: argparse.Namespace, plan: ServingPlan, chosen: list[GPU], *, one: bool) -> int:
    """Load MODEL and print ``plan`` on each GPU of ``chosen``: the whole answer for ``one``, else the ranking.

    ``gpus MODEL --serve`` shows its ranking through here too."""
    from peftaudit.errors import PeftauditError
    from peftaudit.gpus import render
    from peftaudit.serving import render as serving_render
    from peftaudit.serving.estimate import rank_gpus

    fmt = args.format or "table"
    if fmt not in ("table", "json", "markdown"):
        raise PeftauditError(f"{args.command} supports --format table, json or markdown, not '{fmt}'")
    model = load_model(args)
    name = model.resolved.id
    rows = rank_gpus(model.inventory, plan, [(g.name, g.usable_bytes) for g in chosen], model=name)
    if fmt == "json":
        data: dict[str, Any] = {"model": name, "plan": plan.to_dict()}
        if one:
            data["estimate"] = rows[0].to_dict()
        else:
            data["gpus"] = [r.to_dict() for r in rows]
        emit(dumps(data) + "\n", args)
        return ExitCode.OK
    if fmt == "markdown":
        emit(serving_render.markdown(rows[0]) if one else serving_render.ranking_markdown(rows), args)
        return ExitCode.OK
    out, buffer = render.console(width(args), use_color(args))
    if one:
        serving_render.estimate_view(rows[0], out)
    else:
        serving_render.ranking_table(rows, out)
    emit(buffer.getvalue(), args)
    return ExitCode.OK
