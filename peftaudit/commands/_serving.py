"""The serving flags ``serve`` and ``gpus --serve`` share, named as vLLM names them, and the plan they make."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from peftaudit.commands._output import positive_float

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.serving.plan import ServingPlan

#: ``--quantization`` values: vLLM's names for what it loads, and ours (``bitsandbytes`` is nf4).
QUANTIZATIONS: dict[str, str] = {
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "int8": "int8",
    "bitsandbytes": "nf4",
    "mxfp4": "mxfp4",
}


def _count(text: str) -> int:
    """An argparse type: a whole number (0 and negatives pass, so the plan's check says which flag)."""
    try:
        return int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def add_serving_arguments(parser: argparse.ArgumentParser, *, adapters: bool) -> None:
    """The deployment's flags (vLLM's names where they mean the same), and the adapters' when ``adapters``."""
    from peftaudit.serving.plan import DTYPES, ENGINES, KV_CACHE_DTYPES

    group = parser.add_argument_group("serving (vLLM's flag names)")
    group.add_argument("--engine", choices=ENGINES, help="the serving engine (vllm)")
    group.add_argument(
        "--vllm-version",
        metavar="X.Y",
        help="follow this vLLM release's accounting (0.6 to 0.33; default: 0.8 to 0.19's, which published logs check)",
    )
    group.add_argument(
        "--context",
        "--max-model-len",
        dest="max_model_len",
        type=_count,
        metavar="TOKENS",
        help="tokens each sequence may reach (default: the model's maximum)",
    )
    group.add_argument(
        "--concurrency", type=_count, metavar="N", help="sequences served at once (default: the most that fit)"
    )
    group.add_argument(
        "--quantization",
        "-q",
        choices=tuple(QUANTIZATIONS),
        help="serve the weights quantized: awq, gptq (4-bit), fp8, int8 (W8A8), bitsandbytes (nf4), mxfp4 (MoE "
        "experts); "
        "default: as the checkpoint stores them",
    )
    group.add_argument("--group-size", type=_count, metavar="N", help="AWQ/GPTQ input features per scale (128)")
    group.add_argument("--dtype", choices=tuple(DTYPES), help="weights and activations (auto: the checkpoint's)")
    group.add_argument("--kv-cache-dtype", choices=tuple(KV_CACHE_DTYPES), help="KV cache (auto: the --dtype)")
    group.add_argument(
        "--gpu-memory-utilization",
        type=positive_float,
        metavar="F",
        help="share of each GPU vLLM may use (default: the release's, 0.9; 0.92 from 0.20)",
    )
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_count,
        metavar="N",
        help="GPUs one replica splits over (default: the fewest of 1, 2, 4, 8 that fit)",
    )
    group.add_argument("--max-num-seqs", type=_count, metavar="N", help="vLLM's cap on sequences in a batch")
    group.add_argument("--max-num-batched-tokens", type=_count, metavar="N", help="vLLM's tokens per step")
    group.add_argument("--block-size", type=_count, metavar="N", help="tokens per KV block (16)")
    group.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    if not adapters:
        return
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="a saved PEFT adapter (adapter_config.json + adapter_model.safetensors); repeatable",
    )
    lora.add_argument(
        "--adapters", type=_count, metavar="N", help="adapters to serve (default: 1, or one per --adapter)"
    )
    lora.add_argument("--max-loras", type=_count, metavar="N", help="adapters in one batch, each a GPU slot (1)")
    lora.add_argument(
        "--max-lora-rank", "--max-rank", type=_count, metavar="R", help="every slot's rank (16; --adapter: theirs)"
    )
    lora.add_argument("--max-cpu-loras", type=_count, metavar="N", help="adapters cached in host memory (--max-loras)")
    lora.add_argument("--targets", metavar="NAMES", help="the adapters' target modules, comma-separated")


#: The flags :func:`add_serving_arguments` adds (without the adapters'), by destination (the plan field of
#: the same name, but ``quantization``'s, ``precision``).
SERVING_FLAGS: dict[str, str] = {
    "engine": "--engine",
    "vllm_version": "--vllm-version",
    "max_model_len": "--context",
    "concurrency": "--concurrency",
    "quantization": "--quantization",
    "group_size": "--group-size",
    "dtype": "--dtype",
    "kv_cache_dtype": "--kv-cache-dtype",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "tensor_parallel_size": "--tensor-parallel-size",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "block_size": "--block-size",
    "enforce_eager": "--enforce-eager",
}

#: Plan field -> the flag that sets it, for messages.
SPELLING: dict[str, str] = {
    **SERVING_FLAGS,
    "precision": "--quantization",
    "adapters": "--adapters",
    "max_loras": "--max-loras",
    "max_lora_rank": "--max-lora-rank",
    "max_cpu_loras": "--max-cpu-loras",
}

#: Flags only the vLLM engine reads.
_VLLM_ONLY = (
    "vllm_version",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "enforce_eager",
)


def serving_flags_given(args: argparse.Namespace) -> list[str]:
    """The serving flags given on the command line (every one defaults to ``None``)."""
    return [flag for dest, flag in SERVING_FLAGS.items() if getattr(args, dest, None) is not None]


def serving_plan(args: argparse.Namespace) -> ServingPlan:
    """The :class:`~peftaudit.serving.plan.ServingPlan` the flags describe, checked."""
    from peftaudit.serving.plan import AdapterPlan, ServingPlan

    adapters = None
    paths = tuple(getattr(args, "adapter", None) or ())
    wants_adapters = any(
        getattr(args, name, None) is not None
        for name in ("adapters", "max_loras", "max_lora_rank", "max_cpu_loras", "targets")
    )
    if paths or wants_adapters:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
        max_loras = args.max_loras if args.max_loras is not None else 1
        adapters = AdapterPlan(
            count=args.adapters if args.adapters is not None else max(1, len(paths)),
            max_loras=max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            targets=targets,
            paths=paths,
        )
    defaults = ServingPlan()
    plan = ServingPlan(
        engine=args.engine or defaults.engine,
        precision=QUANTIZATIONS[args.quantization] if args.quantization else defaults.precision,
        group_size=args.group_size if args.group_size is not None else defaults.group_size,
        dtype=args.dtype or defaults.dtype,
        kv_cache_dtype=args.kv_cache_dtype or defaults.kv_cache_dtype,
        max_model_len=args.max_model_len,
        concurrency=args.concurrency,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size if args.block_size is not None else defaults.block_size,
        enforce_eager=bool(args.enforce_eager),
        vllm_version=args.vllm_version,
        adapters=adapters,
    )
    plan.validate(SPELLING)
    if plan.engine != "vllm":
        vllm_only = [SERVING_FLAGS[name] for name in _VLLM_ONLY if getattr(args, name, None) is not None]
        if vllm_only:
            from peftaudit.serving.plan import ServingPlanError

            verb = "applies" if len(vllm_only) == 1 else "apply"
            raise ServingPlanError(f"{', '.join(vllm_only)} {verb} to --engine vllm only")
    return plan
