"""QLoRA's frozen weights against a real 4-bit load: transformers 5 + bitsandbytes on the CPU backend.

Each case saves a tiny random model, loads it back through ``from_pretrained`` with
``BitsAndBytesConfig(load_in_4bit=True)`` (NF4, double quantization), and measures what is
really stored: the packed ``Params4bit`` bytes, their quant states (absmax, code books, offset)
and every weight left unquantized. The estimate's ``base_weights`` and ``quantization_constants``
must equal those bytes. The cases pin down what is easy to get wrong:

- Mixtral's experts are fused 3-D parameters in transformers 5 (``MixtralExperts``): bitsandbytes
  converts only ``nn.Linear`` modules, so QLoRA leaves the experts in 16 bits (issue 14: in
  transformers 4.x each expert was an ``nn.Linear`` and was quantized);
- GPT-2's ``Conv1D`` is converted;
- Falcon's ``FalconLinear`` subclasses ``nn.Linear`` and transformers 5 converts ``type(m) is
  nn.Linear`` only, so nothing in the model is quantized.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate
from peftaudit.memory.dtypes import nbytes, short
from peftaudit.sources.build import build_from_config

pytest.importorskip("bitsandbytes")

_SMALL = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        **_SMALL,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": 128,
        "num_key_value_heads": 2,
    },
    "mixtral": {
        **_SMALL,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": 128,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
    },
    "gpt2": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": 64,
        "n_layer": 1,
        "n_head": 4,
        "n_positions": 64,
        "vocab_size": 128,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "falcon": {
        **_SMALL,
        "model_type": "falcon",
        "architectures": ["FalconForCausalLM"],
        "new_decoder_architecture": False,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
    },
}

#: What a real load quantizes, by family: the modules whose weight is a ``Params4bit``.
QUANTIZED: dict[str, set[str]] = {
    "llama": {f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    | {f"model.layers.0.{m}" for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "mixtral": {f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "gpt2": {f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    "falcon": set(),
}


def _load_4bit(config: dict[str, Any], folder: Path) -> Any:
    import torch
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    torch.manual_seed(0)
    cls(transformers.AutoConfig.for_model(**config)).save_pretrained(folder)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16)


def _quant_state_bytes(state: Any) -> int:
    """Bytes of one weight's bitsandbytes ``QuantState``: absmax, code book, and the nested state's."""
    total = state.absmax.nbytes + state.code.nbytes
    if state.nested:
        total += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    return int(total)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_qlora_base_weights_are_what_a_real_4bit_load_stores(tmp_path: Path, family: str) -> None:
    config = CONFIGS[family]
    real = _load_4bit(config, tmp_path)
    quantized = {n.removesuffix(".weight") for n, p in real.named_parameters() if type(p).__name__ == "Params4bit"}
    assert quantized == QUANTIZED[family]
    constants = sum(_quant_state_bytes(p.quant_state) for p in real.parameters() if type(p).__name__ == "Params4bit")
    stored = sum(p.numel() * p.element_size() for p in real.parameters())  # packed uint8 + 16-bit dense

    inventory = take_inventory(build_from_config(config, model_id=family))
    plan = TrainingPlan(method="qlora", precision="bf16", seq_len=8, batch_size=1, rank=4)
    components = estimate(inventory, plan).components
    buffers = sum(b.numel * nbytes(short(b.dtype)) for b in inventory.buffers)
    assert components["base_weights"] - buffers == stored
    assert components["quantization_constants"] == constants
