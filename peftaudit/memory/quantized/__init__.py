"""A checkpoint's own quantization: how its frozen base weights are stored.

Pre-quantized uploads (``*-bnb-4bit``, GPTQ, AWQ, compressed-tensors, FP8)
carry a ``quantization_config`` in config.json, and ``from_pretrained`` loads
their layers packed whatever the training method asks for: LoRA on a
``*-bnb-4bit`` upload is QLoRA. :func:`checkpoint_quantization` reads that
block the way transformers' quantizers do (which modules stay unquantized
included), and :func:`resolve` decides what the estimate stores:

* the checkpoint's format, for frozen weights (``source="checkpoint"``);
* the plan's dtype where the fine-tuning recipes dequantize first: gpt-oss's
  MXFP4 experts (transformers cannot train them; OpenAI's cookbook loads
  ``Mxfp4Config(dequantize=True)``) and DeepSeek-V3's FP8 weights (DeepSeek
  converts them to bf16 with ``fp8_cast_bf16.py``) (``source="dequantized"``);
* ``--base-dtype``, which always wins (``source="override"``).

Parameter counts stay logical (as published); only the bytes follow the format.
The byte layouts themselves live in :mod:`peftaudit.memory.dtypes`, shared with
plan-driven quantization (QLoRA), so there is one rule per format.
"""

from peftaudit.memory.quantized.config import checkpoint_quantization
from peftaudit.memory.quantized.formats import CheckpointQuantization, WeightFormat
from peftaudit.memory.quantized.storage import ResolvedBase, base_storage, resolve

__all__ = [
    "CheckpointQuantization",
    "ResolvedBase",
    "WeightFormat",
    "base_storage",
    "checkpoint_quantization",
    "resolve",
]
