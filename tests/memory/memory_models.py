"""Tiny random-init configs of real architectures, for the memory tests.

Real transformers configs with small dimensions (multiples of 16, so the
grouped MoE matmul accepts them), built on the meta device. Sizes are chosen
so that weights, activations and logits are all visible in the totals.
"""

from __future__ import annotations

from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "vocab_size": 1000,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 256,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 1000,
        "n_positions": 1024,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "bert": {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
    },
    "mixtral": {
        "model_type": "mixtral",
        "hidden_size": 256,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 1000,
    },
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1000,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 1000,
    },
}

#: A Llama-2-7B-shaped config (the shape of the published measurements).
LLAMA2_7B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}


def build(name_or_config: str | dict[str, Any], dtype: str = "bfloat16") -> Any:
    """The model on the meta device (causal LM, or masked LM for BERT)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    cfg = AutoConfig.for_model(config["model_type"], **kwargs)
    auto = AutoModelForMaskedLM if config["model_type"] == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(cfg, dtype=getattr(torch, dtype))


def rel_err(value: float, reference: float) -> float:
    """How far ``value`` is from ``reference``, as a fraction (0.1 is 10 % high)."""
    return value / reference - 1.0


#: Config keys that give a stack's depth (text decoders, GPT-2, T5's encoder and decoder, Mllama's
#: global vision layers).
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "n_layers", "num_global_layers")


def reduced_config(config: dict[str, Any], depth: int) -> dict[str, Any]:
    """``config`` with every stack cut to its first ``depth`` layers (per-layer lists cut too).

    The copy a full-depth trace would be too slow for on two cores: the same layers, fewer of them.
    """
    out = dict(config)
    full = next((out[k] for k in DEPTH_KEYS if isinstance(out.get(k), int)), None)
    for key in DEPTH_KEYS:
        if isinstance(out.get(key), int):
            out[key] = min(out[key], depth)
    for key, value in list(out.items()):
        if key == "cross_attention_layers" and isinstance(value, list):
            out[key] = [i for i in value if i < depth]  # Mllama: the cross-attention layers the copy has
        elif key == "intermediate_layers_indices" and isinstance(value, list):
            # Mllama's vision model stacks these layers' outputs (vision_output_dim counts them): as many.
            out[key] = [min(i, depth - 1) for i in value]
        elif isinstance(value, list) and full is not None and len(value) == full:
            out[key] = value[:depth]  # layer_types, no_rope_layers, ...
        elif isinstance(value, dict) and key.endswith("_config"):
            out[key] = reduced_config(value, depth)
    return out
