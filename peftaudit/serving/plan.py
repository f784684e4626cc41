"""The serving plan: everything about a deployment that decides its memory, with vLLM's defaults.

A :class:`ServingPlan` is plain, frozen data. Its fields carry vLLM's engine
argument names where they mean the same thing (``gpu_memory_utilization``,
``tensor_parallel_size``, ``max_model_len``, ``kv_cache_dtype``,
``max_num_seqs``, ``block_size``), so a plan reads like the ``vllm serve``
command it sizes, and its defaults are vLLM's (``vllm/engine/arg_utils.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.serving.weights import PRECISIONS


class ServingPlanError(PeftauditError):
    """A serving plan that cannot be sized (context 0, utilisation above 1, an unknown engine...)."""


#: ``vllm``: vLLM's own start-up accounting (:mod:`peftaudit.serving.engine`); ``transformers``:
#: ``generate`` with a dynamic cache, every sequence's cache at full length.
ENGINES: tuple[str, ...] = ("vllm", "transformers")

#: vLLM's ``--kv-cache-dtype`` values (``auto``: the model's dtype), and ours for the same thing.
KV_CACHE_DTYPES: dict[str, str | None] = {
    "auto": None,
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "fp8": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
}

#: vLLM's ``--dtype`` values; ``auto`` is the checkpoint's ``torch_dtype`` (float32 served as bf16).
DTYPES: dict[str, str | None] = {
    "auto": None,
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
}


@dataclass(frozen=True)
class AdapterPlan:
    """LoRA adapters served on the base, unmerged, as vLLM's ``--enable-lora`` serves them."""

    count: int = 1
    """Adapters to serve (merged: one full model each)."""
    max_loras: int = 1
    """vLLM ``--max-loras``: adapters in one batch, each a GPU slot."""
    max_lora_rank: int | None = None
    """vLLM ``--max-lora-rank``: every slot is allocated at this rank (``None``: the smallest vLLM accepts
    for the saved adapters' ranks, else vLLM's default 16)."""
    max_cpu_loras: int | None = None
    """vLLM ``--max-cpu-loras`` (``None``: ``max_loras``): adapters cached in host memory."""
    targets: tuple[str, ...] | None = None
    """The adapters' target modules (``None``: every module vLLM supports for the model)."""
    paths: tuple[str, ...] = ()
    """Saved adapter directories (``--adapter``), read for their rank, targets and bytes."""


@dataclass(frozen=True)
class ServingPlan:
    """One deployment of a model: engine, precision, cache, context, concurrency and GPUs."""

    engine: str = "vllm"
    precision: str = "auto"
    """Weights: ``auto`` (the checkpoint's own), ``bf16``, ``fp16``, ``fp8``, ``int8``, ``awq``, ``gptq``, ``nf4``."""
    group_size: int = 128
    """Input features per scale for ``awq`` and ``gptq``."""
    dtype: str = "auto"
    """vLLM ``--dtype``: what the unquantized weights and activations run in."""
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    """The context each sequence may reach (``--context``); ``None``: the model's own maximum."""
    concurrency: int | None = None
    """Sequences served at once (``--concurrency``); ``None``: the most that fit."""
    gpu_memory_utilization: float | None = None
    """vLLM ``--gpu-memory-utilization``; ``None``: the release's default (0.9; 0.92 from 0.20)."""
    tensor_parallel_size: int | None = None
    """GPUs one replica splits over; ``None``: the fewest that fit (1, 2, 4, 8)."""
    max_num_seqs: int | None = None
    """vLLM ``--max-num-seqs``; ``None``: the engine version's default."""
    max_num_batched_tokens: int | None = None
    """vLLM ``--max-num-batched-tokens``; ``None``: the engine version's default."""
    block_size: int = 16
    enforce_eager: bool = False
    """vLLM ``--enforce-eager``: no CUDA graphs (none captured, none accounted)."""
    vllm_version: str | None = None
    """Which vLLM release's accounting to follow (``None``: :data:`peftaudit.serving.engine.DEFAULT_RELEASE`,
    the 0.8 to 0.19 range the published logs check)."""
    adapters: AdapterPlan | None = None

    def with_(self, **changes: Any) -> ServingPlan:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.adapters is not None:
            adapters = {f.name: getattr(self.adapters, f.name) for f in fields(self.adapters)}
            adapters["targets"] = None if self.adapters.targets is None else list(self.adapters.targets)
            adapters["paths"] = list(self.adapters.paths)
            data["adapters"] = adapters
        return data

    def validate(self, spelling: Mapping[str, str] | None = None) -> None:
        """Raise :class:`ServingPlanError` for a plan that makes no sense on any model.

        ``spelling``: how the caller names fields in messages (the CLI passes its flags).
        """
        names = spelling or {}

        def name(field: str) -> str:
            return names.get(field, field)

        _one_of(name("engine"), self.engine, ENGINES)
        _one_of(name("precision"), self.precision, PRECISIONS)
        _one_of(name("kv_cache_dtype"), self.kv_cache_dtype, tuple(KV_CACHE_DTYPES))
        _one_of(name("dtype"), self.dtype, tuple(DTYPES))
        for field in ("max_model_len", "concurrency", "tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ServingPlanError(f"{name(field)} must be at least 1, got {value}")
        if self.block_size < 1:
            raise ServingPlanError(f"{name('block_size')} must be at least 1, got {self.block_size}")
        if self.group_size < 1:
            raise ServingPlanError(f"{name('group_size')} must be at least 1, got {self.group_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ServingPlanError(
                f"{name('gpu_memory_utilization')} must be above 0 and at most 1, got {self.gpu_memory_utilization}"
            )
        from peftaudit.serving.engine import release

        release(self.vllm_version)  # a release we do not model is refused here, before any model is read
        if self.adapters is not None:
            a = self.adapters
            counts = (("adapters", a.count), ("max_loras", a.max_loras), ("max_lora_rank", a.max_lora_rank))
            for field, value in counts:
                if value is not None and value < 1:
                    raise ServingPlanError(f"{name(field)} must be at least 1, got {value}")
            if a.max_cpu_loras is not None and a.max_cpu_loras < a.max_loras:
                # vLLM's LoRAConfig: max_cpu_loras must be >= max_loras (vllm/config/lora.py).
                raise ServingPlanError(
                    f"{name('max_cpu_loras')} ({a.max_cpu_loras}) must be at least {name('max_loras')} ({a.max_loras})"
                )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ServingPlanError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")


__all__ = ["DTYPES", "ENGINES", "KV_CACHE_DTYPES", "AdapterPlan", "ServingPlan", "ServingPlanError"]
