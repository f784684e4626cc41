"""Prefix tuning and p-tuning: the prompt encoders peft trains, tensor by tensor.

Both are peft "prompt learning" methods: the base model stays frozen and a small
prompt encoder trains. Shapes follow peft 0.21.2:

- **prefix tuning** (``tuners/prefix_tuning/model.py:PrefixEncoder``): an embedding of
  ``num_virtual_tokens`` rows of ``num_layers * 2 * token_dim`` (a key and a value per
  layer), or, with ``prefix_projection``, an embedding of ``token_dim`` followed by
  ``Linear(token_dim, E) + Tanh + Linear(E, num_layers * 2 * token_dim)``. ``token_dim``
  and ``E`` come from ``utils/other.py:_prepare_prompt_learning_config``: the hidden size,
  except on configs with ``num_key_value_heads`` (grouped-query attention), where it is
  ``head_dim * num_key_value_heads``; ``E`` defaults to ``token_dim``. Its output becomes
  every attention layer's past keys and values (``peft_model.py:get_prompt``), so each
  layer attends over ``num_virtual_tokens`` more keys than the sequence has tokens.
- **p-tuning** (``tuners/p_tuning/model.py:PromptEncoder``): an embedding ``(V, hidden)``
  and an MLP head ``Linear(h, E) + ReLU + Linear(E, E) + ReLU + Linear(E, h)``, or a
  bidirectional ``LSTM(h, E, num_layers=encoder_num_layers)`` and
  ``Linear(2E, 2E) + ReLU + Linear(2E, h)``; ``E`` defaults to the hidden size. Its output,
  ``(batch, V, hidden)``, is prepended to the input embeddings as prompt tuning's is.

peft builds both encoders in float32 after the model is loaded (``_setup_prompt_encoder``
moves them to the model's device only), so they train in float32 whatever the model's
dtype, and their output is cast to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftaudit.inventory import Inventory, text_config
from peftaudit.memory.checkpointing import CheckpointingRefused
from peftaudit.memory.methods import Adaptation
from peftaudit.memory.plan import PlanError, TrainingPlan

Shape = tuple[int, ...]

#: peft's ``PromptEncoderConfig.encoder_num_layers`` default; the MLP encoder ignores any other value.
MLP_ENCODER_LAYERS = 2


def prompt_dtype(plan: TrainingPlan) -> str:
    """The dtype a prompt's trainable tensors are stored and trained in: float32, as peft builds every
    prompt encoder (prompt tuning's embedding too) after the model is loaded and never casts it
    (``peft_model.py:_setup_prompt_encoder``); only an explicit half-precision adapter dtype changes that."""
    return plan.adapter_dtype if plan.adapter_dtype in ("bf16", "fp16") else "fp32"


def _first(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prompt_dims(inventory: Inventory, method: str) -> tuple[int, int, int]:
    """``(num_layers, token_dim, num_attention_heads)`` as peft's ``_prepare_prompt_learning_config``
    fills them in for ``method`` (``prefix-tuning`` applies the grouped-query-attention rule)."""
    top = inventory.config or {}
    config = text_config(top)  # peft reads a multimodal config's text_config
    dims = inventory.dims
    # peft reads num_hidden_layers off the config object first (transformers maps n_layer to it).
    layers = _first(top, "num_hidden_layers") or _first(config, "num_hidden_layers", "num_layers", "n_layer")
    token_dim = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    layers = layers or dims.num_layers
    token_dim = token_dim or dims.hidden_size
    heads = heads or dims.num_attention_heads
    if not layers or not token_dim or not heads:
        raise PlanError(
            f"{method} needs the model's layers, hidden size and attention heads, which its config does not give"
        )
    if method == "prefix-tuning" and "num_key_value_heads" in config:
        # Grouped-query attention (peft #1901): the prefix holds keys and values at the KV heads' size.
        kv_heads = config["num_key_value_heads"]
        head_dim: Any
        if config.get("global_head_dim") is not None:
            head_dim = config["global_head_dim"]
            kv_heads = config.get("num_global_key_value_heads") or kv_heads
        elif config.get("per_layer_config") is not None:
            # transformers >= 5.15 (Gemma 4): the largest per-layer key/value footprint.
            head_dim = config.get("head_dim", token_dim // heads)
            base_kv = kv_heads
            for layer_config in config["per_layer_config"].values():
                layer_head_dim = layer_config.get("head_dim", config.get("head_dim", token_dim // heads))
                if layer_head_dim > head_dim:
                    head_dim, kv_heads = layer_head_dim, layer_config.get("num_key_value_heads", base_kv)
        elif config.get("head_dim") is not None:
            head_dim = config["head_dim"]
        else:
            head_dim = token_dim // heads
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            # peft multiplies them as they are (a None fails there too).
            raise PlanError(f"{method}: peft cannot size the prefix from num_key_value_heads={kv_heads!r}")
        token_dim, heads = head_dim * kv_heads, kv_heads
    return layers, token_dim, heads


def prefix_tensors(
    virtual_tokens: int, layers: int, token_dim: int, projection: bool, hidden: int | None
) -> tuple[Shape, ...]:
    """The trainable tensors of peft's ``PrefixEncoder`` (``hidden``: ``encoder_hidden_size``)."""
    out = layers * 2 * token_dim
    if not projection:
        return ((virtual_tokens, out),)
    e = hidden or token_dim
    return ((virtual_tokens, token_dim), (e, token_dim), (e,), (out, e), (out,))


def p_tuning_tensors(
    virtual_tokens: int, token_dim: int, encoder: str, hidden: int | None, lstm_layers: int
) -> tuple[Shape, ...]:
    """The trainable tensors of peft's ``PromptEncoder`` (MLP or LSTM head; ``hidden``: ``encoder_hidden_size``)."""
    e = hidden or token_dim
    shapes: list[Shape] = [(virtual_tokens, token_dim)]
    if encoder == "mlp":
        for fan_in, fan_out in ((token_dim, e), (e, e), (e, token_dim)):
            shapes += [(fan_out, fan_in), (fan_out,)]
        return tuple(shapes)
    # torch.nn.LSTM(bidirectional=True): per layer and direction weight_ih (4E, in), weight_hh (4E, E)
    # and two biases (4E); a layer after the first reads both directions (2E).
    for layer in range(lstm_layers):
        fan_in = token_dim if layer == 0 else 2 * e
        shapes += [(4 * e, fan_in), (4 * e, e), (4 * e,), (4 * e,)] * 2
    shapes += [(2 * e, 2 * e), (2 * e,), (token_dim, 2 * e), (token_dim,)]
    return tuple(shapes)


def _check_causal(inventory: Inventory, method: str) -> None:
    """peftaudit builds these with peft's ``CAUSAL_LM`` task (the trace does too): decoder models only.

    Encoder-decoder models (``SEQ_2_SEQ_LM``) get a second set of virtual tokens, and an encoder
    such as BERT has no ``prepare_inputs_for_generation`` for peft's causal-LM wrapper.
    """
    arch = inventory.architecture
    config = inventory.config or {}
    decoder = arch.endswith(("ForCausalLM", "LMHeadModel")) or (
        arch.endswith("ForConditionalGeneration") and not config.get("is_encoder_decoder")
    )
    if not decoder:
        raise PlanError(f"{method} is modelled on causal language models (peft's CAUSAL_LM task), not {arch}")


def _shape_numel(shapes: tuple[Shape, ...]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


class PrefixTuningMethod:
    """peft's prefix tuning: trained keys and values prepended in every attention layer."""

    name = "prefix-tuning"
    description = "prefix tuning: trained key/value prefixes in every attention layer (peft PrefixEncoder)"
    #: peft_model.py:_setup_prompt_encoder raises "does not work with gradient checkpointing" (a ValueError);
    #: read by :func:`peftaudit.memory.checkpointing.checkpointing_refused`, so the sizing searches skip it.
    checkpointing_refusal = "peft's prefix tuning does not work with gradient checkpointing: train it without"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        _check_causal(inventory, self.name)
        if plan.gradient_checkpointing and plan.training:
            raise CheckpointingRefused(self.checkpointing_refusal)
        layers, token_dim, _heads = prompt_dims(inventory, self.name)
        shapes = prefix_tensors(
            plan.num_virtual_tokens, layers, token_dim, plan.prefix_projection, plan.encoder_hidden_size
        )
        return Adaptation(
            self.name,
            prompt_params=_shape_numel(shapes),
            prompt_tensors=shapes,
            prefix_tokens=plan.num_virtual_tokens,
        )


class PTuningMethod:
    """peft's p-tuning: virtual tokens from a trained MLP or LSTM prompt encoder."""

    name = "p-tuning"
    description = "p-tuning: virtual tokens from a trained MLP or LSTM prompt encoder (peft PromptEncoder)"

    def adapt(self, inventory: Inventory, plan: TrainingPlan) -> Adaptation:
        _check_causal(inventory, self.name)
        if plan.prompt_encoder == "mlp" and plan.encoder_layers != MLP_ENCODER_LAYERS:
            # peft warns and ignores it (tuners/p_tuning/model.py): the MLP always has three linear layers.
            raise PlanError("--encoder-layers applies to the LSTM prompt encoder (--prompt-encoder lstm) only")
        _layers, token_dim, _heads = prompt_dims(inventory, self.name)
        shapes = p_tuning_tensors(
            plan.num_virtual_tokens, token_dim, plan.prompt_encoder, plan.encoder_hidden_size, plan.encoder_layers
        )
        return Adaptation(
            self.name,
            virtual_tokens=plan.num_virtual_tokens,
            prompt_params=_shape_numel(shapes),
            prompt_tensors=shapes,
        )


PROMPT_METHODS = (PrefixTuningMethod(), PTuningMethod())
"""The prompt-encoder methods, registered by :mod:`peftaudit.builtin.methods`."""

__all__ = [
    "PROMPT_METHODS",
    "PTuningMethod",
    "PrefixTuningMethod",
    "p_tuning_tensors",
    "prefix_tensors",
    "prompt_dims",
    "prompt_dtype",
]
