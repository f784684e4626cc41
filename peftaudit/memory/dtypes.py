"""Bytes per element, and the storage of quantized weights with their constants.

The quantized layouts are bitsandbytes' (``quantize_4bit``/``quantize_blockwise``
and ``Int8Params``) and the block-scaled fp8 layout of DeepSeek-V3/Qwen3-FP8
checkpoints; each function says where its numbers come from.
"""

from __future__ import annotations

import math

#: Bytes per element of the dtypes the estimator uses (short names, as in the plan).
DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "int32": 4,
    "int64": 8,
    "float64": 8,
}

#: torch dtype names (as the inventory records them) to the plan's short names.
SHORT: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp32"}

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


def fp8_bytes(out_features: int, in_features: int, block: int = 128) -> tuple[int, int]:
    """(weight bytes, constant bytes) of a block-scaled float8 weight.

    One byte per element plus one fp32 inverse scale per 128 x 128 block, the
    ``weight_scale_inv`` layout of DeepSeek-V3 and Qwen3 FP8 checkpoints.
    """
    scales = math.ceil(out_features / block) * math.ceil(in_features / block)
    return out_features * in_features, 4 * scales
