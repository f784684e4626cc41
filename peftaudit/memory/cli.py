"""Command-line flags for the memory estimator, for whichever command shows estimates.

Integration (for ``peftaudit report`` and friends), in three calls::

    from peftaudit.memory import cli as memory_cli

    memory_cli.add_arguments(parser)            # adds the "memory estimate" flag group
    ...
    args = parser.parse_args()
    plans = memory_cli.plans_from_args(args)    # [] when no estimator flag was given
    if plans:
        from peftaudit.memory import estimate, trace
        estimates = [estimate(loaded.inventory, p) for p in plans]
        if memory_cli.wants_trace(args):        # --trace: the fake-tensor oracle, per plan
            estimates += [trace(loaded.skeleton(), p) for p in plans]
        from peftaudit.memory.render import render_estimates, estimates_markdown
        render_estimates(estimates, console)    # table + bar chart; JSON: [e.to_dict() for e in estimates]

A command that always estimates (``fit``, ``plan``, ``gpus``) passes the
methods to use when none is named: ``plans_from_args(args, default_methods="lora")``.

The flags: ``--method M`` or ``--compare M1,M2,...``, one flag per
:class:`~peftaudit.memory.plan.TrainingPlan` field in :data:`PLAN_FLAGS`
(``--rank R``, ``--batch-size B``, ``--cuda-context MIB``, ...), and ``--trace``.
Every one is optional and has the plan's default. Nothing heavy is imported
here: parsing flags does not import torch.

Every default the help states is read from :class:`TrainingPlan`'s own field,
so the help, ``docs/cli.md`` (generated from it) and the estimate cannot
disagree. Numbers are checked where they are typed: ``nan`` and ``inf`` are
refused, and so is a regular expression that does not compile, naming the flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftaudit.commands._output import finite_float, non_negative_float, positive_float
from peftaudit.memory.plan import (
    ADAPTER_DTYPES,
    ATTENTIONS,
    BASE_DTYPES,
    BUILTIN_METHOD_NAMES,
    GALORE_PROJECTIONS,
    GENERATIONS,
    LENGTHS,
    LORA_INITS,
    LOSSES,
    MIB,
    OBJECTIVE_OPTIONS,
    OBJECTIVES,
    OFFLOADS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PLAN_DEFAULTS,
    PRECISIONS,
    PROMPT_ENCODERS,
    QUANT_TYPES,
    SHARDINGS,
    PlanError,
    TrainingPlan,
)
from peftaudit.memory.stack import parse_stack


def plan_default(name: str) -> Any:
    """The default of :class:`TrainingPlan`'s field ``name``: the one source the help quotes."""
    return PLAN_DEFAULTS[name]


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _compiles(flag: str, given: str, pattern: str) -> None:
    """Refuse, naming the flag, a regular expression that Python's ``re`` (peft's matcher) cannot compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PlanError(f"{flag} {given!r} is not a valid regular expression: {exc.msg}") from None


def _targets(value: str) -> str | tuple[str, ...]:
    return value if value in ("all-linear", "default") else _names(value)


def _galore_targets(value: str) -> str | tuple[str, ...]:
    # transformers' optim_target_modules: "all-linear", or a list of names (one name is a list of one,
    # not a regex: a one-string value would be matched with re.fullmatch instead).
    return "all-linear" if value.replace("_", "-") == "all-linear" else _names(value)


def _targets_regex(value: str) -> str:
    _compiles("--targets-regex", value, value)  # peft: re.fullmatch(target_modules, name)
    return value


def _rank_patterns(items: list[str]) -> tuple[tuple[str, int], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise PlanError(f"--rank-pattern wants REGEX=RANK, got {item!r}")
        _compiles("--rank-pattern", key, rf"(.*\.)?({key})$")  # as peft's get_pattern_key matches it
        try:
            pairs.append((key, int(value)))
        except ValueError:
            raise PlanError(f"--rank-pattern rank must be an integer, got {value!r}") from None
    return tuple(pairs)


def _layers(value: str) -> tuple[int, ...]:
    """``0,1,2`` or ranges ``0-15,20``: the layer indices peft's ``layers_to_transform`` lists."""
    layers: list[int] = []
    for part in _names(value):
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise PlanError(f"--layers wants layer indices like 0,1,2 or 0-15, got {part!r}") from None
        if high < low:
            raise PlanError(f"--layers range {part!r} runs backwards")
        layers.extend(range(low, high + 1))
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class PlanFlag:
    """One command-line flag that sets one :class:`TrainingPlan` field."""

    field: str
    """The field it sets (two flags may set one field, e.g. ``--targets`` and ``--targets-regex``)."""
    flag: str
    help: str
    """``{default}`` in it is the field's default, as the flag spells it (a switch: on/off)."""
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    """argparse's ``type``: the check a number must pass where it is typed."""
    choices: Sequence[str] | None = None
    action: str | type[argparse.Action] | None = None
    to_plan: Callable[[Any], Any] | None = None
    """From the parsed value to the field's value; raises :class:`PlanError` naming the flag."""
    unit: int = 1
    """The field holds the flag's number times ``unit`` (``--cuda-context`` is in MiB, the field in bytes)."""

    @property
    def dest(self) -> str:
        return "memory_" + self.flag.removeprefix("--").replace("-", "_")

    def shown_default(self) -> object:
        default = plan_default(self.field)
        if isinstance(default, bool):
            return "on" if default else "off"
        return default / self.unit if self.unit != 1 else default

    def value(self, parsed: Any) -> Any:
        if self.unit != 1:
            return int(float(parsed) * self.unit)
        return self.to_plan(parsed) if self.to_plan else parsed


_switch = argparse.BooleanOptionalAction

#: ``--stack``, also added on its own by commands with their own plan flags (``recommend``).
STACK_FLAG = PlanFlag(
    "stack",
    "--stack",
    "releases the run uses, e.g. transformers==4.44,peft==0.12 (any of transformers, peft, bitsandbytes, "
    "torch; default: the installed ones)",
    "PKG==VER,...",
    to_plan=parse_stack,
)

#: ``--expandable-segments`` and ``--lengths``: how the caching allocator is set up and what batches
#: it sees; also added on their own by ``recommend``.
ALLOCATOR_FLAGS: tuple[PlanFlag, ...] = (
    PlanFlag(
        "expandable_segments",
        "--expandable-segments",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (default {default})",
        action=_switch,
    ),
    PlanFlag(
        "lengths",
        "--lengths",
        "batch lengths: fixed (packed or padded to --seq-len) or varied (up to it)",
        choices=LENGTHS,
    ),
)

#: The plan's flags, in the order the help lists them.
PLAN_FLAGS: tuple[PlanFlag, ...] = (
    PlanFlag("rank", "--rank", "LoRA rank (default {default})", "R", int),
    PlanFlag("alpha", "--alpha", "LoRA alpha (default 2 x rank)", "A", positive_float),
    PlanFlag("dropout", "--dropout", "LoRA dropout (default {default:g})", "P", finite_float),
    PlanFlag(
        "targets",
        "--targets",
        "all-linear (default), default (peft's per-model default) or comma-separated module names",
        "T",
        to_plan=_targets,
    ),
    PlanFlag("targets", "--targets-regex", "a regex over full module paths", "REGEX", to_plan=_targets_regex),
    PlanFlag("exclude", "--exclude", "module names never adapted", "NAMES", to_plan=_names),
    PlanFlag(
        "target_parameters",
        "--target-parameters",
        "parameters adapted directly (fused MoE experts)",
        "NAMES",
        to_plan=_names,
    ),
    PlanFlag("modules_to_save", "--modules-to-save", "modules trained in full", "NAMES", to_plan=_names),
    PlanFlag(
        "rank_pattern",
        "--rank-pattern",
        "per-module rank (repeatable)",
        "REGEX=R",
        action="append",
        to_plan=_rank_patterns,
    ),
    PlanFlag("batch_size", "--batch-size", "micro-batch per GPU (default {default})", "B", int),
    PlanFlag("seq_len", "--seq-len", "tokens per sequence (default {default})", "S", int),
    PlanFlag("images", "--images", "multimodal models: images per sample, their tokens within --seq-len", "N", int),
    PlanFlag(
        "image_tokens",
        "--image-tokens",
        "multimodal models: tokens per image (default: the model's config)",
        "N",
        int,
    ),
    PlanFlag(
        "image_size",
        "--image-size",
        "vision models: image side in pixels (default: the model's config)",
        "PX",
        int,
    ),
    PlanFlag("gradient_checkpointing", "--gradient-checkpointing", "recompute layers in backward", action=_switch),
    PlanFlag("gradient_accumulation", "--grad-accum", "gradient accumulation steps", "N", int),
    PlanFlag("attention", "--attention", "attention implementation", choices=ATTENTIONS),
    PlanFlag("loss", "--loss", "default (fp32 logits) or chunked", choices=LOSSES),
    PlanFlag("optimizer", "--optimizer", "optimizer (none = inference)", choices=OPTIMIZERS),
    PlanFlag("optimizer_impl", "--optimizer-impl", "torch optimizer kernel", choices=OPTIMIZER_IMPLS),
    PlanFlag("precision", "--precision", "training precision (default {default})", choices=PRECISIONS),
    PlanFlag(
        "base_dtype",
        "--base-dtype",
        "storage of frozen base weights (overrides the checkpoint's own quantization_config)",
        choices=BASE_DTYPES,
    ),
    PlanFlag("adapter_dtype", "--adapter-dtype", "adapter weights' dtype", choices=ADAPTER_DTYPES),
    PlanFlag("quant_type", "--quant-type", "QLoRA 4-bit format", choices=QUANT_TYPES),
    PlanFlag("double_quant", "--double-quant", "QLoRA double quantization (default {default})", action=_switch),
    PlanFlag(
        "kbit_upcast",
        "--kbit-upcast",
        "prepare_model_for_kbit_training: non-quantized weights to fp32",
        action="store_true",
    ),
    PlanFlag("gpus", "--gpus", "GPUs in the job", "N", int),
    PlanFlag("gpus_per_node", "--gpus-per-node", "GPUs per node", "N", int),
    PlanFlag("sharding", "--sharding", "ddp, zero1/2/3, fsdp, fsdp-hybrid", choices=SHARDINGS),
    PlanFlag("offload", "--offload", "CPU offload", choices=OFFLOADS),
    PlanFlag(
        "cuda_context_bytes",
        "--cuda-context",
        "CUDA context and workspaces in MiB (default {default:g})",
        "MIB",
        non_negative_float,
        unit=MIB,
    ),
    PlanFlag(
        "allocator_fraction",
        "--allocator-margin",
        "allocator slack as a flat fraction of allocated memory (default: learned from allocator replays)",
        "FRACTION",
        finite_float,
    ),
    *ALLOCATOR_FLAGS,
    STACK_FLAG,
    PlanFlag(
        "trainable_layers",
        "--trainable-layers",
        "freeze tuning: last N layers train (default {default})",
        "N",
        int,
    ),
)

#: Options of peft's methods, in their own help group (``METHOD_OPTIONS`` in plan.py says which
#: methods read each; given to another method, they are refused).
METHOD_FLAGS: tuple[PlanFlag, ...] = (
    PlanFlag(
        "lora_init",
        "--init",
        "LoRA initialisation; only mica (frozen lora_B) changes memory, the others (pissa, olora, loftq, "
        "eva, corda, orthogonal, gaussian) only the starting values",
        choices=LORA_INITS,
    ),
    PlanFlag("use_rslora", "--rslora", "rsLoRA scaling (changes no memory)", action="store_true"),
    PlanFlag(
        "lora_plus_ratio", "--lora-plus-ratio", "LoRA+ learning-rate ratio B/A (changes no memory)", "X", positive_float
    ),
    PlanFlag("layers_to_transform", "--layers", "adapt only these layers, e.g. 0-7,12", "LIST", to_plan=_layers),
    PlanFlag(
        "layers_pattern", "--layers-pattern", "the layer list --layers counts in (e.g. layers)", "NAMES", to_plan=_names
    ),
    PlanFlag("bdlora_a", "--bdlora-a", "BD-LoRA: modules with a block-diagonal lora_A", "NAMES", to_plan=_names),
    PlanFlag("bdlora_b", "--bdlora-b", "BD-LoRA: modules with a block-diagonal lora_B", "NAMES", to_plan=_names),
    PlanFlag("bdlora_blocks", "--bdlora-blocks", "BD-LoRA: blocks per factor (default {default})", "N", int),
    PlanFlag("trainable_tokens", "--trainable-tokens", "token embeddings trained in place (count)", "N", int),
    PlanFlag(
        "feedforward_modules",
        "--feedforward-modules",
        "IA3: targets whose input is scaled (default: peft's for the model)",
        "NAMES",
        to_plan=_names,
    ),
    PlanFlag(
        "num_virtual_tokens", "--virtual-tokens", "prompt, prefix and p-tuning tokens (default {default})", "N", int
    ),
    PlanFlag(
        "prefix_projection", "--prefix-projection", "prefix tuning through an MLP (default {default})", action=_switch
    ),
    PlanFlag(
        "encoder_hidden_size",
        "--encoder-hidden-size",
        "prefix projection / p-tuning encoder width (default: the model's)",
        "N",
        int,
    ),
    PlanFlag("prompt_encoder", "--prompt-encoder", "p-tuning encoder", choices=PROMPT_ENCODERS),
    PlanFlag("encoder_layers", "--encoder-layers", "p-tuning encoder layers (default {default})", "N", int),
    PlanFlag("lokr_factor", "--lokr-factor", "LoKr decompose factor (default {default}: as even as divides)", "N", int),
    PlanFlag("lokr_decompose_both", "--lokr-decompose-both", "LoKr: factorise both factors", action="store_true"),
    PlanFlag("oft_block_size", "--oft-block-size", "OFT block size (default {default})", "N", int),
    PlanFlag("oft_blocks", "--oft-blocks", "OFT blocks per layer (peft's r; decides the block size)", "N", int),
    PlanFlag("block_share", "--block-share", "OFT: one rotation shared by all blocks", action="store_true"),
    PlanFlag("boft_block_size", "--boft-block-size", "BOFT block size (default {default})", "N", int),
    PlanFlag("boft_blocks", "--boft-blocks", "BOFT blocks (decides the block size)", "N", int),
    PlanFlag("boft_butterfly", "--boft-butterfly", "BOFT butterfly factor (default {default})", "N", int),
    PlanFlag(
        "adalora_allocator",
        "--adalora-allocator",
        "AdaLoRA's rank allocator runs each step (default {default})",
        action=_switch,
    ),
    PlanFlag("galore_rank", "--galore-rank", "GaLore projection rank (default {default})", "R", int),
    PlanFlag(
        "galore_targets",
        "--galore-targets",
        "GaLore's nn.Linear targets (transformers' optim_target_modules): all-linear or comma-separated "
        "names, each matching module paths that contain it (default: attn,mlp, the example of transformers' docs)",
        "NAMES",
        to_plan=_galore_targets,
    ),
    PlanFlag("galore_proj", "--galore-proj", "GaLore projection type (default {default})", choices=GALORE_PROJECTIONS),
)

#: The training objective and its options (``OBJECTIVE_OPTIONS`` in plan.py says which objectives read each).
OBJECTIVE_FLAGS: tuple[PlanFlag, ...] = (
    PlanFlag(
        "objective",
        "--objective",
        "what the step optimises, as TRL's trainers run it: sft (default), dpo, kto, orpo, simpo, reward, grpo",
        choices=OBJECTIVES,
    ),
    PlanFlag(
        "precompute_ref",
        "--precompute-ref",
        "dpo/kto: reference log-probs computed before training (no reference pass or copy in the step)",
        action="store_true",
    ),
    PlanFlag(
        "beta",
        "--beta",
        "the objective's beta (default: TRL's, 0.1; grpo 0.0); changes memory only for grpo, where beta > 0 "
        "loads a reference model",
        "B",
        finite_float,
    ),
    PlanFlag(
        "generations",
        "--generations",
        "grpo: completions per prompt (default {default}); --batch-size counts prompts, so a step trains "
        "batch x generations sequences",
        "G",
        int,
    ),
    PlanFlag(
        "completion_len",
        "--completion-len",
        "grpo: tokens per completion (default {default}), within --seq-len (prompt + completion)",
        "N",
        int,
    ),
    PlanFlag(
        "generation",
        "--generation",
        "grpo: where completions are generated: transformers (default, on the training GPU), vllm-colocate "
        "(a vLLM engine sharing the GPU) or vllm-server (other GPUs)",
        choices=GENERATIONS,
    ),
    PlanFlag(
        "vllm_memory",
        "--vllm-memory",
        "grpo with vllm-colocate: fraction of each GPU vLLM holds (default {default:g})",
        "FRACTION",
        finite_float,
    ),
)

#: Every flag that sets a plan field.
ALL_PLAN_FLAGS: tuple[PlanFlag, ...] = PLAN_FLAGS + METHOD_FLAGS + OBJECTIVE_FLAGS

#: Destinations of every flag this module adds (all default to None: "not given").
_DESTS = ("memory_method", "memory_compare", "memory_peft_config", *(f.dest for f in ALL_PLAN_FLAGS), "memory_trace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the memory-estimate flags to ``parser`` as one argument group."""
    g = parser.add_argument_group("memory estimate", "estimate peak GPU memory for a training plan")
    g.add_argument(
        "--method",
        dest="memory_method",
        metavar="M",
        help=f"fine-tuning method ({', '.join(BUILTIN_METHOD_NAMES)}, or a plugin's)",
    )
    g.add_argument("--compare", dest="memory_compare", metavar="M1,M2", help="several methods side by side")
    g.add_argument(
        "--peft-config",
        dest="memory_peft_config",
        metavar="PATH",
        help="estimate the adapter this adapter_config.json (or adapter directory) describes: its method and "
        "every option peft honours",
    )
    for flag in PLAN_FLAGS:
        add_flag(g, flag)
    options = parser.add_argument_group("peft method options", "sizes and options of a method (see --method)")
    for flag in METHOD_FLAGS:
        add_flag(options, flag)
    objective = parser.add_argument_group("training objective", "the loss the step optimises (TRL's trainers)")
    for flag in OBJECTIVE_FLAGS:
        add_flag(objective, flag)
    g.add_argument(
        "--trace",
        dest="memory_trace",
        action="store_true",
        default=None,
        help="also simulate one real training step with fake tensors (slower, no GPU needed)",
    )


def add_flag(group: Any, flag: PlanFlag) -> None:
    """Add one plan flag to ``group`` (a parser or argument group); its value is ``args.<flag.dest>``."""
    options: dict[str, Any] = {
        "metavar": flag.metavar,
        "type": flag.parse,
        "choices": flag.choices,
        "action": flag.action,
    }
    group.add_argument(
        flag.flag,
        dest=flag.dest,
        default=None,
        help=flag.help.format(default=flag.shown_default()),
        **{k: v for k, v in options.items() if v is not None},
    )


def training_flags_given(args: argparse.Namespace) -> bool:
    """Whether any estimator flag (``--method``, ``--seq-len``, ...) was given."""
    # Identity checks: a given 0 (``--rank 0``) must count as given, to be refused by validation.
    return any(getattr(args, d, None) is not None and getattr(args, d) is not False for d in _DESTS)


def wants_trace(args: argparse.Namespace) -> bool:
    """Whether ``--trace`` was given."""
    return bool(getattr(args, "memory_trace", None))


def plans_from_args(args: argparse.Namespace, *, default_methods: str | None = None) -> list[TrainingPlan]:
    """One :class:`TrainingPlan` per method asked for; ``[]`` when no estimator flag was given.

    ``default_methods`` (comma-separated) are the methods when neither ``--method``
    nor ``--compare`` names one; given, there are plans even without a flag.
    ``args`` is only read. Raises :class:`~peftaudit.memory.plan.PlanError`
    (one line, exit 2 in the CLI) for flags that make no plan, e.g.
    ``--rank-pattern`` without ``=``.
    """
    if default_methods is None and not training_flags_given(args):
        return []
    fields: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    peft_config = getattr(args, "memory_peft_config", None)
    if peft_config:
        from peftaudit.memory.peft_config import plan_fields

        fields = plan_fields(peft_config)
        given_by = dict.fromkeys(fields, "--peft-config")
    for flag in ALL_PLAN_FLAGS:
        parsed = getattr(args, flag.dest, None)
        # An empty --targets "" is as if not given; an empty --stack "" is refused (parse_stack).
        if parsed is None or (parsed == "" and flag.field != "stack"):
            continue
        if flag.field in given_by:
            raise PlanError(f"give {given_by[flag.field]} or {flag.flag}, not both")
        given_by[flag.field] = flag.flag
        fields[flag.field] = flag.value(parsed)
    if fields.get("gpus", 1) > 1 and "sharding" not in fields:
        fields["sharding"] = "ddp"

    method = getattr(args, "memory_method", None)
    compare = _names(getattr(args, "memory_compare", None))
    if method and compare:
        raise PlanError("give --method or --compare, not both")
    if "method" in fields:  # from --peft-config, which names its method
        if method or compare:
            raise PlanError(f"give --peft-config or {'--method' if method else '--compare'}, not both")
        method = fields.pop("method")
    methods = compare or ((method,) if method else _names(default_methods or "lora"))
    plans = [TrainingPlan(method=m, **fields) for m in methods]
    spelling = {flag.field: flag.flag for flag in ALL_PLAN_FLAGS}
    for plan in plans:
        plan.validate(spelling)
        _refuse_unread(plan, given_by)
    return plans


def _refuse_unread(plan: TrainingPlan, given_by: dict[str, str]) -> None:
    """A flag given for an objective that does not read it, even at its default value (``validate`` sees only
    values): ``--vllm-memory 0.3`` without vllm-colocate generation is a mistake worth saying."""
    for name, flag in given_by.items():
        if name in OBJECTIVE_OPTIONS:
            plan.check_option_read(name, flag)
