"""Command-line flags for the memory estimator, for whichever command shows estimates.

Integration (for ``peftaudit report`` and friends), in three calls::

    from peftaudit.memory import cli as memory_cli

    memory_cli.add_arguments(parser)            # adds the "memory estimate" flag group
    ...
    args = parser.parse_args()
    plans = memory_cli.plans_from_args(args)    # [] when no estimator flag was given
    if plans:
        from peftaudit.memory import estimate, trace
        estimates = [estimate(inventory, p) for p in plans]
        if memory_cli.wants_trace(args):        # --trace: the fake-tensor oracle, per plan
            estimates += [trace(source.build(resolved, options), p) for p in plans]
        from peftaudit.memory.render import render_estimates, estimates_markdown
        render_estimates(estimates, console)    # table + bar chart; JSON: [e.to_dict() for e in estimates]

Flags (all optional; every one has the :class:`~peftaudit.memory.plan.TrainingPlan` default):

``--method M`` ``--compare M1,M2,...`` ``--rank R`` ``--alpha A`` ``--dropout P``
``--targets all-linear|default|name,name`` ``--targets-regex REGEX`` ``--exclude names``
``--target-parameters names`` ``--modules-to-save names`` ``--rank-pattern REGEX=R`` (repeatable)
``--batch-size B`` ``--seq-len S`` ``--gradient-checkpointing`` / ``--no-gradient-checkpointing``
``--grad-accum N`` ``--attention sdpa|flash|eager`` ``--loss default|chunked``
``--optimizer NAME`` ``--optimizer-impl fused|foreach|for-loop`` ``--precision P``
``--base-dtype D`` ``--adapter-dtype D`` ``--quant-type nf4|fp4`` ``--no-double-quant`` ``--kbit-upcast``
``--gpus N`` ``--gpus-per-node N`` ``--sharding S`` ``--offload none|optimizer|parameters|both``
``--cuda-context MIB`` ``--allocator-margin FRACTION`` ``--virtual-tokens N`` ``--trainable-layers N``
``--trace``

Nothing heavy is imported here: parsing flags does not import torch.

Every default the help states is read from :class:`TrainingPlan`'s own field,
so the help, ``docs/cli.md`` (generated from it) and the estimate cannot
disagree. Numbers are checked where they are typed: ``nan`` and ``inf`` are
refused, and so is a regular expression that does not compile, naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from peftaudit.commands._output import finite_float, non_negative_float, positive_float
from peftaudit.memory.plan import (
    ADAPTER_DTYPES,
    ATTENTIONS,
    BASE_DTYPES,
    LOSSES,
    MIB,
    OFFLOADS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    QUANT_TYPES,
    SHARDINGS,
    PlanError,
    TrainingPlan,
)

#: Destinations of the flags this module adds (all default to None: "not given").
_DESTS = (
    "memory_method",
    "memory_compare",
    "memory_rank",
    "memory_alpha",
    "memory_dropout",
    "memory_targets",
    "memory_targets_regex",
    "memory_exclude",
    "memory_target_parameters",
    "memory_modules_to_save",
    "memory_rank_pattern",
    "memory_batch_size",
    "memory_seq_len",
    "memory_gradient_checkpointing",
    "memory_grad_accum",
    "memory_attention",
    "memory_loss",
    "memory_optimizer",
    "memory_optimizer_impl",
    "memory_precision",
    "memory_base_dtype",
    "memory_adapter_dtype",
    "memory_quant_type",
    "memory_double_quant",
    "memory_kbit_upcast",
    "memory_gpus",
    "memory_gpus_per_node",
    "memory_sharding",
    "memory_offload",
    "memory_cuda_context",
    "memory_allocator_margin",
    "memory_virtual_tokens",
    "memory_trainable_layers",
    "memory_trace",
)


def plan_default(name: str) -> Any:
    """The default of :class:`TrainingPlan`'s field ``name``: the one source the help quotes."""
    for f in dataclasses.fields(TrainingPlan):
        if f.name == name:
            return f.default
    raise KeyError(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the memory-estimate flags to ``parser`` as one argument group."""
    d = plan_default
    g = parser.add_argument_group("memory estimate", "estimate peak GPU memory for a training plan")
    add = g.add_argument
    add(
        "--method",
        dest="memory_method",
        metavar="M",
        help="fine-tuning method (full, freeze, lora, qlora, lora-8bit, dora, ia3, prompt-tuning, or a plugin's)",
    )
    add("--compare", dest="memory_compare", metavar="M1,M2", help="several methods side by side")
    add("--rank", dest="memory_rank", type=int, metavar="R", help=f"LoRA rank (default {d('rank')})")
    add("--alpha", dest="memory_alpha", type=positive_float, metavar="A", help="LoRA alpha (default 2 x rank)")
    add(
        "--dropout",
        dest="memory_dropout",
        type=finite_float,
        metavar="P",
        help=f"LoRA dropout (default {d('dropout'):g})",
    )
    add(
        "--targets",
        dest="memory_targets",
        metavar="T",
        help="all-linear (default), default (peft's per-model default) or comma-separated module names",
    )
    add("--targets-regex", dest="memory_targets_regex", metavar="REGEX", help="a regex over full module paths")
    add("--exclude", dest="memory_exclude", metavar="NAMES", help="module names never adapted")
    add(
        "--target-parameters",
        dest="memory_target_parameters",
        metavar="NAMES",
        help="parameters adapted directly (fused MoE experts)",
    )
    add("--modules-to-save", dest="memory_modules_to_save", metavar="NAMES", help="modules trained in full")
    add(
        "--rank-pattern",
        dest="memory_rank_pattern",
        action="append",
        metavar="REGEX=R",
        help="per-module rank (repeatable)",
    )
    add(
        "--batch-size",
        dest="memory_batch_size",
        type=int,
        metavar="B",
        help=f"micro-batch per GPU (default {d('batch_size')})",
    )
    add("--seq-len", dest="memory_seq_len", type=int, metavar="S", help=f"tokens per sequence (default {d('seq_len')})")
    add(
        "--gradient-checkpointing",
        dest="memory_gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute layers in backward",
    )
    add("--grad-accum", dest="memory_grad_accum", type=int, metavar="N", help="gradient accumulation steps")
    add("--attention", dest="memory_attention", choices=ATTENTIONS, help="attention implementation")
    add("--loss", dest="memory_loss", choices=LOSSES, help="default (fp32 logits) or chunked")
    add("--optimizer", dest="memory_optimizer", choices=OPTIMIZERS, help="optimizer (none = inference)")
    add("--optimizer-impl", dest="memory_optimizer_impl", choices=OPTIMIZER_IMPLS, help="torch optimizer kernel")
    add(
        "--precision",
        dest="memory_precision",
        choices=PRECISIONS,
        help=f"training precision (default {d('precision')})",
    )
    add(
        "--base-dtype",
        dest="memory_base_dtype",
        choices=BASE_DTYPES,
        help="storage of frozen base weights (overrides the checkpoint's own quantization_config)",
    )
    add("--adapter-dtype", dest="memory_adapter_dtype", choices=ADAPTER_DTYPES, help="adapter weights' dtype")
    add("--quant-type", dest="memory_quant_type", choices=QUANT_TYPES, help="QLoRA 4-bit format")
    add(
        "--double-quant",
        dest="memory_double_quant",
        action=argparse.BooleanOptionalAction,
        help=f"QLoRA double quantization (default {'on' if d('double_quant') else 'off'})",
    )
    add(
        "--kbit-upcast",
        dest="memory_kbit_upcast",
        action="store_true",
        default=None,
        help="prepare_model_for_kbit_training: non-quantized weights to fp32",
    )
    add("--gpus", dest="memory_gpus", type=int, metavar="N", help="GPUs in the job")
    add("--gpus-per-node", dest="memory_gpus_per_node", type=int, metavar="N", help="GPUs per node")
    add("--sharding", dest="memory_sharding", choices=SHARDINGS, help="ddp, zero1/2/3, fsdp, fsdp-hybrid")
    add("--offload", dest="memory_offload", choices=OFFLOADS, help="CPU offload")
    add(
        "--cuda-context",
        dest="memory_cuda_context",
        type=non_negative_float,
        metavar="MIB",
        help=f"CUDA context and workspaces in MiB (default {d('cuda_context_bytes') / MIB:g})",
    )
    add(
        "--allocator-margin",
        dest="memory_allocator_margin",
        type=finite_float,
        metavar="FRACTION",
        help=f"allocator slack as a fraction of allocated memory (default {d('allocator_fraction'):.2f})",
    )
    add(
        "--virtual-tokens",
        dest="memory_virtual_tokens",
        type=int,
        metavar="N",
        help=f"prompt tuning tokens (default {d('num_virtual_tokens')})",
    )
    add(
        "--trainable-layers",
        dest="memory_trainable_layers",
        type=int,
        metavar="N",
        help=f"freeze tuning: last N layers train (default {d('trainable_layers')})",
    )
    add(
        "--trace",
        dest="memory_trace",
        action="store_true",
        default=None,
        help="also simulate one real training step with fake tensors (slower, no GPU needed)",
    )


def _compiles(flag: str, given: str, pattern: str) -> None:
    """Refuse, naming the flag, a regular expression that Python's ``re`` (peft's matcher) cannot compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PlanError(f"{flag} {given!r} is not a valid regular expression: {exc.msg}") from None


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _given(args: argparse.Namespace) -> bool:
    # Identity checks: a given 0 (``--rank 0``) must count as given, to be refused by validation.
    return any(getattr(args, d, None) is not None and getattr(args, d) is not False for d in _DESTS)


def wants_trace(args: argparse.Namespace) -> bool:
    """Whether ``--trace`` was given."""
    return bool(getattr(args, "memory_trace", None))


def plans_from_args(args: argparse.Namespace) -> list[TrainingPlan]:
    """One :class:`TrainingPlan` per method asked for; ``[]`` when no estimator flag was given.

    Raises :class:`~peftaudit.memory.plan.PlanError` (one line, exit 2 in the CLI)
    for flags that make no plan, e.g. ``--rank-pattern`` without ``=``.
    """
    if not _given(args):
        return []
    fields: dict[str, Any] = {}

    def put(name: str, dest: str, convert: Any = None) -> None:
        value = getattr(args, dest, None)
        if value is not None:
            fields[name] = convert(value) if convert else value

    put("rank", "memory_rank")
    put("alpha", "memory_alpha")
    put("dropout", "memory_dropout")
    targets = getattr(args, "memory_targets", None)
    regex = getattr(args, "memory_targets_regex", None)
    if targets and regex:
        raise PlanError("give --targets or --targets-regex, not both")
    if regex:
        _compiles("--targets-regex", regex, regex)  # peft: re.fullmatch(target_modules, name)
        fields["targets"] = regex
    elif targets:
        fields["targets"] = targets if targets in ("all-linear", "default") else _names(targets)
    put("exclude", "memory_exclude", _names)
    put("target_parameters", "memory_target_parameters", _names)
    put("modules_to_save", "memory_modules_to_save", _names)
    patterns = getattr(args, "memory_rank_pattern", None)
    if patterns:
        pairs = []
        for item in patterns:
            key, sep, value = item.rpartition("=")
            if not sep or not key:
                raise PlanError(f"--rank-pattern wants REGEX=RANK, got {item!r}")
            _compiles("--rank-pattern", key, rf"(.*\.)?({key})$")  # as peft's get_pattern_key matches it
            try:
                pairs.append((key, int(value)))
            except ValueError:
                raise PlanError(f"--rank-pattern rank must be an integer, got {value!r}") from None
        fields["rank_pattern"] = tuple(pairs)
    put("batch_size", "memory_batch_size")
    put("seq_len", "memory_seq_len")
    put("gradient_checkpointing", "memory_gradient_checkpointing")
    put("gradient_accumulation", "memory_grad_accum")
    put("attention", "memory_attention")
    put("loss", "memory_loss")
    put("optimizer", "memory_optimizer")
    put("optimizer_impl", "memory_optimizer_impl")
    put("precision", "memory_precision")
    put("base_dtype", "memory_base_dtype")
    put("adapter_dtype", "memory_adapter_dtype")
    put("quant_type", "memory_quant_type")
    put("double_quant", "memory_double_quant")
    put("kbit_upcast", "memory_kbit_upcast")
    put("gpus", "memory_gpus")
    put("gpus_per_node", "memory_gpus_per_node")
    put("sharding", "memory_sharding")
    put("offload", "memory_offload")
    put("cuda_context_bytes", "memory_cuda_context", lambda mib: int(float(mib) * MIB))
    put("allocator_fraction", "memory_allocator_margin")
    put("num_virtual_tokens", "memory_virtual_tokens")
    put("trainable_layers", "memory_trainable_layers")
    if fields.get("gpus", 1) > 1 and "sharding" not in fields:
        fields["sharding"] = "ddp"

    method = getattr(args, "memory_method", None)
    compare = _names(getattr(args, "memory_compare", None))
    if method and compare:
        raise PlanError("give --method or --compare, not both")
    methods = compare or ((method,) if method else ("lora",))
    plans = [TrainingPlan(method=m, **fields) for m in methods]
    for plan in plans:
        plan.validate()
    return plans
