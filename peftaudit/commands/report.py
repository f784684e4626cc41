"""``peftaudit report MODEL``: the parameter inventory of a model, without its weights.

Without ``--method``/``--compare`` the report also answers what training takes
and what to train: the memory table and the recommendation of
:mod:`peftaudit.report.glance`; ``--params-only`` narrows it to the counts.
"""

from __future__ import annotations

import argparse
from typing import Any

from peftaudit.commands._model import add_model_arguments, resolve_model
from peftaudit.commands._output import add_output_arguments, emit, use_color, warn, width


def add_parser(sub: Any) -> None:
    from peftaudit.memory import cli as memory_cli
    from peftaudit.recommend.cli import add_check_arguments

    parser = sub.add_parser(
        "report",
        help="count a model's parameters per layer and show what training it takes and what to train",
        description=(
            "Build MODEL on the meta device (no weights are downloaded or allocated) and report "
            "its parameters: totals, per layer, per kind, tied groups, MoE active parameters; then "
            "training memory at a glance (full fine-tuning, LoRA and QLoRA at the default plan, with and "
            "without gradient checkpointing, on 24, 48 and 80 GB GPUs) and the recommended LoRA in one line. "
            "--params-only shows the counts alone; --method/--compare show detailed estimates instead. "
            "--format html -o FILE writes the report as one self-contained page to share (no scripts, "
            "nothing fetched; readable on a phone)."
        ),
    )
    add_model_arguments(parser)  # with --no-cache
    shown = parser.add_argument_group("what to show")
    shown.add_argument("--tree", action="store_true", help="also show the module tree with counts")
    shown.add_argument(
        "--params-only",
        action="store_true",
        help="only the parameter counts: no memory at a glance, no recommendation (faster on a first run)",
    )
    add_check_arguments(parser)
    memory_cli.add_arguments(parser)
    add_output_arguments(parser, formats="table (default), json, markdown, html (one self-contained page)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftaudit.plugins import renderers
    from peftaudit.report.render import RenderOptions

    fmt = args.format or "table"
    available = renderers()
    renderer = available.get(fmt)
    if renderer is None:
        from peftaudit.errors import PeftauditError

        raise PeftauditError(f"unknown --format '{fmt}'; choose from {', '.join(sorted(available))}")
    resolved, source, options = resolve_model(args)
    report, findings = _report_and_findings(resolved, source, options, args)
    text = renderer.render(report, RenderOptions(width=width(args), color=use_color(args), tree=args.tree))
    emit(text, args)
    from peftaudit.recommend.cli import gate

    code, why = gate(findings, args.fail_on)
    if why:
        warn(why)
    return code


def _report_and_findings(
    resolved: Any, source: Any, options: Any, args: argparse.Namespace
) -> tuple[Any, tuple[Any, ...]]:
    """The report, with memory estimates (estimator flags) and readiness findings (``--checks``);
    also the findings ``--fail-on`` judges, which are computed even when not shown."""
    import dataclasses

    from peftaudit.memory import cli as memory_cli
    from peftaudit.report import report_for

    plans = memory_cli.plans_from_args(args)
    if plans and args.params_only:
        from peftaudit.errors import PeftauditError

        raise PeftauditError("--params-only shows the counts alone: leave out --method, --compare and the memory flags")
    # The default report answers at a glance; asked-for estimates replace the glance's table.
    glance = not plans and not args.params_only
    checks = args.checks or args.fail_on != "never"
    use_cache = not args.no_cache
    if not plans and not checks:
        return report_for(resolved, source, options, use_cache=use_cache, glance=glance), ()
    from peftaudit.commands._model import model_for_objective
    from peftaudit.sources.load import load_resolved

    if plans:
        resolved = model_for_objective(resolved, plans[0].objective)  # one objective for every plan
    # One meta build (or model cache entry) for the report, estimates and checks.
    loaded = load_resolved(resolved, source, options, use_cache=use_cache)
    report = report_for(resolved, source, options, use_cache=use_cache, loaded=loaded, glance=glance)
    estimates: list[Any] = []
    if plans:
        estimates = _estimates(loaded.inventory, plans)
        if estimates and memory_cli.wants_trace(args):
            from peftaudit.memory import trace
            from peftaudit.progress import task

            for plan in plans:
                with task(f"tracing {plan.method}") as progress:
                    estimates.append(trace(loaded.skeleton(), plan, progress=progress))
    findings: tuple[Any, ...] = ()
    if checks:
        from peftaudit.recommend.checks import CheckContext, run_checks

        seq_len = plans[0].seq_len if plans else 2048
        context = CheckContext(inventory=loaded.inventory, facts=loaded.facts, seq_len=seq_len)
        findings = tuple(run_checks(context, skip=args.skip_check))
    shown = findings if args.checks else ()
    return dataclasses.replace(report, estimates=tuple(estimates), findings=shown), findings


def _estimates(inventory: Any, plans: Any) -> list[Any]:
    """The memory estimates, leaving out those the estimator cannot make for this model.

    A plan the user got wrong (targets matching nothing, an invalid combination) is still
    an error, exit 2. A model the estimator has no layer program or shape for (a vision
    encoder, a convolutional network) keeps its exact counts and gets a named warning,
    ``estimate-unavailable``, instead of an estimate.
    """
    from peftaudit.memory import PlanError, estimate

    estimates: list[Any] = []
    for plan in plans:
        try:
            estimates.append(estimate(inventory, plan))
        except PlanError as exc:
            _raise_if_plan_is_wrong(inventory, plan, exc)
            warn(
                f"estimate-unavailable: no {plan.method} memory estimate for {inventory.architecture}: {exc} "
                "(the parameter counts are exact)"
            )
    return estimates


def _raise_if_plan_is_wrong(inventory: Any, plan: Any, exc: Exception) -> None:
    """Re-raise ``exc`` when the plan itself is at fault: it fails validation, its objective or its targets on
    this model."""
    from peftaudit.memory import PlanError
    from peftaudit.memory.images import check_images
    from peftaudit.memory.objectives import check_objective
    from peftaudit.memory.targets import saved_modules
    from peftaudit.plugins import memory_methods

    try:
        plan.validate()
        check_images(inventory.config or {}, plan, inventory.architecture)
        check_objective(inventory, plan)  # an objective this model's class cannot train
        # The method's own targets and refusals (LoRA's, AdaLoRA's defaults, GaLore's nn.Linear targets...).
        memory_methods()[plan.method].adapt(inventory, plan)
        saved_modules(inventory, plan)
    except PlanError:
        raise exc from None
