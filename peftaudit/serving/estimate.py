"""A serving plan on one GPU model: the memory terms, what fits, and how many GPUs it takes.

:func:`estimate_serving` follows the plan's engine (:mod:`peftaudit.serving.engine` says how each divides a
GPU) and returns a :class:`ServingEstimate` for one GPU of a tensor-parallel group; :func:`size_serving` tries
1, 2, 4 and 8 GPUs when the plan leaves the count open. Every figure is per GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from peftaudit.errors import PeftauditError
from peftaudit.memory.dtypes import nbytes
from peftaudit.serving import engine as engines
from peftaudit.serving.adapters import (
    DEFAULT_MAX_LORA_RANK,
    EXTRA_VOCAB,
    AdapterFile,
    LoraSlots,
    break_even,
    lora_slots,
    read_adapter,
    vllm_max_lora_rank,
)
from peftaudit.serving.kv_cache import LayerCache, kv_bytes_per_token, kv_heads_split, layer_caches, sequence_bytes
from peftaudit.serving.plan import DTYPES, KV_CACHE_DTYPES, ServingPlan
from peftaudit.serving.weights import ServingWeights, serving_weights

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

#: Tensor-parallel sizes tried when the plan leaves the GPU count open (one node).
GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class AdapterMemory:
    """What serving the plan's adapters takes, unmerged and merged."""

    count: int
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    slot_bytes: int
    """Unmerged: the GPU slots on each GPU (vLLM: every supported module at ``max_lora_rank``)."""
    slot_modules: tuple[str, ...]
    adapter_bytes: int
    """One adapter's own weights (read from ``--adapter``, else its targets at ``max_lora_rank``)."""
    host_bytes: int
    """Adapters cached in host memory (``max_cpu_loras`` x one adapter)."""
    merged_bytes: int
    """Merged: one full model per adapter (each copy as large as the weights on one GPU of the group)."""
    break_even: int
    """Adapters from which merged copies take more GPU memory than one base with slots."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServingEstimate:
    """One GPU of a serving deployment: its memory terms and capacity (bytes are per GPU)."""

    model: str
    engine: str
    release: str | None
    """The vLLM accounting followed (``0.11``), ``None`` for transformers."""
    gpu: str
    total_bytes: int
    tensor_parallel: int
    max_model_len: int
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    block_size: int
    gpu_memory_utilization: float
    weights_label: str
    dtype: str
    kv_cache_dtype: str
    weights_bytes: int
    """Weights on this GPU, with vLLM's rotary cache (both are in its "Model loading took")."""
    lora_bytes: int
    activation_bytes: int
    """The start-up profile's peak (vLLM) or the prefill's (transformers)."""
    forward_bytes: int
    """vLLM: the profile's forward (``max_num_batched_tokens`` tokens at the decoder's widest point)."""
    sampler_bytes: int
    """vLLM: the profile's sampler run (``max_num_seqs`` rows of logits); the activation peak is the larger."""
    non_torch_bytes: int
    """vLLM: non-torch memory charged to the budget; transformers: the CUDA context taken before anything."""
    cuda_graph_bytes: int
    """vLLM's CUDA graphs (0 with ``enforce_eager``), in the budget only when ``graphs_budgeted``."""
    graphs_budgeted: bool
    requested_bytes: int
    """What the engine may use: total x utilization (vLLM), the total less the CUDA context (transformers)."""
    kv_cache_bytes: int
    """Left for the KV cache (negative: the engine does not start)."""
    kv_bytes_per_token: int
    """One more token of context, every layer (no window full yet), on this GPU."""
    sequence_bytes: int
    """One sequence at ``max_model_len`` on this GPU (sliding layers at their window)."""
    blocks: int
    kv_cache_tokens: int
    """vLLM's "GPU KV cache size" (its own rule for the release); transformers: tokens of full sequences."""
    max_concurrency: float
    """Sequences of ``max_model_len`` the cache holds at once (vLLM's "Maximum concurrency")."""
    concurrency: int | None
    """The plan's concurrency, if it gave one."""
    max_context: int | None
    """The longest context the plan's concurrency fits (``None`` without ``concurrency``)."""
    kv_heads_per_gpu: int
    kv_heads_divide: bool
    starts: bool
    """The engine starts: the KV cache holds at least one request of ``max_model_len``."""
    fits: bool
    """It starts and holds ``concurrency`` sequences (or one) of ``max_model_len``."""
    headroom_bytes: int
    """KV cache left after ``concurrency`` sequences (vLLM), GPU memory left (transformers)."""
    adapters: AdapterMemory | None = None
    notes: tuple[str, ...] = ()

    @property
    def served_concurrency(self) -> int:
        """Sequences served at once: what the cache holds, at most ``max_num_seqs`` (vLLM schedules no more)."""
        held = math.floor(self.max_concurrency)
        return held if self.max_num_seqs is None else min(held, self.max_num_seqs)

    def to_dict(self) -> dict[str, Any]:
        """Every field, and ``served_concurrency``: what ``peftaudit serve --format json`` prints."""
        data = asdict(self)
        data["served_concurrency"] = self.served_concurrency
        return data


@dataclass(frozen=True)
class _Model:
    """What an estimate reads of the model once, whatever the plan's GPU count."""

    inventory: Inventory
    weights: ServingWeights
    caches: tuple[LayerCache, ...]
    dtype: str
    kv_dtype: str
    context_limit: int
    adapters: _AdapterSetup | None = None
    """The plan's adapters: their files read and their slots laid out once."""


@dataclass(frozen=True)
class _AdapterSetup:
    """What the plan's adapters take whatever the GPU count (:meth:`LoraSlots.per_gpu` splits the slots)."""

    rank: int
    slots: LoraSlots
    adapter_bytes: int
    host_adapter_bytes: int
    """One adapter as the host cache holds it (``lora_dtype``)."""
    notes: tuple[str, ...]


def estimate_serving(
    inventory: Inventory, plan: ServingPlan, *, gpu: str, total_bytes: int, model: str = ""
) -> ServingEstimate:
    """``plan`` on one GPU of ``total_bytes`` (its tensor-parallel size, 1 unless given)."""
    plan.validate()
    prepared = _prepare(inventory, plan)
    return _estimate(prepared, plan, gpu=gpu, total_bytes=total_bytes, model=model)


def size_serving(
    inventory: Inventory, plan: ServingPlan, *, gpu: str, total_bytes: int, model: str = ""
) -> ServingEstimate:
    """The fewest GPUs (of :data:`GPU_COUNTS`) whose tensor-parallel group fits ``plan``; the plan's own
    ``tensor_parallel_size`` when it gives one. The largest count is returned when none fits."""
    return rank_gpus(inventory, plan, [(gpu, total_bytes)], model=model)[0]


def rank_gpus(
    inventory: Inventory, plan: ServingPlan, gpus: Sequence[tuple[str, int]], *, model: str = ""
) -> list[ServingEstimate]:
    """:func:`size_serving` on each of ``gpus`` (name, total bytes), reading the model once."""
    plan.validate()
    prepared = _prepare(inventory, plan)
    return [_smallest(prepared, plan, gpu=name, total_bytes=total, model=model) for name, total in gpus]


def _smallest(m: _Model, plan: ServingPlan, *, gpu: str, total_bytes: int, model: str) -> ServingEstimate:
    if plan.tensor_parallel_size is not None:
        return _estimate(m, plan, gpu=gpu, total_bytes=total_bytes, model=model)
    heads = m.inventory.dims.num_attention_heads or 1
    counts = [n for n in GPU_COUNTS if heads % n == 0] or [1]
    result = None
    for n in counts:
        result = _estimate(m, plan.with_(tensor_parallel_size=n), gpu=gpu, total_bytes=total_bytes, model=model)
        if result.fits:
            return result
    assert result is not None
    note = (
        f"no tensor-parallel group of up to {counts[-1]} {gpu} GPUs fits (more GPUs take pipeline parallelism "
        "across nodes, which is not sized here)"
    )
    return replace(result, notes=(*result.notes, note))


def _prepare(inventory: Inventory, plan: ServingPlan) -> _Model:
    caches = layer_caches(inventory, plan.engine)
    weights = serving_weights(inventory, plan.precision, group_size=plan.group_size)
    dtype = DTYPES[plan.dtype] or (weights.dense_dtype if weights.dense_dtype in ("bf16", "fp16") else "bf16")
    kv_dtype = KV_CACHE_DTYPES[plan.kv_cache_dtype] or dtype
    limit = inventory.dims.max_position_embeddings or 2048
    return _Model(inventory, weights, caches, dtype, kv_dtype, limit, _adapter_setup(inventory, plan, dtype))


def _estimate(m: _Model, plan: ServingPlan, *, gpu: str, total_bytes: int, model: str) -> ServingEstimate:
    tp = plan.tensor_parallel_size or 1
    heads = m.inventory.dims.num_attention_heads or 1
    if heads % tp:
        # vLLM's ModelConfig.verify_with_parallel_config: "Total number of attention heads (H) must be divisible
        # by tensor parallel size (T)."
        raise PeftauditError(
            f"{heads} attention heads do not divide over {tp} GPUs "
            "(vLLM requires --tensor-parallel-size to divide them)"
        )
    max_model_len = plan.max_model_len or m.context_limit
    notes: list[str] = []
    if max_model_len > m.context_limit:
        notes.append(
            f"--max-model-len {max_model_len:,} is past the model's {m.context_limit:,} positions (vLLM refuses it "
            "unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)"
        )
    kv_heads, divide = kv_heads_split(m.caches, tp)
    if not divide:
        notes.append(
            f"the KV heads do not divide over {tp} GPUs: each GPU keeps {kv_heads} (vLLM replicates them), "
            "so the cache does not shrink with more GPUs past the head count"
        )
    adapters = _adapters(m, plan, tp)
    lora = adapters.slot_bytes if adapters is not None else 0
    weights = m.weights.per_gpu(tp)
    kv = nbytes(m.kv_dtype)
    layers = [c for c in m.caches if c.layer >= 0]  # vLLM's group padding is no layer of the model
    per_token = kv_bytes_per_token(layers, kv, tp)
    seq = sequence_bytes(layers, max_model_len, kv, tp)
    common: dict[str, Any] = dict(
        model=model,
        gpu=gpu,
        total_bytes=total_bytes,
        tensor_parallel=tp,
        max_model_len=max_model_len,
        block_size=plan.block_size,
        weights_label=m.weights.label,
        dtype=m.dtype,
        kv_cache_dtype=m.kv_dtype,
        lora_bytes=lora,
        kv_bytes_per_token=per_token,
        sequence_bytes=seq,
        concurrency=plan.concurrency,
        kv_heads_per_gpu=kv_heads,
        kv_heads_divide=divide,
        adapters=adapters,
    )
    if plan.engine == "vllm":
        return _vllm(m, plan, common, weights, notes)
    return _transformers(m, plan, common, weights, notes)


def _vllm(m: _Model, plan: ServingPlan, common: dict[str, Any], weights: int, notes: list[str]) -> ServingEstimate:
    rel = engines.release(plan.vllm_version)
    tp = common["tensor_parallel"]
    total = common["total_bytes"]
    util = plan.gpu_memory_utilization if plan.gpu_memory_utilization is not None else rel.default_utilization
    weights += engines.rotary_cache_bytes(m.inventory, m.dtype)
    block_size = plan.block_size
    if rel.v1 and any(c.kind == "mla" for c in m.caches):
        block_size = engines.mla_block_size(common["gpu"], plan.block_size)
        if block_size != plan.block_size:
            notes.append(f"vLLM forces {block_size}-token blocks for an MLA model on {common['gpu']}")
            common["block_size"] = block_size
    layout = engines.block_layout(
        m.caches, block_size=block_size, kv_bytes=nbytes(m.kv_dtype), tensor_parallel=tp, v1=rel.v1
    )

    requested = math.ceil(total * util)
    non_torch = rel.non_torch_bytes + (rel.non_torch_parallel_bytes if tp > 1 else 0)
    graphs = 0 if plan.enforce_eager else rel.cuda_graph_bytes
    budgeted_graphs = graphs if rel.graphs_budgeted else 0

    def at(length: int) -> tuple[engines.ProfileShape, int, int, int, engines.CacheCapacity]:
        shape = engines.profile_shape(
            rel,
            gpu=common["gpu"],
            total_bytes=total,
            max_model_len=length,
            max_num_seqs=plan.max_num_seqs,
            max_num_batched_tokens=plan.max_num_batched_tokens,
        )
        forward, sampler = engines.profile_activation(m.inventory, shape, rel, dtype=m.dtype, tensor_parallel=tp)
        kv_bytes = requested - weights - common["lora_bytes"] - max(forward, sampler) - non_torch - budgeted_graphs
        capacity = engines.cache_capacity(
            layout, kv_bytes, rel, max_model_len=length, block_size=block_size, scheduled=shape.tokens
        )
        return shape, forward, sampler, kv_bytes, capacity

    length = common["max_model_len"]
    shape, forward, sampler, kv_bytes, capacity = at(length)
    blocks, per_request, tokens, max_concurrency = (
        capacity.blocks,
        capacity.per_request,
        capacity.tokens,
        capacity.max_concurrency,
    )
    starts = kv_bytes > 0 and blocks >= per_request
    wanted = plan.concurrency or 1
    if plan.concurrency is not None and plan.concurrency > shape.seqs:
        notes.append(
            f"--concurrency {plan.concurrency} is above --max-num-seqs {shape.seqs}: vLLM schedules at most "
            f"{shape.seqs} sequences at once (raise --max-num-seqs)"
        )
    fits = starts and blocks >= wanted * per_request and wanted <= shape.seqs
    headroom = (blocks - wanted * per_request) * layout.block_bytes
    max_context = None
    if plan.concurrency is not None:

        def holds(n: int) -> bool:
            held = at(n)[4]
            return held.blocks >= wanted * held.per_request

        max_context = _longest(holds, block_size, m.context_limit)
    if not plan.enforce_eager and not rel.graphs_budgeted:
        outside = total - requested
        notes.append(
            f"CUDA graphs (about {graphs / 2**30:.2f} GiB) are captured after the KV cache, out of the "
            f"{outside / 2**30:.2f} GiB of the GPU left outside --gpu-memory-utilization"
            + ("" if outside >= graphs else ": too little, so capturing them may run out of memory (--enforce-eager)")
        )
    return ServingEstimate(
        engine="vllm",
        release=rel.name,
        max_num_seqs=shape.seqs,
        max_num_batched_tokens=shape.tokens,
        gpu_memory_utilization=util,
        weights_bytes=weights,
        activation_bytes=max(forward, sampler),
        forward_bytes=forward,
        sampler_bytes=sampler,
        non_torch_bytes=non_torch,
        cuda_graph_bytes=graphs,
        graphs_budgeted=rel.graphs_budgeted,
        requested_bytes=requested,
        kv_cache_bytes=kv_bytes,
        blocks=blocks,
        kv_cache_tokens=tokens,
        max_concurrency=max_concurrency,
        max_context=max_context,
        starts=starts,
        fits=fits,
        headroom_bytes=headroom,
        notes=tuple(notes),
        **common,
    )


def _transformers(
    m: _Model, plan: ServingPlan, common: dict[str, Any], weights: int, notes: list[str]
) -> ServingEstimate:
    """``generate`` with a dynamic cache: the weights, every sequence's cache at full length and the prefill's
    activations (the decoder's widest point over every prompt token, then the last position's logits in fp32)
    within the GPU's total less the CUDA context (the training estimate's default, 1 GiB)."""
    from peftaudit.memory.plan import TrainingPlan

    tp = common["tensor_parallel"]
    context_bytes = TrainingPlan().cuda_context_bytes
    total = common["total_bytes"] - context_bytes
    caches = [c for c in m.caches if c.layer >= 0]
    kv = nbytes(m.kv_dtype)
    vocab = m.inventory.dims.vocab_size or 0
    live = engines.decoder_live_elements(m.inventory, tp)

    def need(rows: int, length: int) -> tuple[int, int]:
        activation = rows * length * live * nbytes(m.dtype) + rows * vocab * (nbytes(m.dtype) + 4)
        return activation, weights + common["lora_bytes"] + rows * sequence_bytes(caches, length, kv, tp) + activation

    length = common["max_model_len"]
    wanted = plan.concurrency or 1
    activation, used = need(wanted, length)
    fits = used <= total
    most = _largest(lambda n: need(n, length)[1] <= total)
    max_context = None
    if plan.concurrency is not None:
        max_context = _longest(lambda n: need(wanted, n)[1] <= total, 1, m.context_limit)
    kv_bytes = total - weights - common["lora_bytes"] - activation
    return ServingEstimate(
        engine="transformers",
        release=None,
        max_num_seqs=None,
        max_num_batched_tokens=None,
        gpu_memory_utilization=1.0,
        weights_bytes=weights,
        activation_bytes=activation,
        forward_bytes=activation,
        sampler_bytes=0,
        non_torch_bytes=context_bytes,
        cuda_graph_bytes=0,
        graphs_budgeted=False,
        requested_bytes=total,
        kv_cache_bytes=kv_bytes,
        blocks=0,
        kv_cache_tokens=most * length,
        max_concurrency=float(most),
        max_context=max_context,
        starts=need(1, length)[1] <= total,
        fits=fits,
        headroom_bytes=total - used,
        notes=tuple(notes),
        **common,
    )


def _largest(ok: Any) -> int:
    """The largest n >= 0 with ``ok(n)`` (monotone: true up to some n, false after)."""
    if not ok(1):
        return 0
    low, high = 1, 2
    while ok(high):
        low, high = high, high * 2
        if high > 1 << 40:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def _longest(ok: Any, step: int, limit: int) -> int:
    """The longest context, in multiples of ``step`` up to ``limit``, with ``ok``; 0 when none."""
    top = limit // step
    if top < 1 or not ok(step):
        return 0
    if ok(top * step):
        return top * step
    low, high = 1, top
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid * step) else (low, mid)
    return low * step


def _adapter_setup(inventory: Inventory, plan: ServingPlan, dtype: str) -> _AdapterSetup | None:
    a = plan.adapters
    if a is None:
        return None
    files = [read_adapter(p) for p in a.paths]
    targets = a.targets
    rank = a.max_lora_rank if a.max_lora_rank is not None else DEFAULT_MAX_LORA_RANK
    if files:
        needed = max(f.max_rank for f in files)
        if a.max_lora_rank is None:
            rank = vllm_max_lora_rank(needed)
        elif needed > rank:
            # vLLM refuses such an adapter when it loads it (lora/peft_helper.py: "LoRA rank ... is greater
            # than max_lora_rank").
            raise PeftauditError(f"an adapter of rank {needed} does not fit --max-lora-rank {rank}")
        if targets is None:
            targets = tuple(sorted({k for f in files for k in f.module_kinds}))
    notes: list[str] = []
    if plan.engine == "vllm":
        # vLLM wraps every supported module at start-up, before any adapter is known (lora/models.py).
        slots = lora_slots(inventory, max_loras=a.max_loras, max_lora_rank=rank, dtype=dtype)
        notes.append(
            f"vLLM allocates {a.max_loras} slot(s) at rank {rank} for every module it supports "
            f"({', '.join(slots.modules)}), whatever the adapters target"
        )
        notes.extend(slots.notes)
    else:
        slots = lora_slots(inventory, max_loras=a.count, max_lora_rank=rank, dtype=dtype, targets=targets)
    # One adapter's own factors (not the vocabulary rows vLLM adds to the base), in the serving dtype, as
    # vLLM's CPU cache holds them (lora_dtype); a saved file's own bytes when given (peft saves fp32).
    one = lora_slots(inventory, max_loras=1, max_lora_rank=rank, dtype=dtype, targets=targets)
    own = sum(b for kind, b in one.breakdown(1) if kind != EXTRA_VOCAB)
    notes.append(
        "unmerged adapters cost throughput: each batch runs the LoRA kernels (punica) next to the base's "
        "matmuls, more so with many distinct adapters in one batch; merged copies run at the base's speed"
    )
    return _AdapterSetup(
        rank=rank,
        slots=slots,
        adapter_bytes=max(f.tensor_bytes for f in files) if files else own,
        host_adapter_bytes=max(_in_dtype(f, dtype) for f in files) if files else own,
        notes=tuple(notes),
    )


def _adapters(m: _Model, plan: ServingPlan, tp: int) -> AdapterMemory | None:
    a, setup = plan.adapters, m.adapters
    if a is None or setup is None:
        return None
    slot_bytes = setup.slots.per_gpu(tp)
    cpu = a.max_cpu_loras or a.max_loras
    weights = m.weights.per_gpu(tp)
    return AdapterMemory(
        count=a.count,
        max_loras=a.max_loras,
        max_lora_rank=setup.rank,
        max_cpu_loras=cpu,
        slot_bytes=slot_bytes,
        slot_modules=setup.slots.modules,
        adapter_bytes=setup.adapter_bytes,
        host_bytes=cpu * setup.host_adapter_bytes,
        merged_bytes=a.count * weights,
        break_even=break_even(weights, slot_bytes),
        notes=setup.notes,
    )


def _in_dtype(adapter: AdapterFile, dtype: str) -> int:
    """An adapter's bytes once cast to ``dtype`` (vLLM's ``lora_dtype``); a file of mixed dtypes as saved."""
    if "+" in adapter.dtype:
        return adapter.tensor_bytes
    return adapter.tensor_bytes // nbytes(adapter.dtype) * nbytes(dtype)


__all__ = ["GPU_COUNTS", "AdapterMemory", "ServingEstimate", "estimate_serving", "rank_gpus", "size_serving"]
