"""The bytes of a model's weights when served at a precision, whole and per GPU under tensor parallelism.

:func:`serving_weights` reads an :class:`~peftaudit.inventory.Inventory` and a precision
(:data:`PRECISIONS`, the CLI's names) and returns a :class:`ServingWeights`: dense,
packed and constant bytes, exact for the format, and :meth:`ServingWeights.per_gpu`,
what one GPU holds under vLLM's tensor parallelism.

Which modules each precision stores quantized (vLLM's own choices):

* ``auto``: the checkpoint's ``quantization_config`` as transformers' quantizers read it
  (:func:`peftaudit.memory.quantized.checkpoint_quantization`, its
  :meth:`~peftaudit.memory.quantized.CheckpointQuantization.formats`), else every weight
  at the checkpoint's dtype. A float32 checkpoint is served in half precision: vLLM's
  ``--dtype auto`` downcasts float32 to the platform's first supported dtype, bfloat16 on
  current GPUs (``vllm/config.py`` ``_resolve_auto_dtype``, "Downcast for float32 models").
* ``fp8``, ``int8``, ``awq``, ``gptq``, ``nf4``: the linear layers of the language
  model's repeated blocks, never the embeddings, the output head or MoE routers (vLLM
  builds the head as ``ParallelLMHead``, an embedding, and routers unquantized). Fused
  3-D MoE experts are quantized per expert, each expert's matrices like a linear layer.
* ``bf16``, ``fp16``: every weight at that dtype.

The byte layouts are :mod:`peftaudit.memory.dtypes`' (built as
:class:`~peftaudit.memory.quantized.WeightFormat` objects), one rule per format:

* AWQ and GPTQ are counted as their checkpoints store them, one set of tensors per linear
  module: AWQ's ``qweight (in, out/8)``, ``qzeros (in/group, out/8)`` int32 and ``scales
  (in/group, out)`` fp16, GPTQ's ``qweight (in/8, out)``, ``qzeros``, ``scales`` and ``g_idx
  (in,)`` int32 (the shapes of vLLM's ``AWQLinearMethod.create_weights``, awq.py at commit
  000796ac, and ``GPTQLinearMethod.create_weights``). Published totals match to the byte
  (tests/serving/data/published_checkpoint_sizes.json). At run time vLLM keeps one ``g_idx``
  per fused layer and its Marlin kernels drop it without act-order: a few bytes per layer less.
* online fp8 and bitsandbytes follow what vLLM builds in memory: one fp32 scale per fused
  vLLM layer (QKV, gate/up) for fp8; one nf4 quantization state per checkpoint weight slice.

Parameter counts stay logical (as published). Buffers are not weights and are left out: vLLM's
"Loading model weights took" also counts its rotary ``cos_sin_cache`` (max positions x rotary
dimension at the model's dtype), which the engine accounting adds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from peftaudit.architecture import ModuleRole
from peftaudit.errors import ConfigError, PeftauditError
from peftaudit.memory.dtypes import nbytes, short
from peftaudit.memory.quantized.config import checkpoint_quantization
from peftaudit.memory.quantized.formats import WeightFormat, converts
from peftaudit.towers import LANGUAGE_MODEL, tower_of

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory, ModuleRecord, ParameterRecord
    from peftaudit.memory.quantized.formats import CheckpointQuantization

#: The precisions ``--precision`` accepts.
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp8", "int8", "awq", "gptq", "nf4", "mxfp4")

#: vLLM pads every vocabulary-parallel embedding (input embeddings and ``ParallelLMHead``) to a
#: multiple of 64 rows before splitting it across GPUs (``vllm/model_executor/layers/
#: vocab_parallel_embedding.py``: ``DEFAULT_VOCAB_PADDING_SIZE = 64``, ``pad_vocab_size``, then
#: ``num_embeddings_per_partition = divide(num_embeddings_padded, tp_size)``).
VOCAB_PADDING = 64

#: How tensor parallelism splits a tensor: along its rows (``ColumnParallelLinear``,
#: ``QKVParallelLinear``, ``MergedColumnParallelLinear``, the experts' gate/up), its columns
#: (``RowParallelLinear``, the experts' down projection), its rows padded to
#: :data:`VOCAB_PADDING` (``VocabParallelEmbedding``, ``ParallelLMHead``), or not at all.
SPLITS: tuple[str, ...] = ("rows", "cols", "vocab", "replicated")

# vLLM's online ``--quantization fp8`` (``Fp8LinearMethod``, vllm/model_executor/layers/quantization/
# fp8.py at commit 0071b24b, ``process_weights_after_loading``: ``qweight, weight_scale =
# ops.scaled_fp8_quant(layer.weight, scale=None)`` for a checkpoint not serialized in fp8): fp8 e4m3
# weights and one fp32 scale per ``LinearBase``, so a fused QKV or gate/up layer has one scale.
_FP8 = WeightFormat("fp8", "fp8", 8, block=None)
# W8A8 int8 with per-channel scales (vLLM ``CompressedTensorsW8A8Int8.create_weights``,
# compressed_tensors/schemes/compressed_tensors_w8a8_int8.py at commit 00ba7ff1: int8 weight
# ``(out, in)`` and ``ChannelQuantScaleParameter`` ``(out, 1)`` float32): the layout of
# ``dtypes.int8_bytes`` (int8 codes, one fp32 scale per output row), bitsandbytes' LLM.int8 too.
_INT8 = WeightFormat("bnb8", "int8", 8)
# vLLM's in-flight bitsandbytes (``--quantization bitsandbytes`` on an unquantized checkpoint,
# vllm/model_executor/model_loader/bitsandbytes_loader.py at commit 0406fb9f, ``_unquantized_generator``:
# ``quantize_4bit(loaded_weight, compress_statistics=True, quant_type="nf4")``, each checkpoint
# weight on its own after it is cut for its GPU): nf4 with double quantization. (transformers'
# ``BitsAndBytesConfig`` defaults to no double quantization; vLLM's loader does not follow it.)
_NF4 = WeightFormat("bnb4", "nf4", 4, double_quant=True)
# MXFP4 (gpt-oss): the MoE experts only; attention, routers, embeddings and the head stay in bf16 (the
# checkpoint's ``modules_to_not_convert``; vLLM's ``Mxfp4Config`` quantizes ``FusedMoE`` layers alone,
# vllm/model_executor/layers/quantization/mxfp4.py ``get_quant_method``).
_MXFP4 = WeightFormat("mxfp4", "fp4", 4, group_size=32)

# Roles whose layers vLLM splits along their input (``RowParallelLinear``).
_ROW_PARALLEL = {ModuleRole.ATTENTION_O.value, ModuleRole.MLP_DOWN.value}
# DeepSeek's low-rank projections are ``ReplicatedLinear`` in vLLM (vllm/model_executor/models/
# deepseek_v2.py: ``self.q_a_proj = ReplicatedLinear(...)``, ``self.kv_a_proj_with_mqa =
# ReplicatedLinear(...)``); their ``*_b_proj`` partners are column-parallel.
_REPLICATED_NAMES = ("q_a_proj", "kv_a_proj_with_mqa")


@dataclass(frozen=True)
class Segment:
    """Rows of a tensor that tensor parallelism splits one way: a projection, or one of a fused layer's parts."""

    rows: int
    heads: int = 0
    """Attention heads along these rows (query, key or value projections), else 0. vLLM gives each GPU
    ``heads / tp`` of them and, with fewer key/value heads than GPUs, replicates one head on each
    (``QKVParallelLinear``: ``num_kv_heads = max(1, total_num_kv_heads // tp_size)``)."""

    def on_gpu(self, tensor_parallel: int) -> int:
        """Rows one GPU holds."""
        if self.heads:
            return self.rows // self.heads * max(1, math.ceil(self.heads / tensor_parallel))
        return math.ceil(self.rows / tensor_parallel)


@dataclass(frozen=True)
class ServedTensor:
    """One stored matrix (or ``count`` identical ones: a fused MoE layer's experts) and how TP splits it.

    1-D parameters are ``rows x 1``; a fused layer (vLLM's QKV under online fp8) has several segments.
    """

    name: str
    segments: tuple[Segment, ...]
    cols: int
    count: int = 1
    split: str = "replicated"
    """One of :data:`SPLITS`."""
    format: WeightFormat | None = None
    """The quantized layout, or ``None``: dense at ``element_bytes`` per element."""
    element_bytes: int = 2

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    def storage(self, tensor_parallel: int = 1, *, pad_vocab: bool = False) -> tuple[int, int, int]:
        """(dense, packed, constant) bytes on one of ``tensor_parallel`` GPUs (1: the whole tensor)."""
        rows, cols = self.rows, self.cols
        if self.split == "rows":
            rows = sum(s.on_gpu(tensor_parallel) for s in self.segments)
        elif self.split == "cols":
            cols = math.ceil(cols / tensor_parallel)
        elif self.split == "vocab":
            padded = -(-rows // VOCAB_PADDING) * VOCAB_PADDING if pad_vocab else rows
            rows = math.ceil(padded / tensor_parallel)
        if self.format is None:
            return self.count * rows * cols * self.element_bytes, 0, 0
        packed, constants = self.format.storage(rows, cols)
        return 0, self.count * packed, self.count * constants


@dataclass(frozen=True)
class ServingWeights:
    """A model's weights served at one precision: bytes exact for the format, whole and per GPU."""

    precision: str
    """As given (``auto`` stays ``auto``; :attr:`label` says what it resolved to)."""
    label: str
    """What the weights are stored as, in a few words (``AWQ 4-bit, group 128``)."""
    dense_bytes: int
    """Weights kept in the dense dtype: embeddings, output head, norms, skipped modules, biases."""
    quantized_bytes: int
    """Packed quantized weights."""
    constant_bytes: int
    """Quantization constants: scales, zero points, ``g_idx``, absmax, code books."""
    quantized_params: int
    """Parameters stored quantized (logical count)."""
    total_params: int
    """All parameters, tied ones once (the inventory's total)."""
    dense_dtype: str
    """Short name of the dense dtype (``bf16``, ``fp16``)."""
    tensors: tuple[ServedTensor, ...] = field(default=(), repr=False)
    """Every stored tensor with how tensor parallelism splits it: what :meth:`per_gpu` adds up."""

    @property
    def total_bytes(self) -> int:
        """All weight bytes of one copy of the model, as a checkpoint in this format stores them."""
        return self.dense_bytes + self.quantized_bytes + self.constant_bytes

    def per_gpu(self, tensor_parallel: int) -> int:
        """Weight bytes on one GPU under vLLM's tensor parallelism of degree ``tensor_parallel``.

        Split: the input embeddings and the output head by vocabulary rows, padded to a multiple of
        :data:`VOCAB_PADDING` first (``VocabParallelEmbedding``/``ParallelLMHead``, so even one GPU
        holds the padding: ``per_gpu(1)`` can exceed :attr:`total_bytes`); the language model's
        block linear layers by output rows (``ColumnParallelLinear``, ``QKVParallelLinear`` with
        key/value heads replicated when there are fewer than GPUs, ``MergedColumnParallelLinear``)
        or, for the attention output and MLP down projections, by input columns
        (``RowParallelLinear``); fused MoE experts by their intermediate size (every GPU holds every
        expert's slice); biases of column-parallel layers with their rows. Quantized layouts are
        computed on each GPU's slice (groups, blocks and scales of the slice). Replicated: norms and
        other 1-D parameters, row-parallel biases, MoE routers and DeepSeek's ``q_a_proj`` /
        ``kv_a_proj_with_mqa`` (``ReplicatedLinear``), linear layers outside the repeated blocks
        and whole vision towers (some vLLM vision encoders are sharded too: this counts them whole).
        """
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise PeftauditError(f"tensor parallel size must be a positive integer, got {tensor_parallel!r}")
        return sum(sum(t.storage(tensor_parallel, pad_vocab=True)) for t in self.tensors)


def serving_weights(inventory: Inventory, precision: str = "auto", *, group_size: int = 128) -> ServingWeights:
    """The bytes of ``inventory``'s weights served at ``precision`` (one of :data:`PRECISIONS`).

    ``group_size`` is AWQ's and GPTQ's input features per scale (128, their default; -1: one
    group per row). Raises :class:`~peftaudit.errors.PeftauditError` (one line) for an unknown
    precision or a bad group size, and :class:`~peftaudit.errors.ConfigError` for ``auto`` on a
    checkpoint whose ``quantization_config`` is not modelled.
    """
    if precision not in PRECISIONS:
        raise PeftauditError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise PeftauditError(f"group size must be a positive integer or -1, got {group_size!r}")
    scheme = _scheme(inventory, precision, group_size)
    tensors = _Builder(inventory, scheme).tensors()
    dense = packed = constants = 0
    for t in tensors:
        d, p, c = t.storage()
        dense, packed, constants = dense + d, packed + p, constants + c
    quantized_params = sum(t.count * t.rows * t.cols for t in tensors if t.format is not None)
    return ServingWeights(
        precision=precision,
        label=scheme.label,
        dense_bytes=dense,
        quantized_bytes=packed,
        constant_bytes=constants,
        quantized_params=quantized_params,
        total_params=inventory.total,
        dense_dtype=scheme.dense_dtype,
        tensors=tensors,
    )


# --- what each precision stores quantized ----------------------------------------------------------


@dataclass(frozen=True)
class _Scheme:
    label: str
    dense_dtype: str
    modules: Mapping[str, WeightFormat] = field(default_factory=dict)
    """Linear module path -> format, for the modules stored quantized."""
    experts: Mapping[str, WeightFormat] = field(default_factory=dict)
    """Fused 3-D expert parameter name -> format."""
    fuse: bool = False
    """Quantize vLLM's fused layers (QKV, gate/up) as one tensor: one scale each (online fp8)."""


def _scheme(inventory: Inventory, precision: str, group_size: int) -> _Scheme:
    if precision in ("bf16", "fp16"):
        return _Scheme(precision, precision)
    checkpoint = _checkpoint_dtype(inventory)
    if precision == "auto":
        return _auto(inventory, checkpoint)
    if precision == "mxfp4":
        return _mxfp4(inventory, checkpoint)
    group = f"group {group_size}" if group_size > 0 else "per channel"
    if precision == "fp8":
        fmt, label, dense = _FP8, "FP8 e4m3, one fp32 scale per layer (vLLM online)", checkpoint
    elif precision == "int8":
        fmt, label, dense = _INT8, "INT8 W8A8, one fp32 scale per output channel", checkpoint
    elif precision == "awq":
        # AutoAWQ's GEMM layout (zero points); vLLM runs AWQ in float16 (AWQConfig.get_supported_act_dtypes).
        fmt, label, dense = WeightFormat("awq", "int", 4, group_size, zero_points=True), f"AWQ 4-bit, {group}", "fp16"
    elif precision == "gptq":
        # AutoGPTQ's layout, g_idx kept; vLLM's GPTQ kernels run in float16 (GPTQConfig).
        fmt, label, dense = WeightFormat("gptq", "int", 4, group_size), f"GPTQ 4-bit, {group}", "fp16"
    else:
        fmt, label, dense = _NF4, "bitsandbytes nf4, double quant (vLLM in-flight)", checkpoint
    modules = {m.path: fmt for m in _decoder_linears(inventory)}
    experts = {p.name: fmt for p in _fused_experts(inventory)}
    return _Scheme(label, dense, modules, experts, fuse=precision == "fp8")


def _auto(inventory: Inventory, dense: str) -> _Scheme:
    raw = inventory.quantization_config
    quant = checkpoint_quantization(raw, inventory.model_type)
    if quant is None:
        if isinstance(raw, Mapping):
            raise ConfigError(
                f"the checkpoint's quantization_config (quant_method {raw.get('quant_method')!r}) is not "
                "modelled for serving; give a precision (bf16, fp8, awq, ...)"
            )
        return _Scheme(f"{dense} (the checkpoint's dtype)", dense)
    if quant.quant_method == "mxfp4":
        return _mxfp4(inventory, dense)
    if not quant.groups:
        return _Scheme(f"{dense} (the checkpoint's dtype; {quant.label} quantizes activations only)", dense)
    # A training recipe may dequantize (DeepSeek-V3's FP8); serving keeps the stored format.
    quant = replace(quant, dequantized=None, reference=None)
    modules = quant.formats(inventory)
    experts = quant.expert_formats(inventory) or _checkpoint_experts(inventory, quant)
    return _Scheme(quant.label, dense, modules, experts)


def _mxfp4(inventory: Inventory, dense: str) -> _Scheme:
    experts = {p.name: _MXFP4 for p in _fused_experts(inventory)}
    if not experts:
        raise PeftauditError("MXFP4 quantizes fused MoE experts (gpt-oss): this model has none")
    return _Scheme("MXFP4 experts, the rest " + dense, dense, experts=experts)


def _checkpoint_experts(inventory: Inventory, quant: CheckpointQuantization) -> dict[str, WeightFormat]:
    """Fused 3-D experts of a checkpoint that stores each expert's projections as quantized linear layers
    (AWQ, GPTQ, bitsandbytes, compressed-tensors MoE checkpoints), unless its skip list names them."""
    fmt = quant.groups[0][1]
    skips = list(quant.skip or ())
    return {p.name: fmt for p in _fused_experts(inventory) if not skips or converts(p.module, skips)}


def _checkpoint_dtype(inventory: Inventory) -> str:
    """The dtype vLLM's ``--dtype auto`` serves the checkpoint in: its config's, float32 as bf16."""
    config = inventory.config or {}
    value = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(value, str):
        text = config.get("text_config")
        if isinstance(text, Mapping):
            value = text.get("dtype") or text.get("torch_dtype")
    if not isinstance(value, str):
        dtypes = [p.dtype for p in inventory.parameters if p.dtype.startswith(("float", "bfloat"))]
        value = max(set(dtypes), key=dtypes.count) if dtypes else "float32"
    dtype = short(value)
    return "bf16" if dtype == "fp32" or dtype not in ("bf16", "fp16") else dtype


def _decoder_linears(inventory: Inventory) -> list[ModuleRecord]:
    """The language model's block linear layers: every vLLM ``LinearBase`` an online method quantizes,
    less the routers vLLM builds unquantized (``quant_config=None``)."""
    skip = {inventory.output_head or ""}
    skip.update(n.rpartition(".")[0] for p in inventory.parameters for n in p.tied_with)
    return [
        m
        for m in inventory.modules
        if m.is_linear
        and m.layer is not None
        and m.path not in skip
        and m.role != ModuleRole.ROUTER
        and tower_of(m.path)[0] == LANGUAGE_MODEL
    ]


def _fused_experts(inventory: Inventory) -> list[ParameterRecord]:
    return [
        p
        for p in inventory.parameters
        if p.kind == "experts" and len(p.shape) == 3 and tower_of(p.name)[0] == LANGUAGE_MODEL
    ]


# --- the tensors, and how tensor parallelism splits them ------------------------------------------


class _Builder:
    def __init__(self, inventory: Inventory, scheme: _Scheme) -> None:
        self.inv = inventory
        self.scheme = scheme
        self.element = nbytes(scheme.dense_dtype)
        self.modules = {m.path: m for m in inventory.modules}
        dims = inventory.dims
        self.heads = dims.num_attention_heads or 0
        self.kv_heads = dims.num_key_value_heads or self.heads
        self.head_dim = dims.head_dim or 0
        self.hidden = dims.hidden_size or 0

    def tensors(self) -> tuple[ServedTensor, ...]:
        out: list[ServedTensor] = []
        fused: dict[tuple[str, str], list[tuple[ParameterRecord, ModuleRecord]]] = {}
        for p in self.inv.parameters:
            fmt = self.scheme.modules.get(p.module) if not p.is_bias and len(p.shape) == 2 else None
            module = self.modules.get(p.module)
            if fmt is not None and module is not None:
                family = _family(module) if self.scheme.fuse else None
                if family is not None:
                    fused.setdefault((module.path.rpartition(".")[0], family), []).append((p, module))
                else:
                    out.append(self._linear(p, module, fmt))
            elif p.name in self.scheme.experts or (p.kind == "experts" and len(p.shape) == 3):
                out.extend(self._experts(p, self.scheme.experts.get(p.name)))
            else:
                out.append(self._dense(p, module))
        for (parent, family), members in fused.items():
            out.extend(self._fused(parent, family, members))
        return tuple(out)

    # A quantized (or dense) block linear layer, split by its vLLM class.
    def _linear(self, p: ParameterRecord, module: ModuleRecord, fmt: WeightFormat | None) -> ServedTensor:
        rows, cols = _out_in(p, module)
        split = self._split(module)
        return ServedTensor(
            p.name, self._segments(module, rows), cols, split=split, format=fmt, element_bytes=self.element
        )

    def _fused(
        self, parent: str, family: str, members: list[tuple[ParameterRecord, ModuleRecord]]
    ) -> list[ServedTensor]:
        cols = {_out_in(p, m)[1] for p, m in members}
        splits = {self._split(m) for _, m in members}
        if len(members) == 1 or len(cols) != 1 or len(splits) != 1:  # not one vLLM layer: each on its own
            return [self._linear(p, m, self.scheme.modules[m.path]) for p, m in members]
        segments = tuple(s for p, m in members for s in self._segments(m, _out_in(p, m)[0]))
        fmt = self.scheme.modules[members[0][1].path]
        name = f"{parent}.{family}_proj.weight"
        return [ServedTensor(name, segments, cols.pop(), split=splits.pop(), format=fmt, element_bytes=self.element)]

    def _experts(self, p: ParameterRecord, fmt: WeightFormat | None) -> list[ServedTensor]:
        count, a, b = p.shape
        last = p.name.rpartition(".")[2]
        down = "down" in last or last in ("w2", "c_proj")
        # transformers stores fused experts (experts, out, in) (Mixtral, Qwen3-MoE, DeepSeek-V3) or
        # (experts, in, out) (gpt-oss): the hidden size tells which side is the input.
        if down:
            rows, cols = (a, b) if a == self.hidden or b != self.hidden else (b, a)
        else:
            rows, cols = (a, b) if b == self.hidden or a != self.hidden else (b, a)
        split = "cols" if down else "rows"
        if "gate_up" in last and rows % 2 == 0 and not self.scheme.fuse:
            # Checkpoints store each expert's gate and up projections apart (their own scales, g_idx).
            half = (Segment(rows // 2),)
            return [
                ServedTensor(f"{p.name}[{part}]", half, cols, count, split, fmt, self.element)
                for part in ("gate", "up")
            ]
        segments = (Segment(rows // 2), Segment(rows // 2)) if "gate_up" in last and rows % 2 == 0 else (Segment(rows),)
        return [ServedTensor(p.name, segments, cols, count, split, fmt, self.element)]

    def _dense(self, p: ParameterRecord, module: ModuleRecord | None) -> ServedTensor:
        language = tower_of(p.name)[0] == LANGUAGE_MODEL
        if language and len(p.shape) == 2 and p.kind in ("embedding", "output_head"):
            return ServedTensor(p.name, (Segment(p.shape[0]),), p.shape[1], split="vocab", element_bytes=self.element)
        if module is not None and module.is_linear and module.layer is not None and language:
            if not p.is_bias and len(p.shape) == 2:
                return self._linear(p, module, None)
            if p.is_bias and self._split(module) == "rows":
                return ServedTensor(
                    p.name, self._segments(module, p.numel), 1, split="rows", element_bytes=self.element
                )
        if p.kind == "experts" and len(p.shape) == 2 and language:  # per-expert biases (gpt-oss)
            last = p.name.rpartition(".")[2]
            split = "replicated" if "down" in last else "rows"
            return ServedTensor(p.name, (Segment(p.shape[1]),), 1, p.shape[0], split, None, self.element)
        return ServedTensor(p.name, (Segment(p.numel),), 1, element_bytes=self.element)

    def _split(self, module: ModuleRecord) -> str:
        if module.layer is None or tower_of(module.path)[0] != LANGUAGE_MODEL:
            return "replicated"
        role = module.role
        last = module.path.rpartition(".")[2]
        if role == ModuleRole.ROUTER or last in _REPLICATED_NAMES:
            return "replicated"
        if role in _ROW_PARALLEL or (role == ModuleRole.SHARED_EXPERT and "down" in last):
            return "cols"
        return "rows"

    def _segments(self, module: ModuleRecord, rows: int) -> tuple[Segment, ...]:
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        if not hd or tower_of(module.path)[0] != LANGUAGE_MODEL:
            return (Segment(rows),)
        role = module.role
        if role == ModuleRole.ATTENTION_Q and rows == nh * hd:
            return (Segment(rows, nh),)
        if role in (ModuleRole.ATTENTION_K, ModuleRole.ATTENTION_V) and rows == nkv * hd:
            return (Segment(rows, nkv),)
        if role == ModuleRole.ATTENTION_QKV and rows == (nh + 2 * nkv) * hd:
            return (Segment(nh * hd, nh), Segment(nkv * hd, nkv), Segment(nkv * hd, nkv))
        return (Segment(rows),)


def _out_in(p: ParameterRecord, module: ModuleRecord) -> tuple[int, int]:
    """(out, in) of a linear layer's weight: GPT-2's ``Conv1D`` stores it transposed."""
    if module.out_features and module.in_features and module.out_features * module.in_features == p.numel:
        return module.out_features, module.in_features
    return p.shape[0], p.shape[1]


def _family(module: ModuleRecord) -> str | None:
    """The vLLM fused layer a module belongs to (``QKVParallelLinear``, ``MergedColumnParallelLinear``)."""
    role = module.role
    last = module.path.rpartition(".")[2]
    if role in (ModuleRole.ATTENTION_Q, ModuleRole.ATTENTION_K, ModuleRole.ATTENTION_V):
        return "qkv"
    if role in (ModuleRole.MLP_GATE, ModuleRole.MLP_UP) or (
        role == ModuleRole.SHARED_EXPERT and ("gate" in last or "up" in last)
    ):
        return "gate_up"
    return None
