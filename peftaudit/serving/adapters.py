"""The memory of serving PEFT LoRA adapters on one base model the way vLLM does, and reading a saved adapter.

Every rule below is vLLM v0.11.0's (the PyPI release ``vllm==0.11.0``, git commit ``f71952c1c``); paths
are inside the ``vllm/`` package of that release.

Which modules get slots
    ``LoRAModelManager.__init__`` (``lora/models.py:367``) takes ``supported_lora_modules`` from
    ``get_supported_lora_modules`` (``lora/utils.py:185-203``): the last name of *every* ``LinearBase``
    module in the vLLM model plus the model class's ``embedding_modules`` keys. ``_create_lora_modules``
    (``lora/models.py:474-534``) then wraps every module whose name ends in one of them
    (``_match_target_modules``, ``lora/models.py:606-611``) and ``from_layer`` (``lora/utils.py:61-76``)
    calls ``create_lora_weights(max_loras, ...)`` on it. This happens once, when the engine starts, before
    any adapter is known: **the GPU slots are preallocated at ``max_lora_rank`` for all supported modules,
    whatever the served adapters target.** vLLM 0.11.0 has no option to restrict them (``engine/arg_utils.py``
    LoRA group, lines 826-850: ``--enable-lora``, ``--enable-lora-bias``, ``--max-loras``,
    ``--max-lora-rank``, ``--lora-extra-vocab-size``, ``--lora-dtype``, ``--max-cpu-loras``,
    ``--fully-sharded-loras``, ``--default-mm-loras``).

    For Llama-like models ``packed_modules_mapping`` packs peft's names into vLLM's fused layers
    (``model_executor/models/llama.py:487-490``: ``qkv_proj <- q_proj, k_proj, v_proj``,
    ``gate_up_proj <- gate_proj, up_proj``), and a packed layer keeps one stacked A/B pair *per slice*
    (per peft module), so the slots are one pair per peft linear: ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``. Phi-3 keeps its fused ``qkv_proj`` and
    ``gate_up_proj`` as one slice each (``models/phi3.py:12-19``). Classes that declare
    ``embedding_modules = {"embed_tokens", "lm_head"}`` (Llama/Mistral ``llama.py:493-496``, Phi-3 by
    inheritance, Mixtral ``mixtral.py:480-483``) also get embedding and LM-head slots; Qwen2, Qwen3,
    Qwen3-MoE, Gemma, Gemma 2 and Gemma 3 declare none (the ``SupportsLoRA`` default ``{}``,
    ``models/interfaces.py:259``).

Shapes (``L`` = ``max_loras``, ``r`` = ``max_lora_rank``, dtype ``lora_dtype``, by default the model's:
``config/lora.py:129-130``)
    * Linear layers, per slice (``lora/layers/base_linear.py:62-79``,
      ``column_parallel_linear.py:206-223`` for merged layers): ``lora_a_stacked (L, 1, r, in)`` and
      ``lora_b_stacked (L, 1, out, r)``.
    * ``VocabParallelEmbeddingWithLoRA`` (``lora/layers/vocal_parallel_embedding.py:50-78``):
      ``lora_a_stacked (L, vocab + 256, r)``, ``lora_b_stacked (L, 1, hidden, r)`` and
      ``embeddings_tensors (L, 256, hidden)`` in the *model* dtype (256 = ``lora_extra_vocab_size``,
      ``config/lora.py:47``, deprecated, removed in v0.12.0).
    * ``LogitsProcessorWithLoRA`` (``lora/layers/logits_processor.py:91-126``): ``lora_a_stacked
      (L, 1, r, hidden)``, ``lora_b_stacked (L, 1, ceil((vocab + 256) / 256) * 256, r)`` (the logits
      processor's vocab is ``vocab + lora_extra_vocab_size``, ``llama.py:542-565``, padded to
      ``lora_vocab_padding_size`` 256 on GPUs, ``platforms/interface.py:417-421``), ``embeddings_tensors
      (L, 256, hidden)`` in the model dtype, and with tensor parallelism an int64
      ``sharded_to_full_mapping_gpu`` of the padded LM-head vocab.
      ``create_lora_weights`` refuses a vocabulary above 257024 (``logits_processor.py:88-90``).
    * With LoRA on, Llama and Mixtral also grow their base weights (``llama.py:348-358, 542-557``,
      ``mixtral.py:296-298, 499-507``): ``embed_tokens`` gets ``256 * max_loras`` extra rows and an untied
      ``lm_head`` is built for ``vocab + 256`` rows padded to 256 instead of ``vocab`` padded to 64
      (``DEFAULT_VOCAB_PADDING_SIZE``; ``vocab_parallel_embedding.py:224-230``). Those rows are counted
      here as ``lora_extra_vocab``; a tied head shares the embedding's rows (``tie_weights``,
      ``vocab_parallel_embedding.py:476-483``).
    * No bias slots: ``bias_enabled`` is off by default (``config/lora.py:62``).

Tensor parallelism (``tp``; vLLM's ``divide`` asserts every split is exact)
    * Column-parallel (``q/k/v``, ``gate/up`` and fused ``qkv_proj``/``gate_up_proj``): A is whole,
      B is split by output (``ColumnParallelLinearWithLoRA``, ``output_size = output_size_per_partition``,
      ``column_parallel_linear.py:86``; merged slices ``divide(output_size, tp)``, line 185-186; q/k/v
      slices are ``num_heads * head_size`` and ``num_kv_heads * head_size`` per rank, lines 393-404,
      with K/V heads replicated when ``tp`` exceeds their count, ``model_executor/layers/linear.py:901-908``).
    * Row-parallel (``o_proj``, ``down_proj``): A is split by input (``input_size_per_partition``,
      ``row_parallel_linear.py:27``), B is whole.
    * ``fully_sharded_loras`` (S-LoRA layers): column-parallel A also splits its rank
      (``divide(max_lora_rank, tp)``, ``base_linear.py:49-51``, ``column_parallel_linear.py:202-204``) and
      row-parallel B its output (``base_linear.py:56-58``).
    * Replicated layers (MoE routers, ``ReplicatedLinearWithLoRA``) and the embedding/LM-head slots are
      not split: every GPU holds them whole (``base_linear.py:44-46``; the embedding slot uses the full
      ``org_vocab_size`` and ``embedding_dim``).

Mixture of experts
    vLLM 0.11.0 has no LoRA layer for fused MoE experts (no ``lora/layers/fused_moe.py`` in the release;
    ``is_moe_model`` warns that adapters must not hold expert weights, ``lora/models.py:59-67``): experts
    get no slots. The router (``self.gate = ReplicatedLinear(hidden, num_experts)``, ``mixtral.py:106``,
    ``qwen3_moe.py:156``) is a ``LinearBase`` and does get a replicated slot pair. Later vLLM releases
    add LoRA on fused MoE; that is not modelled here.

Defaults (``config/lora.py:33-62``)
    ``max_lora_rank`` 16 (one of 8, 16, 32, 64, 128, 256, 320, 512: lines 104-109), ``max_loras`` 1
    (at least 1), ``max_cpu_loras`` = ``max_loras`` (lines 116-117; the LRU cache of adapters held in
    host memory in ``lora_dtype``, ``lora/worker_manager.py:112-118``, ``lora/models.py:390-392``),
    ``lora_extra_vocab_size`` 256, ``fully_sharded_loras`` off. An adapter whose ``r`` exceeds
    ``max_lora_rank`` is refused at load (``lora/peft_helper.py:119-122``).

The punica wrapper's metadata (``lora/punica_wrapper/punica_base.py:130-160``,
``punica_gpu.py:32-45``, ``ops/triton_ops/lora_kernel_metadata.py:33-64``) is a few int64/int32 index
vectors of ``max_num_batched_tokens`` and ``max_num_seqs``: about 48 bytes per batched token (384 KiB at
8192 tokens), negligible next to the slots (:func:`punica_metadata_bytes`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftaudit.errors import PeftauditError
from peftaudit.inventory import Inventory
from peftaudit.memory.dtypes import nbytes
from peftaudit.memory.dtypes import short as short_dtype
from peftaudit.verification.adapter import read_layout
from peftaudit.verification.checkpoint import MAX_JSON_BYTES, read_safetensors_header
from peftaudit.verification.dtypes import TORCH_TO_CODE
from peftaudit.verification.lora_config import read_lora_settings

#: The release every rule here follows.
VLLM_RELEASE = "vLLM v0.11.0"
#: ``LoRAConfig.__post_init__``'s ``possible_max_ranks`` (``config/lora.py:104``).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: ``LoRAConfig`` defaults (``config/lora.py:33, 35``).
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_MAX_LORAS = 1
#: ``lora_extra_vocab_size`` default (``config/lora.py:47``).
LORA_EXTRA_VOCAB_SIZE = 256
#: ``Platform.get_lora_vocab_padding_size`` on GPUs (``platforms/interface.py:417-421``).
LORA_VOCAB_PADDING_SIZE = 256
#: ``DEFAULT_VOCAB_PADDING_SIZE`` of ``VocabParallelEmbedding`` without LoRA.
DEFAULT_VOCAB_PADDING_SIZE = 64
#: ``LogitsProcessorWithLoRA.create_lora_weights`` refuses a larger (vocab + extra vocab).
MAX_LORA_VOCAB = 257024
#: ``LoRADType`` (``config/lora.py:25``): "auto" (the model's dtype), float16 or bfloat16.
LORA_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class _Arch:
    """What vLLM 0.11.0's model class for an architecture does with LoRA."""

    source: str  # file:line of the class
    embeddings: bool  # embedding_modules has embed_tokens and lm_head, and LoRA grows the vocab


#: Text decoders whose vLLM 0.11.0 class implements ``SupportsLoRA`` (``models/registry.py`` maps the
#: transformers architecture to the class), with the Llama layout this module models.
VLLM_LORA_ARCHITECTURES: Mapping[str, _Arch] = {
    "LlamaForCausalLM": _Arch("model_executor/models/llama.py:486", True),
    # registry.py:121: ("llama", "LlamaForCausalLM")
    "MistralForCausalLM": _Arch("model_executor/models/llama.py:486", True),
    "MixtralForCausalLM": _Arch("model_executor/models/mixtral.py:467", True),
    "Phi3ForCausalLM": _Arch("model_executor/models/phi3.py:10", True),
    "Qwen2ForCausalLM": _Arch("model_executor/models/qwen2.py:445", False),
    "Qwen3ForCausalLM": _Arch("model_executor/models/qwen3.py:263", False),
    "Qwen3MoeForCausalLM": _Arch("model_executor/models/qwen3_moe.py:571", False),
    "GemmaForCausalLM": _Arch("model_executor/models/gemma.py:366", False),
    "Gemma2ForCausalLM": _Arch("model_executor/models/gemma2.py:364", False),
    "Gemma3ForCausalLM": _Arch("model_executor/models/gemma3.py:496", False),
}

#: Architectures whose vLLM 0.11.0 class does not implement ``SupportsLoRA``: vLLM serves no adapter.
VLLM_NO_LORA: Mapping[str, str] = {
    "GPT2LMHeadModel": "model_executor/models/gpt2.py:270",
    "OPTForCausalLM": "model_executor/models/opt.py:355",
    "FalconForCausalLM": "model_executor/models/falcon.py:448",
    "GptOssForCausalLM": "model_executor/models/gpt_oss.py:635",
}

# How vLLM builds each peft linear of a Llama-like decoder layer (the role decides the TP split).
_ROLES: Mapping[str, str] = {
    "q_proj": "q",  # MergedQKVParallelLinearWithLoRA slice 0
    "k_proj": "kv",  # slices 1, 2: K/V heads, replicated past their count
    "v_proj": "kv",
    "qkv_proj": "qkv",  # Phi-3: QKVParallelLinearWithLoRA, one slice
    "gate_proj": "column",  # MergedColumnParallelLinearWithLoRA slices
    "up_proj": "column",
    "gate_up_proj": "column",  # Phi-3: ColumnParallelLinearWithLoRA, one slice
    "o_proj": "row",  # RowParallelLinearWithLoRA
    "down_proj": "row",
}
_ROUTER = "gate"
_EMBED = "embed_tokens"
_HEAD = "lm_head"
#: The breakdown key of the vocabulary rows vLLM adds to the base model when LoRA is on.
EXTRA_VOCAB = "lora_extra_vocab"


# --------------------------------------------------------------------------------------------------
# Reading a saved adapter


@dataclass(frozen=True)
class AdapterFile:
    """One saved PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``target_modules`` is the config's list as saved (a regex string becomes a one-element tuple);
    ``module_kinds`` are the last names of the modules that actually hold LoRA factors in the file
    (``q_proj``, ...), the names :func:`lora_slots` takes as ``targets``. ``max_rank`` is the largest of
    ``r`` and any ``rank_pattern`` value: what vLLM's ``max_lora_rank`` must cover.
    """

    path: str
    peft_type: str
    #: ``r`` (0 for a method without one, such as prompt tuning).
    rank: int
    #: ``lora_alpha`` for LoRA; None for other methods.
    alpha: float | None
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    #: Exact bytes of all tensors, from the safetensors header's data offsets; nothing is loaded.
    tensor_bytes: int
    tensors: int
    #: Short dtype name (``bf16``, ``fp32``); several joined with ``+`` when the file mixes them.
    dtype: str
    max_rank: int = 0
    module_kinds: tuple[str, ...] = ()


_WEIGHTS = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_CODE_TO_TORCH = {code: name for name, code in TORCH_TO_CODE.items()}


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read a saved PEFT adapter directory without loading a tensor.

    Raises :class:`PeftauditError` (one line) when ``path`` is not a directory, lacks
    ``adapter_config.json``, holds only a pickled ``adapter_model.bin`` (peftaudit never unpickles:
    unpickling can run arbitrary code), or has a malformed config or safetensors header.
    """
    root = Path(path)
    if not root.is_dir():
        raise PeftauditError(f"{root}: not a directory; expected a saved PEFT adapter directory")
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise PeftauditError(f"{root}: no adapter_config.json; not a saved PEFT adapter (peft's save_pretrained)")
    config = _read_json(config_path)
    weights = root / _WEIGHTS
    if not weights.is_file():
        pickled = [name for name in _PICKLED if (root / name).is_file()]
        if pickled:
            raise PeftauditError(
                f"{root}: holds only {pickled[0]} (pickle); peftaudit never unpickles, since loading a pickle "
                "can run code: re-save it with safetensors (peft's save_pretrained(safe_serialization=True))"
            )
        raise PeftauditError(f"{root}: no {_WEIGHTS} beside adapter_config.json")

    where = str(config_path)
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise PeftauditError(f"{where}: peft_type {peft_type!r} is not a peft method name")
    if peft_type == "LORA":
        settings = read_lora_settings(config, where)  # validates r, lora_alpha, rank_pattern
        rank, alpha = settings.r, settings.lora_alpha
        max_rank = max([rank, *(value for _, value in settings.rank_pattern)])
    else:
        value = config.get("r")
        rank = value if type(value) is int and value > 0 else 0
        alpha, max_rank = None, rank

    entries, _ = read_safetensors_header(weights)
    codes = sorted({entry.dtype for entry in entries})
    layout = read_layout([entry.name for entry in entries])
    kinds = tuple(dict.fromkeys(pair.module.rsplit(".", 1)[-1] for pair in layout.pairs))
    return AdapterFile(
        path=str(root),
        peft_type=peft_type,
        rank=rank,
        alpha=alpha,
        target_modules=_names(config.get("target_modules"), where, "target_modules"),
        modules_to_save=_names(config.get("modules_to_save"), where, "modules_to_save"),
        tensor_bytes=sum(entry.stop - entry.start for entry in entries),
        tensors=len(entries),
        dtype="+".join(short_dtype(_CODE_TO_TORCH.get(code, code.lower())) for code in codes) or "none",
        max_rank=max_rank,
        module_kinds=kinds,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PeftauditError(f"{path}: larger than {MAX_JSON_BYTES} bytes; not an adapter config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise PeftauditError(f"{path}: not readable JSON ({reason})") from None
    if not isinstance(data, dict):
        raise PeftauditError(f"{path}: adapter config is not a JSON object")
    return data


def _names(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)  # a regex, as peft accepts it
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise PeftauditError(f"{where}: {key} {value!r} is not a module name, a regex, or a list of names")


# --------------------------------------------------------------------------------------------------
# vLLM's LoRA slots


@dataclass(frozen=True)
class SlotGroup:
    """One module kind's stacked LoRA buffers in every layer that has it (shapes at ``tp`` = 1).

    ``role`` is how vLLM builds the layer, which decides the tensor-parallel split: ``q``/``kv``/``qkv``
    (QKV slices), ``column``, ``row``, ``replicated`` (MoE router), ``embedding``, ``logits`` (LM head),
    ``extra_vocab_embed``/``extra_vocab_head`` (base rows LoRA adds).
    """

    kind: str
    role: str
    layers: int
    in_features: int
    out_features: int
    #: Query and key/value heads, for the QKV roles.
    heads: int = 0
    kv_heads: int = 0

    def bytes_per_gpu(self, *, max_loras: int, rank: int, itemsize: int, tp: int, fully_sharded: bool) -> int:
        """Bytes this group holds on each GPU at tensor parallel ``tp`` (the rules in the module docstring)."""
        loras, inp, out = max_loras, self.in_features, self.out_features
        if self.role in ("q", "kv", "qkv", "column"):
            a_rank = _divide(rank, tp, "max_lora_rank", "fully_sharded_loras") if fully_sharded else rank
            b_out = self._column_out(tp)
            per_layer = loras * a_rank * inp + loras * b_out * rank
        elif self.role == "row":
            b_out = _divide(out, tp, f"{self.kind} out_features", "row-parallel LoRA B") if fully_sharded else out
            per_layer = (
                loras * rank * _divide(inp, tp, f"{self.kind} in_features", "row-parallel") + loras * b_out * rank
            )
        elif self.role == "replicated":
            per_layer = loras * rank * inp + loras * out * rank
        elif self.role == "embedding":  # in = vocab, out = hidden
            lora = loras * (inp + LORA_EXTRA_VOCAB_SIZE) * rank + loras * out * rank
            return (lora + loras * LORA_EXTRA_VOCAB_SIZE * out) * itemsize * self.layers
        elif self.role == "logits":  # in = hidden, out = vocab
            padded = _pad(out + LORA_EXTRA_VOCAB_SIZE, LORA_VOCAB_PADDING_SIZE)
            lora = loras * rank * inp + loras * padded * rank + loras * LORA_EXTRA_VOCAB_SIZE * inp
            # sharded_to_full_mapping_gpu: int64 over the LM head's padded vocab, only with tp >= 2.
            mapping = 8 * (_pad(out, LORA_VOCAB_PADDING_SIZE) + LORA_EXTRA_VOCAB_SIZE) if tp > 1 else 0
            return lora * itemsize + mapping
        elif self.role == "extra_vocab_embed":  # in = vocab, out = hidden
            # LlamaModel: VocabParallelEmbedding(vocab + 256 * max_loras, org_num_embeddings=vocab), padded to 64.
            without = _pad(inp, DEFAULT_VOCAB_PADDING_SIZE)
            with_lora = _pad(without + LORA_EXTRA_VOCAB_SIZE * loras, DEFAULT_VOCAB_PADDING_SIZE)
            return (_split(with_lora, tp) - _split(without, tp)) * out * itemsize
        elif self.role == "extra_vocab_head":  # in = vocab, out = hidden
            # ParallelLMHead(vocab + 256, org_num_embeddings=vocab, padding_size=256) instead of vocab padded to 64.
            with_lora = _pad(_pad(inp, LORA_VOCAB_PADDING_SIZE) + LORA_EXTRA_VOCAB_SIZE, LORA_VOCAB_PADDING_SIZE)
            without = _pad(inp, DEFAULT_VOCAB_PADDING_SIZE)
            return (_split(with_lora, tp) - _split(without, tp)) * out * itemsize
        else:  # pragma: no cover - roles are set in this module
            raise AssertionError(self.role)
        return per_layer * itemsize * self.layers

    def _column_out(self, tp: int) -> int:
        if self.role == "column":
            return _divide(self.out_features, tp, f"{self.kind} out_features", "column-parallel")
        head_dim = self.out_features // (self.kv_heads if self.role == "kv" else self.heads)
        if self.role == "qkv":
            head_dim = self.out_features // (self.heads + 2 * self.kv_heads)
        q_heads = _divide(self.heads, tp, "attention heads", "QKVParallelLinear")
        kv_heads = _kv_heads_per_rank(self.kv_heads, tp)
        if self.role == "q":
            return q_heads * head_dim
        if self.role == "kv":
            return kv_heads * head_dim
        return (q_heads + 2 * kv_heads) * head_dim


@dataclass(frozen=True)
class LoraSlots:
    """vLLM's preallocated LoRA buffers for one base model (see the module docstring for the rules).

    ``bytes_total`` and ``per_module`` are summed over the ``tensor_parallel`` GPUs (one GPU when it
    is 1); :meth:`per_gpu` is what each GPU holds. ``notes`` say what gets no slot and why.
    """

    max_loras: int
    max_lora_rank: int
    dtype: str
    #: Module kinds that get slots (``q_proj``, ..., ``gate`` for an MoE router, ``embed_tokens``,
    #: ``lm_head``), in model order.
    modules: tuple[str, ...]
    bytes_total: int
    #: Module kind -> bytes across layers (and GPUs); ``lora_extra_vocab`` is the base rows LoRA adds.
    per_module: tuple[tuple[str, int], ...]
    tensor_parallel: int = 1
    fully_sharded: bool = False
    groups: tuple[SlotGroup, ...] = ()
    notes: tuple[str, ...] = ()

    def breakdown(self, tensor_parallel: int) -> tuple[tuple[str, int], ...]:
        """Module kind -> bytes on each GPU at ``tensor_parallel``."""
        tp = _tp(tensor_parallel)
        out: dict[str, int] = {}
        for group in self.groups:
            key = EXTRA_VOCAB if group.role.startswith("extra_vocab") else group.kind
            out[key] = out.get(key, 0) + group.bytes_per_gpu(
                max_loras=self.max_loras,
                rank=self.max_lora_rank,
                itemsize=nbytes(self.dtype),
                tp=tp,
                fully_sharded=self.fully_sharded,
            )
        return tuple(out.items())

    def per_gpu(self, tensor_parallel: int) -> int:
        """Bytes of LoRA slots on each GPU at ``tensor_parallel`` (every rank holds the same)."""
        return sum(value for _, value in self.breakdown(tensor_parallel))


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM 0.11.0 accepts that serves an adapter of ``rank``."""
    if type(rank) is not int or rank <= 0:
        raise PeftauditError(f"rank {rank!r} is not a positive integer")
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise PeftauditError(f"rank {rank} is above {VLLM_RELEASE}'s largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")


def lora_slots(
    inventory: Inventory,
    *,
    max_loras: int = DEFAULT_MAX_LORAS,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    dtype: str = "bf16",
    targets: Sequence[str] | None = None,
    tensor_parallel: int = 1,
    fully_sharded: bool = False,
) -> LoraSlots:
    """The GPU memory vLLM 0.11.0 preallocates for LoRA adapters on ``inventory``'s model.

    ``targets`` None follows vLLM: every supported module gets slots, whatever the adapters target.
    Given (peft module names such as ``q_proj``, ``gate`` for an MoE router, ``embed_tokens``,
    ``lm_head``), only those get slots: what an engine that allocates per target would hold (vLLM
    0.11.0 cannot). ``dtype`` is ``lora_dtype``, taken to be the model dtype (vLLM's "auto") also for
    the embedding buffers that use the model dtype.

    Raises :class:`PeftauditError` for a rank that is not positive, not one vLLM accepts, or above
    the smaller dimension of a targeted module (with ``targets`` None the MoE router, whose output is
    the expert count, is not checked: vLLM allocates it anyway); for ``max_loras`` < 1; unknown or
    unsupported target names; an architecture vLLM 0.11.0 serves no LoRA for or that is not modelled;
    a vocabulary above vLLM's LoRA limit; or a tensor-parallel split vLLM would refuse.
    """
    if type(max_lora_rank) is not int or max_lora_rank <= 0:
        raise PeftauditError(f"max_lora_rank {max_lora_rank!r} is not a positive integer")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise PeftauditError(
            f"max_lora_rank {max_lora_rank} is not one {VLLM_RELEASE} accepts {VLLM_MAX_LORA_RANKS} "
            f"(vllm/config/lora.py:104-109); use {vllm_max_lora_rank(max_lora_rank)}"
        )
    if type(max_loras) is not int or max_loras < 1:
        raise PeftauditError(f"max_loras {max_loras!r} must be an integer >= 1 (vllm/config/lora.py:114-115)")
    if dtype not in LORA_DTYPES:
        raise PeftauditError(f"LoRA dtype {dtype!r} is not one of {', '.join(LORA_DTYPES)} (vllm/config/lora.py:25)")
    tp = _tp(tensor_parallel)

    arch = _architecture(inventory)
    groups, notes = _groups(inventory, arch)
    available = [group.kind for group in groups if not group.role.startswith("extra_vocab")]
    if targets is None:
        chosen = groups
        checked = [g for g in chosen if g.role != "replicated" and not g.role.startswith("extra_vocab")]
    else:
        wanted = _check_targets(targets, available, inventory, arch)
        chosen = [g for g in groups if g.kind in wanted]
        checked = [g for g in chosen if not g.role.startswith("extra_vocab")]
    for group in checked:
        smaller = min(group.in_features, group.out_features)
        if max_lora_rank > smaller:
            raise PeftauditError(
                f"max_lora_rank {max_lora_rank} is larger than {group.kind}'s smaller dimension {smaller} "
                f"(in {group.in_features}, out {group.out_features}); a LoRA rank above min(in, out) adds nothing"
            )
    if any(group.role == "logits" for group in chosen):
        vocab = next(group.out_features for group in chosen if group.role == "logits")
        if vocab + LORA_EXTRA_VOCAB_SIZE > MAX_LORA_VOCAB:
            raise PeftauditError(
                f"{VLLM_RELEASE} refuses LoRA on this model: vocab {vocab} + {LORA_EXTRA_VOCAB_SIZE} extra is above "
                f"{MAX_LORA_VOCAB} (vllm/lora/layers/logits_processor.py:88-90)"
            )

    slots = LoraSlots(
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        dtype=dtype,
        modules=tuple(dict.fromkeys(g.kind for g in chosen if not g.role.startswith("extra_vocab"))),
        bytes_total=0,
        per_module=(),
        tensor_parallel=tp,
        fully_sharded=fully_sharded,
        groups=tuple(chosen),
        notes=tuple(notes),
    )
    per_module = tuple((kind, value * tp) for kind, value in slots.breakdown(tp))
    return LoraSlots(
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        dtype=dtype,
        modules=slots.modules,
        bytes_total=sum(value for _, value in per_module),
        per_module=per_module,
        tensor_parallel=tp,
        fully_sharded=fully_sharded,
        groups=slots.groups,
        notes=slots.notes,
    )


def _architecture(inventory: Inventory) -> _Arch:
    name = inventory.architecture
    if name in VLLM_NO_LORA:
        raise PeftauditError(
            f"{VLLM_RELEASE} serves no LoRA adapters for {name}: its class does not implement SupportsLoRA "
            f"(vllm/{VLLM_NO_LORA[name]})"
        )
    if name not in VLLM_LORA_ARCHITECTURES:
        known = ", ".join(sorted(VLLM_LORA_ARCHITECTURES))
        raise PeftauditError(f"vLLM LoRA slots are modelled for text decoders {known}; not for {name}")
    return VLLM_LORA_ARCHITECTURES[name]


def _groups(inventory: Inventory, arch: _Arch) -> tuple[list[SlotGroup], list[str]]:
    """Every slot group vLLM would allocate for this model, in model order, and notes on what gets none."""
    dims = inventory.dims
    heads = dims.num_attention_heads or 0
    kv_heads = dims.num_key_value_heads or heads
    counts: dict[tuple[str, int, int], int] = {}
    for module in inventory.modules:
        if module.layer is None or not module.is_linear:
            continue
        kind = module.path.rsplit(".", 1)[-1]
        if kind not in _ROLES:
            raise PeftauditError(
                f"{inventory.architecture}: no vLLM LoRA rule for linear {module.path!r} (peftaudit models "
                f"{', '.join(_ROLES)})"
            )
        if module.in_features is None or module.out_features is None:  # pragma: no cover - linears have both
            raise PeftauditError(f"{module.path}: linear without in/out features")
        key = (kind, module.in_features, module.out_features)
        counts[key] = counts.get(key, 0) + 1
    notes: list[str] = []
    for param in inventory.parameters:
        if param.kind == "router" and param.name.endswith(f"{_ROUTER}.weight") and len(param.shape) == 2:
            key = (_ROUTER, param.shape[1], param.shape[0])
            counts[key] = counts.get(key, 0) + 1
    if inventory.moe is not None:
        notes.append(
            f"experts: no LoRA slots; {VLLM_RELEASE} has no LoRA layer for fused MoE experts (adapters must not "
            "hold expert weights, vllm/lora/models.py:59-67); the router gets a replicated slot pair"
        )
    groups = [
        SlotGroup(kind, _ROLES.get(kind, "replicated"), layers, inp, out, heads, kv_heads)
        for (kind, inp, out), layers in counts.items()
    ]
    if arch.embeddings:
        vocab, hidden = dims.vocab_size, dims.hidden_size
        if not vocab or not hidden:
            raise PeftauditError(f"{inventory.architecture}: the inventory lacks vocab_size or hidden_size")
        groups.append(SlotGroup(_EMBED, "embedding", 1, vocab, hidden))
        groups.append(SlotGroup(_HEAD, "logits", 1, hidden, vocab))
        groups.append(SlotGroup(_EMBED, "extra_vocab_embed", 1, vocab, hidden))
        if not dims.tie_word_embeddings:  # a tied head shares the embedding's rows
            groups.append(SlotGroup(_HEAD, "extra_vocab_head", 1, vocab, hidden))
    else:
        notes.append(
            f"embed_tokens, lm_head: no LoRA slots; {inventory.architecture}'s vLLM class declares no "
            f"embedding_modules (vllm/{arch.source}, vllm/model_executor/models/interfaces.py:259)"
        )
    return groups, notes


def _check_targets(targets: Sequence[str], available: list[str], inventory: Inventory, arch: _Arch) -> set[str]:
    if isinstance(targets, str):
        targets = [targets]
    wanted = set(targets)
    unknown = sorted(wanted - set(available))
    if not unknown:
        return wanted
    name = unknown[0]
    if name in (_EMBED, _HEAD) and not arch.embeddings:
        raise PeftauditError(
            f"{VLLM_RELEASE} serves no LoRA on {name} for {inventory.architecture}: its class declares no "
            f"embedding_modules (vllm/{arch.source})"
        )
    moe = ""
    if inventory.moe is not None:
        moe = f"; MoE experts get no LoRA in {VLLM_RELEASE} (vllm/lora/models.py:59-67)"
    raise PeftauditError(
        f"unknown LoRA target {name!r} for {inventory.architecture}: vLLM gives slots to "
        f"{', '.join(dict.fromkeys(available))}{moe}"
    )


def _tp(tensor_parallel: int) -> int:
    if type(tensor_parallel) is not int or tensor_parallel < 1:
        raise PeftauditError(f"tensor_parallel {tensor_parallel!r} must be an integer >= 1")
    return tensor_parallel


def _divide(value: int, tp: int, what: str, layer: str) -> int:
    # vllm/distributed/utils.py divide(): asserts an exact split.
    if value % tp:
        raise PeftauditError(f"{what} {value} does not split over tensor_parallel {tp} ({layer}; vLLM's divide)")
    return value // tp


def _split(rows: int, tp: int) -> int:
    # vocab_range_from_global_vocab_size: divide(padded vocab, tp) rows per rank.
    return _divide(rows, tp, "padded vocab", "VocabParallelEmbedding")


def _kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    # QKVParallelLinear (model_executor/layers/linear.py:902-908): replicate K/V heads past their count.
    if tp >= kv_heads:
        _divide(tp, kv_heads, "tensor_parallel", "K/V head replication")
        return 1
    return _divide(kv_heads, tp, "key/value heads", "QKVParallelLinear")


def _pad(value: int, to: int) -> int:
    # vocab_parallel_embedding.py:60-63, pad_vocab_size.
    return math.ceil(value / to) * to


# --------------------------------------------------------------------------------------------------
# Merged copies and the break-even


def merged_bytes(weights_total: int, adapters: int) -> int:
    """Bytes of serving each adapter as its own merged full model: ``weights_total`` per adapter."""
    if weights_total < 0 or adapters < 0:
        raise PeftauditError(f"weights ({weights_total}) and adapters ({adapters}) must not be negative")
    return weights_total * adapters


def break_even(weights_total: int, slots_bytes: int) -> int:
    """The smallest adapter count ``n`` at which ``n`` merged copies take strictly more memory than one base
    plus the LoRA slots: ``n * W > W + S``, that is ``n = floor(S / W) + 2``.

    Below it (``n`` < the result) merged copies take no more memory than base + slots. With ``S`` < ``W``
    (the usual case) it is 2: already two merged copies cost more than one base with slots.
    """
    if weights_total <= 0:
        raise PeftauditError(f"weights_total {weights_total} must be positive")
    if slots_bytes < 0:
        raise PeftauditError(f"slots_bytes {slots_bytes} must not be negative")
    return slots_bytes // weights_total + 2


def punica_metadata_bytes(max_num_batched_tokens: int, max_num_seqs: int, max_loras: int) -> int:
    """GPU bytes of the punica wrapper's index buffers (negligible: about 48 bytes per batched token).

    ``PunicaWrapperBase.__init__`` (``lora/punica_wrapper/punica_base.py:130-160``): int64
    ``_token_lora_indices``, ``_sampler_indices``, ``_sampler_indices_padded`` (tokens each),
    ``_embeddings_indices`` (2 x tokens), ``_seq_start_locs``, ``_seq_lengths``,
    ``_lora_indices_per_batch`` (seqs each). ``PunicaWrapperGPU`` (``punica_gpu.py:32-45``) adds two
    ``LoRAKernelMeta`` (``ops/triton_ops/lora_kernel_metadata.py:33-64``), one over tokens and one over
    seqs, each int32 ``2 n + (L + 1) + (L + 1) + (L + 2)``.
    """
    base = 8 * (5 * max_num_batched_tokens + 3 * max_num_seqs)

    def meta(n: int) -> int:
        return 4 * (2 * n + 2 * (max_loras + 1) + max_loras + 2)

    return base + meta(max_num_batched_tokens) + meta(max_num_seqs)
