"""``peftaudit recommend MODEL``: which LoRA to run, why, what it costs, what will break, and the config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from peftaudit.commands._model import add_model_arguments, load_model
from peftaudit.commands._output import add_output_arguments, emit, warn
from peftaudit.recommend.findings import FAIL_ON_LEVELS
from peftaudit.recommend.rank import TASKS
from peftaudit.recommend.targets import PRESETS

#: The built-in export formats (plugins may add more; ``--export`` accepts any registered one).
EXPORTS = ("peft", "peft-json", "axolotl", "llama-factory", "trl")


def add_parser(sub: Any) -> None:
    from peftaudit.memory.cli import ALLOCATOR_FLAGS, OBJECTIVE_FLAGS, STACK_FLAG, add_flag, plan_default

    parser = sub.add_parser(
        "recommend",
        help="recommend LoRA targets, rank, alpha and dropout with reasons, check readiness, export configs",
        description=(
            "Recommend a LoRA configuration for MODEL from the task, the training tokens and the memory "
            "budget, with the reasoning and its sources, the cost of the alternatives, readiness findings, "
            "and the config in peft, axolotl, LLaMA-Factory or TRL form. Built on the meta device: no weights."
        ),
    )
    plan = parser.add_argument_group("the run")
    plan.add_argument("--task", choices=TASKS, default="instruct", help="what the training does (default: instruct)")
    plan.add_argument(
        "--tokens", metavar="N", help="training tokens the loss sees, e.g. 20M (completion tokens for SFT)"
    )
    plan.add_argument("--gpu", metavar="NAME", help="fit the run into one GPU of this kind (A10G, H100, ...)")
    plan.add_argument("--budget", metavar="SIZE", help="fit the run into this much GPU memory, e.g. 48GiB")
    # The estimator's own defaults (TrainingPlan's fields), as the memory flags of report, fit and plan use.
    plan.add_argument(
        "--batch-size",
        type=int,
        default=plan_default("batch_size"),
        metavar="N",
        help="micro-batch per GPU (default %(default)s)",
    )
    plan.add_argument(
        "--seq-len",
        type=int,
        default=plan_default("seq_len"),
        metavar="N",
        help="tokens per sequence (default %(default)s)",
    )
    add_flag(plan, STACK_FLAG)  # the estimator's own --stack, as report, fit, gpus and plan have it
    for flag in ALLOCATOR_FLAGS:  # and its --expandable-segments and --lengths
        add_flag(plan, flag)
    for flag in OBJECTIVE_FLAGS:  # and its --objective with the objectives' options
        add_flag(plan, flag)
    plan.add_argument("--add-tokens", type=int, default=0, metavar="N", help="tokens you add to the tokenizer")
    lora = parser.add_argument_group("LoRA (fix any of these yourself; the rest is recommended)")
    lora.add_argument("--preset", choices=PRESETS, help="targets by preset (default: all-linear, +experts for MoE)")
    lora.add_argument(
        "--target-modules",
        metavar="NAMES",
        help="your own targets, checked instead of a preset: comma-separated names, all-linear, or a regex",
    )
    lora.add_argument(
        "--target-parameters", metavar="NAMES", help="comma-separated target_parameters (with --target-modules)"
    )
    lora.add_argument(
        "--modules-to-save", metavar="NAMES", help="comma-separated modules_to_save (with --target-modules)"
    )
    lora.add_argument("--rank", "-r", type=int, metavar="R")
    lora.add_argument("--alpha", type=int, metavar="A")
    lora.add_argument("--dropout", type=float, metavar="P")
    lora.add_argument("--rslora", dest="rslora", action="store_true", default=None, help="force rsLoRA scaling")
    lora.add_argument("--no-rslora", dest="rslora", action="store_false", help="force alpha/r scaling")
    lora.add_argument(
        "--method", choices=("lora", "qlora"), help="LoRA or QLoRA (default: LoRA unless the budget needs QLoRA)"
    )
    out = parser.add_argument_group("checks and export")
    out.add_argument(
        "--export",
        metavar="FORMAT",
        help=f"print the config instead of the report: {', '.join(EXPORTS)} (or a plugin's format)",
    )
    out.add_argument(
        "--skip-check", action="append", default=[], metavar="ID", help="drop findings with this id prefix"
    )
    out.add_argument(
        "--fail-on",
        choices=FAIL_ON_LEVELS,
        default="never",
        help="exit 1 when a readiness finding reaches this severity (default: never)",
    )
    add_model_arguments(parser)  # MODEL is listed first whatever the order; its source flags come here
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.errors import PeftauditError
    from peftaudit.memory.cli import STACK_FLAG
    from peftaudit.recommend.cli import gate
    from peftaudit.recommend.exports import export
    from peftaudit.recommend.recommendation import RecommendRequest, recommend
    from peftaudit.recommend.render import FORMATS, render_recommendation
    from peftaudit.recommend.targets import TargetSpec
    from peftaudit.units import parse_size, parse_tokens

    fmt = args.format or "table"
    if fmt not in FORMATS:
        raise PeftauditError(f"unknown --format '{fmt}' for recommend; choose from {', '.join(FORMATS)}")
    if args.target_modules and args.preset:
        raise PeftauditError("give --preset or --target-modules, not both")
    if (args.target_parameters or args.modules_to_save) and not args.target_modules:
        raise PeftauditError("--target-parameters and --modules-to-save go with --target-modules")
    for name in ("batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise PeftauditError(f"--{name.replace('_', '-')} must be a positive integer")

    objective = _objective_fields(args)  # bad objective flags: refused before loading
    budget = parse_size(args.budget) if args.budget else None
    gpu_name = None
    if args.gpu:
        from peftaudit.gpus import find_gpu

        gpu = find_gpu(args.gpu)
        gpu_name = gpu.name
        if budget is None:
            budget = gpu.usable_bytes
        else:
            warn(f"--budget {args.budget} overrides the {gpu.name}'s memory")
    if budget is not None:
        budget = _less_vllm(budget, objective, gpu_name)
    targets = None
    if args.target_modules:
        targets = TargetSpec.from_user(
            args.target_modules,
            parameters=_names(args.target_parameters),
            modules_to_save=_names(args.modules_to_save),
        )
    request = RecommendRequest(
        task=args.task,
        tokens=parse_tokens(args.tokens) if args.tokens else None,
        preset=args.preset,
        targets=targets,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        use_rslora=args.rslora,
        method=args.method,
        budget_bytes=budget,
        gpu=gpu_name,
        added_tokens=args.add_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        skip_checks=tuple(args.skip_check),
        stack=STACK_FLAG.value(args.memory_stack) if args.memory_stack is not None else (),
        expandable_segments=bool(args.memory_expandable_segments),
        lengths=args.memory_lengths or "fixed",
        objective=tuple(objective.items()),
    )
    loaded = load_model(args, objective.get("objective", "sft"))
    rec = recommend(loaded.inventory, loaded.facts, request)

    if args.export:
        written = export(rec.recipe, args.export)
        for message in written.warnings:
            warn(message)
        for step in rec.reasons:
            if step.rule.startswith("budget."):
                warn(step.text)
        for finding in rec.findings:
            if finding.severity != "info":
                warn(f"{finding.severity} {finding.id}: {finding.title}")
        emit(written.text, args)
    else:
        emit(render_recommendation(rec, fmt), args)
    code, why = gate(rec.findings, args.fail_on)
    if why:
        sys.stderr.write(f"peftaudit: {why}\n")
    return code


def _objective_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The plan fields ``--objective`` and its options give, checked as the estimator's plan checks them
    (a :class:`~peftaudit.memory.plan.PlanError`: one line, exit 2)."""
    from peftaudit.memory import TrainingPlan
    from peftaudit.memory.cli import OBJECTIVE_FLAGS

    fields = {
        flag.field: flag.value(getattr(args, flag.dest))
        for flag in OBJECTIVE_FLAGS
        if getattr(args, flag.dest, None) is not None
    }
    spelling = {flag.field: flag.flag for flag in OBJECTIVE_FLAGS}
    spelling.update(seq_len="--seq-len", batch_size="--batch-size")
    TrainingPlan(batch_size=args.batch_size, seq_len=args.seq_len, **fields).validate(spelling)
    return fields


def _less_vllm(budget: int, objective: dict[str, Any], gpu: str | None) -> int:
    """The memory ``budget`` leaves the training step once a colocated vLLM engine (GRPO, ``--generation
    vllm-colocate``) holds its fraction of the device (``--vllm-memory``; said on stderr)."""
    from peftaudit.gpus.sizing import vllm_share
    from peftaudit.memory import TrainingPlan
    from peftaudit.render.numbers import gib

    plan = TrainingPlan(**objective)
    held = vllm_share(plan, budget)
    if not held:
        return budget
    warn(
        f"vLLM colocated holds {gib(held)} of the {(gpu + ' ') if gpu else ''}{gib(budget)} "
        f"(--vllm-memory {plan.vllm_memory:g}): the training step must fit in the {gib(budget - held)} left"
    )
    return budget - held


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())
