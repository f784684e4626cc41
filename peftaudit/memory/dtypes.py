"""Bytes per element (from :data:`peftaudit.units.DTYPE_BYTES`), and the storage of quantized weights.

The quantized layouts are bitsandbytes' (``quantize_4bit``/``quantize_blockwise``
and ``Int8Params``), the block-scaled fp8 layout of DeepSeek-V3/Qwen3-FP8
checkpoints, and the packed-integer layouts of GPTQ, AWQ and compressed-tensors
checkpoints; each function says where its numbers come from. These are the only
copies of the rules: plan-driven quantization (QLoRA) and a checkpoint's own
``quantization_config`` (:mod:`peftaudit.memory.quantized`) both use them.
"""

from __future__ import annotations

import math

from peftaudit.units import DTYPE_BYTES, SHORT_DTYPES

#: torch dtype names (as the inventory records them) to the plan's short names. Plans have no 64-bit
#: float, and a float64 tensor (a buffer) maps to fp32 as it always has.
SHORT: dict[str, str] = {**{name: short for short, name in SHORT_DTYPES.items()}, "float64": "fp32"}

#: bitsandbytes' 4-bit block size (``quantize_4bit(blocksize=64)``, the transformers default).
BNB_4BIT_BLOCK = 64
#: Blocks of absmax values quantized together by double quantization (``blocksize=256``).
BNB_NESTED_BLOCK = 256


def nbytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (short or torch name)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def short(dtype: str) -> str:
    """The plan's short name for a torch dtype name (``bfloat16`` -> ``bf16``)."""
    return SHORT.get(dtype, dtype)


def nf4_bytes(numel: int, *, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quantization-constant bytes) of one bitsandbytes 4-bit weight.

    ``quantize_4bit`` packs two 4-bit codes per byte and keeps one fp32 absmax
    per block of 64. Double quantization (``compress_statistics``) stores those
    absmax values as uint8 in blocks of 256 with one fp32 absmax each, a 256-entry
    fp32 code book and an fp32 offset. Every weight also carries its 16-entry
    fp32 NF4/FP4 code book.
    """
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / BNB_4BIT_BLOCK)
    if double_quant:
        nested = math.ceil(blocks / BNB_NESTED_BLOCK)
        constants = blocks + 4 * nested + 4 * 256 + 4 + 4 * 16
    else:
        constants = 4 * blocks + 4 * 16
    return packed, constants


def int8_bytes(numel: int, out_features: int) -> tuple[int, int]:
    """(weight bytes, constant bytes) of a bitsandbytes ``Linear8bitLt`` weight.

    LLM.int8() stores the weight as int8 with one fp32 scale per output row (``SCB``).
    """
    return numel, 4 * out_features


#: Weight kinds of quantized frozen linear layers, as layer programs see them: bitsandbytes
#: ``nf4``/``fp4`` and ``int8``, block-scaled ``fp8``, and ``int`` (GPTQ, AWQ, compressed-tensors
#: packed integers). All but ``int8`` dequantize the weight for each matmul and keep only the input.
QUANTIZED_KINDS: tuple[str, ...] = ("nf4", "fp4", "int8", "fp8", "int")


def fp8_bytes(out_features: int, in_features: int, block: int | tuple[int, int] | None = 128) -> tuple[int, int]:
    """(weight bytes, constant bytes) of a block-scaled float8 weight.

    One byte per element plus one fp32 inverse scale per 128 x 128 block, the
    ``weight_scale_inv`` layout of DeepSeek-V3 and Qwen3 FP8 checkpoints
    (``weight_block_size``); ``None`` is one scale for the whole tensor.
    """
    if block is None:
        return out_features * in_features, 4
    rows, cols = (block, block) if isinstance(block, int) else block
    scales = math.ceil(out_features / rows) * math.ceil(in_features / cols)
    return out_features * in_features, 4 * scales


def _packed(count: int, bits: int) -> int:
    """Bytes of ``count`` ``bits``-bit values packed into int32 words."""
    return 4 * math.ceil(count * bits / 32)


def gptq_bytes(out_features: int, in_features: int, *, bits: int, group_size: int) -> tuple[int, int]:
    """(weight bytes, constant bytes) of a GPTQ linear layer (AutoGPTQ/optimum ``QuantLinear``).

    ``qweight`` packs ``32 / bits`` values per int32 along the input dimension;
    ``qzeros`` packs one zero point per group and output the same way (stored even
    for symmetric quantization); ``scales`` are fp16 per group and output; ``g_idx``
    is one int32 per input feature. ``group_size`` -1 is one group per output row.
    """
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    weight = out_features * _packed(in_features, bits)
    constants = groups * _packed(out_features, bits) + 2 * groups * out_features + 4 * in_features
    return weight, constants


def awq_bytes(out_features: int, in_features: int, *, bits: int, group_size: int) -> tuple[int, int]:
    """(weight bytes, constant bytes) of an AWQ linear layer (AutoAWQ's GEMM ``WQLinear``).

    ``qweight`` int32 ``(in, out * bits / 32)``, ``qzeros`` int32 ``(in / group, out * bits / 32)``
    and fp16 ``scales`` ``(in / group, out)``.
    """
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    weight = in_features * _packed(out_features, bits)
    constants = groups * _packed(out_features, bits) + 2 * groups * out_features
    return weight, constants


#: Elements per MXFP4 block, each block sharing one 8-bit (E8M0) scale (the OCP Microscaling spec).
MXFP4_BLOCK = 32


def mxfp4_bytes(out_features: int, in_features: int) -> tuple[int, int]:
    """(weight bytes, constant bytes) of an MXFP4 weight, as gpt-oss checkpoints store their experts.

    Each row's input features go in blocks of 32 FP4 (E2M1) values, two to a byte (``*_blocks``, uint8
    ``(..., out, in / 32, 16)``), with one uint8 E8M0 scale per block (``*_scales``, ``(..., out, in / 32)``):
    transformers ``integrations/mxfp4.py``, gpt-oss model card arXiv:2508.10925 section 2.
    """
    blocks = out_features * math.ceil(in_features / MXFP4_BLOCK)
    return blocks * MXFP4_BLOCK // 2, blocks


def packed_int_bytes(
    out_features: int, in_features: int, *, bits: int, scales: int, zero_points: bool, scale_bytes: int = 2
) -> tuple[int, int]:
    """(weight bytes, constant bytes) of a compressed-tensors quantized linear layer.

    ``pack-quantized`` packs each row's ``bits``-bit values into int32 (8-bit values
    are stored as int8, one byte each); ``weight_scale`` holds ``scales`` values in the
    model's dtype, ``weight_zero_point`` as many packed values when asymmetric, and
    packed layers keep their ``weight_shape`` (two int64).
    """
    if bits >= 8:
        weight = out_features * in_features * bits // 8
        shape = 0
    else:
        weight = out_features * _packed(in_features, bits)
        shape = 16
    zeros = _packed(scales, bits) if zero_points else 0
    return weight, scale_bytes * scales + zeros + shape
