"""``peftaudit gpus [MODEL]``: the GPU catalog, or which GPUs fit a model's training plan and how many."""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._model import add_model_arguments
from peftaudit.commands._output import emit, table_or_json, use_color, width
from peftaudit.commands._plan import add_plan_arguments, model_and_plans
from peftaudit.commands._serving import add_serving_arguments, serving_flags_given, serving_plan
from peftaudit.exit_codes import ExitCode
from peftaudit.render.json import dumps

#: Sequence lengths for the chart, cut at the model's context.
CHART_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_COMPARE = "full,lora,qlora"


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "gpus",
        help="which GPUs fit a training plan, how many, with what headroom (no MODEL: list the GPUs)",
        description=(
            "Without MODEL, list the GPU catalog. With MODEL, find for each GPU and method the smallest "
            "setup that fits (one GPU, else 2, 4, 8, ... with DDP, ZeRO-2, ZeRO-3 and offload), and chart "
            "peak memory against sequence length (for --objective grpo: against completion length, the "
            "prompt's length kept). Methods default to --compare full,lora,qlora."
        ),
    )
    add_model_arguments(parser, required=False)
    sizing = parser.add_argument_group("sizing")
    sizing.add_argument("--gpu", action="append", metavar="NAME", help="only these GPUs (repeatable)")
    sizing.add_argument("--max-gpus", type=int, default=128, metavar="N", help="largest GPU count to try (%(default)s)")
    sizing.add_argument("--plot", metavar="FILE", help="also write memory against sequence length to FILE (.svg/.png)")
    sizing.add_argument(
        "--serve",
        action="store_true",
        help="rank the GPUs for serving MODEL instead of training it (the serving flags below; see `peftaudit serve`)",
    )
    add_serving_arguments(parser, adapters=False)
    add_plan_arguments(parser, run)


def selected_gpus(names: list[str] | None) -> list[Any]:
    from peftaudit.gpus import find_gpu, gpus

    return [find_gpu(n) for n in names] if names else list(gpus())


def run(args: argparse.Namespace) -> int:
    from peftaudit.errors import PeftauditError
    from peftaudit.gpus import render

    given = serving_flags_given(args)
    if args.serve:
        return _serve(args)
    if given:
        raise PeftauditError(f"{', '.join(given)}: serving flags; add --serve to rank GPUs for serving")
    fmt = table_or_json(args, "gpus")
    gpus = selected_gpus(args.gpu)
    if args.model is None:
        if fmt == "json":
            emit(dumps([g.to_dict() for g in gpus]) + "\n", args)
        else:
            out, buffer = render.console(width(args), use_color(args))
            render.catalog_table(gpus, out)
            emit(buffer.getvalue(), args)
        return ExitCode.OK
    if args.max_gpus < 1:
        raise PeftauditError(f"--max-gpus must be at least 1, got {args.max_gpus}")
    from peftaudit.gpus.sizing import checkpointing_notes, sweep
    from peftaudit.progress import task

    model, plans = model_and_plans(args, DEFAULT_COMPARE)
    inventory = model.inventory
    with task(f"sizing {', '.join(p.method for p in plans)} on {len(gpus)} GPUs") as progress:
        rows = sweep(inventory, plans, gpus, max_gpus=args.max_gpus, progress=progress)
    notes = checkpointing_notes(inventory, [p for p in plans if not p.gradient_checkpointing])
    # GRPO's chart varies the completion after a prompt of fixed length (its seq-len is prompt + completion).
    grpo = plans[0].objective == "grpo"  # one --objective for every plan
    prompt = plans[0].seq_len - plans[0].completion_len if grpo else 0
    context = inventory.dims.max_position_embeddings or CHART_SEQ_LENS[-1]
    seqs = [s for s in CHART_SEQ_LENS if prompt + s <= context] or [CHART_SEQ_LENS[0]]
    limits = _limits(gpus, plans[0])
    curve = _curve(inventory, plans, seqs, max(b for _, b in limits))
    if args.plot:
        from peftaudit.gpus.plot import write_plot

        # The axis is labelled sequence length: GRPO's title says what its lengths are.
        by = f" by completion length after a {prompt:,}-token prompt" if grpo else ""
        write_plot(args.plot, curve, limits, f"{model.resolved.id}: peak memory per GPU{by}")
    if fmt == "json":
        data: dict[str, Any] = {
            "model": model.resolved.id,
            "plans": [p.to_dict() for p in plans],
            "gpus": [
                {"gpu": g.name, "usable_bytes": g.usable_bytes, "fits": [f.to_dict() for f in fits]}
                for g, fits in zip(gpus, rows, strict=True)
            ],
        }
        if grpo:
            data["by_completion_len"] = {
                m: [{"completion_len": c, "seq_len": prompt + c, "peak_bytes": b} for c, b in pts]
                for m, pts in curve.items()
            }
        else:
            data["by_seq_len"] = {m: [{"seq_len": s, "peak_bytes": b} for s, b in pts] for m, pts in curve.items()}
        data["notes"] = notes
        emit(dumps(data) + "\n", args)
        return ExitCode.OK
    out, buffer = render.console(width(args), use_color(args))  # rich: for tables only
    out.print(model.resolved.id, markup=False)
    line = render.plan_lines(plans, out)
    labels = [f"{p.method} ({rest})" if rest else p.method for p, rest in zip(plans, line.rest, strict=True)]
    render.sweep_table(rows, labels, gpus, out)
    for note in notes:
        out.print(note, markup=False)
    render.seq_chart(curve, limits, out, by=f"completion length (after a {prompt:,}-token prompt)" if grpo else None)
    emit(buffer.getvalue(), args)
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    """``gpus MODEL --serve``: the GPUs ranked for serving (``peftaudit serve``'s ranking)."""
    from peftaudit.commands.serve import show
    from peftaudit.errors import PeftauditError
    from peftaudit.memory.cli import training_flags_given

    if args.model is None:
        raise PeftauditError("--serve needs MODEL")
    if training_flags_given(args) or args.plot or args.max_gpus != 128:
        raise PeftauditError("--serve takes the serving flags, not the training plan's (--method, --seq-len, --plot)")
    return show(args, serving_plan(args), selected_gpus(args.gpu), one=False)


def _curve(inventory: Any, plans: list[Any], seqs: list[int], ceiling: int) -> dict[str, list[tuple[int, int]]]:
    """Peak per GPU at each length, stopping after the first length where every method is past ``ceiling``.

    GRPO's lengths are completions after the plan's prompt (every plan tried keeps a prompt)."""
    from peftaudit.gpus.sizing import peak_bytes

    def at(plan: Any, length: int) -> Any:
        if plan.objective == "grpo":
            return plan.with_(seq_len=plan.seq_len - plan.completion_len + length, completion_len=length)
        return plan.with_(seq_len=length)

    curve: dict[str, list[tuple[int, int]]] = {p.method: [] for p in plans}
    for seq in seqs:
        peaks = {p.method: peak_bytes(inventory, at(p, seq)) for p in plans}
        for method, b in peaks.items():
            curve[method].append((seq, b))
        if all(b > ceiling for b in peaks.values()):
            break
    return curve


def _limits(gpus: list[Any], plan: Any) -> list[tuple[str, int]]:
    """GPU memory lines for the chart: one per distinct usable size, at most five; what the training step of
    ``plan`` may use (less a colocated vLLM's share)."""
    from peftaudit.gpus.sizing import training_usable_bytes

    lookup = {g.name: training_usable_bytes(plan, g) for g in gpus}
    by_size: dict[int, str] = {}
    for g in sorted(gpus, key=lambda g: lookup[g.name]):
        by_size.setdefault(round(lookup[g.name] / 2**30), g.name)
    chosen = sorted(by_size.items())
    if len(chosen) > 5:
        step = len(chosen) / 5
        chosen = [chosen[int(i * step)] for i in range(5)]
    return [(name, lookup[name]) for _, name in chosen]
