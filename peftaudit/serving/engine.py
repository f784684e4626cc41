"""How a serving engine divides one GPU: weights, what its start-up profile measures, and the KV cache.

vLLM sizes its KV cache once, at start-up, on each GPU (``determine_available_memory``)::

    requested = total memory x gpu_memory_utilization
    kv cache  = requested - weights - activation peak - non-torch memory [- CUDA graphs, from 0.20]
    blocks    = kv cache // page bytes // layers per group
    tokens    = blocks x block_size                      (the "GPU KV cache size" line)

:class:`VllmRelease` holds what changed between releases (the defaults, where CUDA graphs are
charged, how the token count is printed); ``docs/serving.md`` cites the code of each. Weights and
the cache's page arithmetic are exact; the activation peak, non-torch memory and CUDA graphs are
*measured* by vLLM at start-up, so here they are modelled: the activation peak from the profile run
vLLM does (:func:`profile_activation`), the other two by constants read off published start-up logs
(``tests/serving/data/vllm_startup_logs.json``, which the tests match).

``transformers``' ``generate`` has no such accounting: the model's weights, every sequence's
dynamic cache at full length and the prefill's activations must fit the GPU's total.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from peftaudit.errors import PeftauditError
from peftaudit.inventory import text_config
from peftaudit.memory.dtypes import nbytes
from peftaudit.serving.kv_cache import LayerCache, sequence_bytes
from peftaudit.units import GIB

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory


@dataclass(frozen=True)
class VllmRelease:
    """The accounting of a range of vLLM releases (``docs/serving.md`` cites each rule)."""

    name: str
    """What ``--vllm-version`` takes (``0.6``, ``0.11``, ``0.20``)."""
    covers: str
    """The releases that share this accounting, in words."""
    v1: bool
    """The V1 engine: hybrid KV-cache groups, ``--max-num-batched-tokens`` defaults by GPU."""
    default_utilization: float
    graphs_budgeted: bool
    """CUDA graph memory is estimated and taken out of the budget before the KV cache (0.20 on);
    before, graphs are captured after the cache, out of the ``1 - utilization`` headroom."""
    tokens_from_concurrency: bool
    """The "GPU KV cache size" line prints ``int(max concurrency x max_model_len)`` (0.21 on) instead of
    ``blocks // groups x block_size``."""
    sampler_bytes_per_logit: float
    """Bytes the profile's sampler run holds per logit of its ``max_num_seqs x vocabulary`` batch."""
    non_torch_bytes: int
    """Non-torch memory charged to the budget on one GPU (NCCL, cuBLAS workspace, attention buffers)."""
    non_torch_parallel_bytes: int
    """What tensor parallelism adds to it on each GPU (custom all-reduce buffers)."""
    cuda_graph_bytes: int
    """CUDA graph memory per GPU (graphs for batch sizes up to ``max_num_seqs``): the median of the published
    logs' "Graph capturing finished ... took X GiB" (V0 0.24 to 0.39 GiB, V1 0.50 to 1.28 GiB)."""
    huge_gpu_tier: bool = False
    """0.28 on: GPUs of 160 GiB or more default to 16,384 tokens a step for ``vllm serve`` too."""


#: V0 (0.6.x, 0.7.x): NCCL is charged to the budget (its snapshot is taken before NCCL starts); the sampler
#: sorts the fp32 logits for top-k/top-p with int64 indices (sampler.py ``_apply_top_k_top_p``): 38.5 bytes per
#: logit fit opt-125m, Llama-3.2-1B and Meta-Llama-3-8B's logged peaks (38.3 to 41.2). Non-torch: the median of
#: the V0 logs (0.15 to 1.79 GiB).
V0 = VllmRelease(
    name="0.6",
    covers="vLLM 0.6.x and 0.7.x (the V0 engine)",
    v1=False,
    default_utilization=0.9,
    graphs_budgeted=False,
    tokens_from_concurrency=False,
    sampler_bytes_per_logit=38.5,
    non_torch_bytes=int(0.35 * GIB),
    non_torch_parallel_bytes=0,
    cuda_graph_bytes=int(0.3 * GIB),
)
#: V1 up to 0.19: NCCL starts before the memory snapshot (outside the budget); FlashInfer's sampler (no sort)
#: keeps the bf16 logits, their fp32 copy and the fp32 probabilities, 10 bytes a logit. Non-torch 0.19 GiB on one
#: GPU and 0.12 GiB more under tensor parallelism: what the A100 logs of vLLM 0.10.1.1 leave once the profile's
#: activations are taken out (0.55 GiB at TP 1, 0.67 GiB at TP 2).
V1 = VllmRelease(
    name="0.11",
    covers="vLLM 0.8 to 0.19 (the V1 engine, CUDA graphs outside the budget)",
    v1=True,
    default_utilization=0.9,
    graphs_budgeted=False,
    tokens_from_concurrency=False,
    sampler_bytes_per_logit=10.0,
    non_torch_bytes=int(0.19 * GIB),
    non_torch_parallel_bytes=int(0.12 * GIB),
    cuda_graph_bytes=int(0.65 * GIB),
)
#: 0.20: the default utilization rose to 0.92 and the CUDA graph estimate comes out of the budget.
V1_GRAPHS = replace(
    V1,
    name="0.20",
    covers="vLLM 0.20 (CUDA graph memory estimated and taken out of the budget)",
    default_utilization=0.92,
    graphs_budgeted=True,
)
#: 0.21 to 0.27: the "GPU KV cache size" line prints max concurrency x max_model_len (kv_cache_utils.py).
V1_CONCURRENCY_TOKENS = replace(
    V1_GRAPHS,
    name="0.21",
    covers="vLLM 0.21 to 0.27 (graphs in the budget, KV tokens printed as concurrency x max_model_len)",
    tokens_from_concurrency=True,
)
#: 0.28 to 0.33: a third tier of defaults for GPUs of 160 GiB or more (arg_utils.py).
V1_HUGE_TIER = replace(
    V1_CONCURRENCY_TOKENS,
    name="0.28",
    covers="vLLM 0.28 to 0.33 (as 0.21, and 16,384 tokens a step on GPUs of 160 GiB or more)",
    huge_gpu_tier=True,
)

RELEASES: dict[str, VllmRelease] = {r.name: r for r in (V0, V1, V1_GRAPHS, V1_CONCURRENCY_TOKENS, V1_HUGE_TIER)}
#: The release whose accounting a plan follows unless it names one: the newest V1 range the published logs
#: check (0.10 to 0.13).
DEFAULT_RELEASE = V1.name


def release(name: str | None) -> VllmRelease:
    """The accounting for ``--vllm-version`` ``name`` (``None``: :data:`DEFAULT_RELEASE`); a release number
    such as ``0.10.1`` picks the range it falls in."""
    if name is None:
        return RELEASES[DEFAULT_RELEASE]
    parts = name.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise PeftauditError(f"--vllm-version takes a release number like 0.11 or 0.10.1, not {name!r}") from None
    if (major, minor) < (0, 6):
        raise PeftauditError(f"vLLM {name} is older than the releases modelled (0.6 on)")
    if (major, minor) < (0, 8):
        return V0
    if (major, minor) < (0, 20):
        return V1
    if (major, minor) < (0, 21):
        return V1_GRAPHS
    if (major, minor) < (0, 28):
        return V1_CONCURRENCY_TOKENS
    if (major, minor) < (0, 34):
        return V1_HUGE_TIER
    raise PeftauditError(
        f"vLLM {name}'s extensible KV cache (0.34 on: block size 64, utilization 1.0, the cache sized after "
        "warm-up) is not modelled yet; --vllm-version 0.33 sizes the previous accounting"
    )


# --- the profile run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileShape:
    """What vLLM's start-up profile runs: a forward of ``tokens`` tokens over ``seqs`` requests, then the
    sampler on one logit row per request."""

    tokens: int
    """``max_num_batched_tokens``: tokens in the profile's forward."""
    seqs: int
    """``max_num_seqs``: requests it is split over, and rows of the sampler's batch."""


def profile_shape(
    release: VllmRelease,
    *,
    gpu: str,
    total_bytes: int,
    max_model_len: int,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
) -> ProfileShape:
    """vLLM's defaults for the profile's batch, for ``vllm serve`` on a GPU of ``total_bytes``.

    V0 (arg_utils.py, config.py ``SchedulerConfig``): 256 sequences; chunked prefill is on only past a 32K
    context (2,048 tokens a step), otherwise a step takes ``max(max_model_len, 2048)`` tokens. V1
    (``_set_default_args``): on GPUs of 70 GiB or more whose name does not say A100 8,192 tokens and 1,024
    sequences, else 2,048 and 256 (0.28 on: 16,384 tokens on GPUs of 160 GiB or more); a defaulted token budget
    is at most ``max_num_seqs x max_model_len``, and ``max_num_seqs`` at most the token budget.
    """
    if not release.v1:
        seqs = max_num_seqs or 256
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048 if max_model_len > 32768 else max(max_model_len, 2048)
        return ProfileShape(max_num_batched_tokens, min(seqs, max_num_batched_tokens))
    big = total_bytes >= 70 * GIB and "a100" not in gpu.lower()
    huge = release.huge_gpu_tier and total_bytes >= 160 * GIB
    seqs = max_num_seqs or (1024 if big else 256)
    tokens = max_num_batched_tokens
    if tokens is None:
        tokens = min(16384 if huge else 8192 if big else 2048, seqs * max_model_len)
    return ProfileShape(tokens, min(seqs, tokens))


def decoder_live_elements(inventory: Inventory, tensor_parallel: int = 1) -> int:
    """Elements alive per token at the widest point of one decoder layer's forward, on one GPU.

    In the MLP, at its down projection: the residual stream, the normalised input, the gate and up
    projections' output (``2 x intermediate``), the activation's output (``intermediate``) and the down
    projection's output (3 hidden + 3 intermediate; vLLM's ``LlamaMLP``, fused ``gate_up_proj`` and
    ``SiluAndMul``). A mixture of experts counts its routed experts' intermediate (``experts per token x
    expert intermediate``), as ``fused_moe``'s caches hold it. In attention: the residual stream, the
    normalised input, the fused QKV output and the attention output. The 3h + 3i rule reproduces
    Llama-3.1-8B's logged V0 peaks at 20,000 and 29,000 tokens within 0.5 %.
    """
    dims = inventory.dims
    hidden = dims.hidden_size or 0
    intermediate = dims.intermediate_size or 0
    if inventory.moe is not None:
        expert = int(text_config(inventory.config or {}).get("moe_intermediate_size") or intermediate)
        intermediate = expert * inventory.moe.experts_per_token
    heads = dims.num_attention_heads or 0
    kv_heads = dims.num_key_value_heads or heads
    head_dim = dims.head_dim or (hidden // heads if heads else 0)
    qkv = (heads + 2 * kv_heads) * head_dim
    mlp = 3 * hidden + math.ceil(3 * intermediate / tensor_parallel)
    attention = 3 * hidden + math.ceil((qkv + heads * head_dim) / tensor_parallel)
    return max(mlp, attention)


def profile_activation(
    inventory: Inventory, shape: ProfileShape, release: VllmRelease, *, dtype: str, tensor_parallel: int = 1
) -> tuple[int, int]:
    """(forward bytes, sampler bytes) of vLLM's profile run on one GPU; its activation peak is the larger.

    The forward's intermediates are freed before the sampler runs, so the two do not add up (the V0 logs
    show the peak following whichever is larger). The sampler works on the whole (gathered) vocabulary on
    every GPU: tensor parallelism does not shrink it (Meta-Llama-3-8B logs 1.26 GiB at TP 1 and TP 2).
    """
    forward = shape.tokens * decoder_live_elements(inventory, tensor_parallel) * nbytes(dtype)
    vocab = inventory.dims.vocab_size or 0
    sampler = int(shape.seqs * vocab * release.sampler_bytes_per_logit)
    return forward, sampler


def rotary_cache_bytes(inventory: Inventory, dtype: str) -> int:
    """vLLM's rotary ``cos_sin_cache``: ``max_position_embeddings x rotary_dim`` in the model dtype, one per
    model (``get_rope`` shares it), allocated with the weights and counted in "Model loading took"."""
    dims = inventory.dims
    if not dims.max_position_embeddings or not dims.head_dim:
        return 0
    factor = float(text_config(inventory.config or {}).get("partial_rotary_factor") or 1.0)
    return dims.max_position_embeddings * int(dims.head_dim * factor) * nbytes(dtype)


# --- the KV cache's blocks -------------------------------------------------------------------------------

#: GPU name prefixes of the compute capabilities vLLM's MLA backends key on: Hopper (9.0, FlashMLA) and
#: data-centre Blackwell (10.0, CUTLASS MLA). Names as the GPU catalog spells them.
_HOPPER = ("H100", "H200", "H800", "H20", "GH200")
_BLACKWELL = ("B200", "B300", "GB200", "GB300")


def mla_block_size(gpu: str, block_size: int) -> int:
    """The block size vLLM's V1 engine forces for an MLA model (DeepSeek) on ``gpu`` (v0.11.0
    ``vllm/platforms/cuda.py:131-182``): CUTLASS MLA's 128 on Blackwell (compute capability 10.0), FlashMLA's
    64 where it runs (Hopper), else the configured size (the Triton MLA backend)."""
    name = gpu.upper().replace(" ", "")
    if name.startswith(_BLACKWELL):
        return 128
    if name.startswith(_HOPPER):
        return 64
    return block_size


@dataclass(frozen=True)
class CacheGroup:
    """Layers of one attention kind that share blocks (vLLM's KV-cache group)."""

    kind: str
    window: int | None
    layers: int
    """Layers in the group, padding slots included."""


@dataclass(frozen=True)
class BlockLayout:
    """How vLLM lays the KV cache out in blocks on one GPU."""

    page_bytes: int
    """One block of one layer: ``block_size`` tokens of that layer's keys and values on this GPU."""
    group_size: int
    """Layers each block spans (one per group position; all layers for a uniform model)."""
    groups: tuple[CacheGroup, ...]

    @property
    def block_bytes(self) -> int:
        """One block across the layers it spans."""
        return self.page_bytes * self.group_size


def block_layout(
    caches: Sequence[LayerCache], *, block_size: int, kv_bytes: int, tensor_parallel: int, v1: bool
) -> BlockLayout:
    """vLLM's KV-cache groups and page size (V1 ``get_kv_cache_config``; V0 one block over every layer).

    V1 groups layers by their spec (kind and window), ``group_size = min(layers per spec)``, each spec padded
    up to a multiple of it (the padding slots :func:`~peftaudit.serving.kv_cache.layer_caches` lists); one
    block spans one layer of each group position. V0 has no groups: a block spans every layer, and sliding
    layers take full blocks.
    """
    real = [c for c in caches if c.kind != "none"]
    if not real:
        raise PeftauditError("the model has no attention layer that keeps a KV cache")
    per_token = {sequence_bytes([c], 1, kv_bytes, tensor_parallel) for c in real}
    if len(per_token) > 1:
        raise PeftauditError("layers of different KV sizes per token are not modelled (vLLM needs one page size)")
    page = per_token.pop() * block_size
    if not v1:
        layers = sum(1 for c in real if c.layer >= 0)
        return BlockLayout(page, layers, (CacheGroup("full", None, layers),))
    specs = Counter((c.kind, c.window) for c in real)
    size = min(specs.values())
    groups = tuple(
        CacheGroup(kind, window, size) for (kind, window), count in specs.items() for _ in range(count // size)
    )
    return BlockLayout(page, size, groups)


def blocks_per_request(layout: BlockLayout, *, max_model_len: int, block_size: int, scheduled: int) -> int:
    """Blocks one request of ``max_model_len`` tokens needs, summed over the groups (vLLM's
    ``max_memory_usage_bytes``): ``cdiv(max_model_len, block_size)`` for full attention, and for a sliding
    window ``cdiv(min(window - 1 + scheduled, max_model_len), block_size) + 1`` (``scheduled``: the tokens one
    step may compute, ``max_num_batched_tokens``)."""
    total = 0
    for group in layout.groups:
        if group.kind == "sliding" and group.window is not None:
            total += -(-min(group.window - 1 + scheduled, max_model_len) // block_size) + 1
        else:
            total += -(-max_model_len // block_size)
    return total


@dataclass(frozen=True)
class CacheCapacity:
    """What a KV cache of some bytes holds on one GPU, as vLLM counts it."""

    blocks: int
    per_request: int
    """Blocks one request of ``max_model_len`` needs (:func:`blocks_per_request`)."""
    tokens: int
    """The "GPU KV cache size: N tokens" line, by the release's rule."""
    max_concurrency: float
    """The "Maximum concurrency for N tokens per request" line."""


def cache_capacity(
    layout: BlockLayout,
    kv_cache_bytes: int,
    release: VllmRelease,
    *,
    max_model_len: int,
    block_size: int,
    scheduled: int,
) -> CacheCapacity:
    """Blocks, tokens and concurrency of ``kv_cache_bytes`` of KV cache (vLLM ``get_num_blocks``:
    ``bytes // page // layers per group``; V0 ``bytes // (page x layers)``; then the log's two lines)."""
    blocks = max(0, kv_cache_bytes // layout.page_bytes // layout.group_size)
    per_request = blocks_per_request(layout, max_model_len=max_model_len, block_size=block_size, scheduled=scheduled)
    concurrency = blocks / per_request if release.v1 else blocks * block_size / max_model_len
    if release.tokens_from_concurrency:
        tokens = int(concurrency * max_model_len)
    else:
        tokens = blocks // len(layout.groups) * block_size
    return CacheCapacity(blocks, per_request, tokens, concurrency)


__all__ = [
    "DEFAULT_RELEASE",
    "RELEASES",
    "BlockLayout",
    "CacheCapacity",
    "CacheGroup",
    "ProfileShape",
    "VllmRelease",
    "block_layout",
    "blocks_per_request",
    "cache_capacity",
    "decoder_live_elements",
    "mla_block_size",
    "profile_activation",
    "profile_shape",
    "release",
    "rotary_cache_bytes",
]
