"""Weights a half-precision load keeps in float32, and quantization leaves alone, against transformers itself.

T5 keeps its feed-forward output ``wo`` in float32 in fp16 loads (``_keep_in_fp32_modules``) and
DeepSeek-V3 its router in fp16 and bf16 loads (``_keep_in_fp32_modules_strict``); quantizers never
convert the first list. Each check loads a tiny random copy of the catalog entry through the real
``from_pretrained`` (a checkpoint saved to ``tmp_path``, CPU) or asks transformers' own quantizer
helpers, and compares with what the estimate and the trace assume.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, keep_fp32, trace
from peftaudit.memory.dtypes import nbytes, nf4_bytes, short
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import entries

#: The catalog entries, cut to a size that saves and loads in a fraction of a second.
SMALL: dict[str, dict[str, Any]] = {
    "google-t5/t5-small": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 2, "num_layers": 1, "vocab_size": 128},
    "deepseek-ai/DeepSeek-V3": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "n_group": 2,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "vocab_size": 128,
        "quantization_config": None,
    },
}


def _config(model_id: str) -> dict[str, Any]:
    entry = next(e for e in entries() if e.id == model_id)
    config = {**entry.config, **SMALL[model_id]}
    return {k: v for k, v in config.items() if v is not None}


def _saved(model_id: str, folder: Path) -> Path:
    """A random-init copy of the small config, saved as a real checkpoint."""
    import torch
    import transformers

    config = _config(model_id)
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    getattr(transformers, config["architectures"][0])(cfg).save_pretrained(folder)
    return folder


def _load(model_id: str, folder: Path, dtype: str) -> Any:
    import torch
    import transformers

    cls = getattr(transformers, _config(model_id)["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]))


@pytest.mark.parametrize(
    ("model_id", "dtype", "kept"),
    [
        ("google-t5/t5-small", "fp16", ".wo.weight"),
        ("google-t5/t5-small", "bf16", None),  # the plain list is for fp16 loads only
        ("deepseek-ai/DeepSeek-V3", "bf16", ".mlp.gate.weight"),
    ],
)
def test_static_memory_follows_from_pretrained(tmp_path: Path, model_id: str, dtype: str, kept: str | None) -> None:
    """Every parameter's dtype, and the frozen weights' bytes, as transformers loads the checkpoint."""
    real = _load(model_id, _saved(model_id, tmp_path), dtype)
    inventory = take_inventory(build_from_config(_config(model_id), model_id=model_id))
    real_dtypes = {n: short(str(p.dtype).removeprefix("torch.")) for n, p in real.named_parameters()}
    ours = {p.name: keep_fp32.dtype_of(inventory, p.name, dtype) for p in inventory.parameters}
    assert ours == real_dtypes
    fp32 = [n for n, d in real_dtypes.items() if d == "fp32"]
    assert (fp32 and all(n.endswith(kept) for n in fp32)) if kept else not fp32
    plan = TrainingPlan(method="lora", precision=dtype, seq_len=8, batch_size=1)
    buffers = sum(b.numel * nbytes(short(b.dtype)) for b in inventory.buffers)
    weights = sum(p.numel() * p.element_size() for p in real.parameters())
    assert estimate(inventory, plan).components["base_weights"] - buffers == weights


def test_qlora_leaves_t5_wo_unquantized_as_transformers_does(tmp_path: Path) -> None:
    """The modules transformers' bitsandbytes quantizer converts (its own helpers decide), and their bytes."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model_id = "google-t5/t5-small"
    real = _load(model_id, _saved(model_id, tmp_path), "bf16")
    # What Bnb4BitHfQuantizer._process_model_before_weight_loading passes to replace_with_bnb_linear.
    skip = HfQuantizer.get_modules_to_not_convert(real, None, real._keep_in_fp32_modules)
    converted = {
        name for name, m in real.named_modules() if type(m) is torch.nn.Linear and should_convert_module(name, skip)
    }
    assert converted and not any(name.endswith(".wo") for name in converted)
    packed = constants = dense = 0
    for name, p in real.named_parameters():
        if name.removesuffix(".weight") in converted:
            size, c = nf4_bytes(p.numel(), double_quant=True)
            packed, constants = packed + size, constants + c
        else:
            dense += p.numel() * p.element_size()
    inventory = take_inventory(build_from_config(_config(model_id), model_id=model_id))
    plan = TrainingPlan(method="qlora", precision="bf16", seq_len=8, batch_size=1)
    components = estimate(inventory, plan).components
    buffers = sum(b.numel * nbytes(short(b.dtype)) for b in inventory.buffers)
    assert components["base_weights"] - buffers == packed + dense
    assert components["quantization_constants"] == constants


@pytest.mark.slow  # derives T5's profile (three traces), then traces: seconds each
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_t5_qlora_traces_and_the_estimate_agrees(precision: str) -> None:
    """T5 QLoRA used to stop in the trace (``wo`` packed: "Autograd not support dtype: Byte")."""
    model_id = "google-t5/t5-small"
    config = _config(model_id)
    plan = TrainingPlan(method="qlora", precision=precision, gradient_checkpointing=True, seq_len=24, batch_size=2)
    estimated = estimate(take_inventory(build_from_config(config, model_id=model_id)), plan)
    assert "approximate-activations" not in [w.code for w in estimated.warnings]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(build_from_config(config, model_id=model_id), plan)
    assert traced.components["base_weights"] == estimated.components["base_weights"]
    assert abs(estimated.allocated_bytes / traced.allocated_bytes - 1) < 0.03
