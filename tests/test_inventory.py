"""The inventory's counts against torch's own counts and peft's, on real architectures."""

from __future__ import annotations

import pytest
import tiny
from peft import LoraConfig, get_peft_model

from peftaudit.inventory import KINDS, take_inventory


@pytest.mark.parametrize("name", sorted(tiny.TINY))
def test_total_is_torch_deduplicated_count(name: str) -> None:
    model = tiny.build(name)
    inventory = take_inventory(model)
    # torch's named_parameters() de-duplicates tied tensors: the outside reference.
    assert inventory.total == sum(p.numel() for p in model.parameters())
    assert inventory.weights + inventory.biases == inventory.total
    assert sum(inventory.by_kind().values()) == inventory.total
    assert set(inventory.by_kind()) == set(KINDS)
    assert inventory.buffers_total == sum(b.numel() for b in model.buffers())


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert", "t5", "opt", "falcon", "mixtral"])
def test_trainable_matches_peft_on_meta_model(name: str) -> None:
    model = tiny.build(name)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    inventory = take_inventory(peft_model)
    assert inventory.trainable == trainable
    assert inventory.total == total
    assert inventory.frozen == total - trainable
    adapters = [p for p in inventory.parameters if ".lora_A." in p.name or ".lora_B." in p.name]
    assert adapters and all(p.trainable for p in adapters)
    assert sum(p.numel for p in adapters) == trainable


def test_tied_embedding_counted_once_and_named() -> None:
    untied = take_inventory(tiny.build("llama"))
    tied = take_inventory(tiny.build("llama_tied"))
    vocab, hidden = 128, 64
    assert untied.total - tied.total == vocab * hidden
    assert [g.names for g in tied.tied_groups] == [("model.embed_tokens.weight", "lm_head.weight")]
    record = next(p for p in tied.parameters if p.name == "model.embed_tokens.weight")
    assert record.kind == "embedding"
    assert record.tied_with == ("lm_head.weight",)
    assert not any(p.name == "lm_head.weight" for p in tied.parameters)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "t5"])
def test_output_head_is_what_get_output_embeddings_returns(name: str) -> None:
    # Tied or not, the module itself is recorded: peft's all-linear leaves out exactly this path.
    assert take_inventory(tiny.build(name)).output_head == "lm_head"


def test_a_module_without_output_embeddings_has_no_output_head() -> None:
    import torch

    assert take_inventory(torch.nn.Sequential(torch.nn.Linear(4, 4))).output_head is None


def test_gpt2_conv1d_features_are_read_as_in_out() -> None:
    inventory = take_inventory(tiny.build("gpt2"))
    c_attn = inventory.module("transformer.h.0.attn.c_attn")
    assert c_attn is not None and c_attn.type == "Conv1D" and c_attn.is_linear
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert c_attn.role == "attention.qkv"
    assert inventory.module("transformer.h.0.attn.c_proj").role == "attention.o"  # type: ignore[union-attr]
    assert inventory.module("transformer.h.0.mlp.c_proj").role == "mlp.down"  # type: ignore[union-attr]
    # GPT-2 ties lm_head to wte.
    assert inventory.tied_groups[0].names == ("transformer.wte.weight", "lm_head.weight")


def test_mixtral_fused_experts_router_and_active_parameters() -> None:
    inventory = take_inventory(tiny.build("mixtral"))
    hidden, ffn, experts, layers = 64, 128, 4, 2
    expert_params = layers * experts * (2 * ffn * hidden + hidden * ffn)
    kinds = inventory.by_kind()
    assert kinds["experts"] == expert_params
    assert kinds["router"] == layers * experts * hidden
    assert inventory.moe is not None
    assert inventory.moe.num_experts == experts and inventory.moe.experts_per_token == 2
    assert inventory.moe.active_params == inventory.total - expert_params // 2
    router = inventory.module("model.layers.0.mlp.gate")
    assert router is not None and router.role == "router" and not router.is_linear


def test_layer_index_and_block() -> None:
    inventory = take_inventory(tiny.build("llama"))
    q = next(p for p in inventory.parameters if p.name == "model.layers.1.self_attn.q_proj.weight")
    assert (q.layer, q.block, q.kind, q.module_type) == (1, "model.layers", "weight", "Linear")
    embed = next(p for p in inventory.parameters if p.name == "model.embed_tokens.weight")
    assert (embed.layer, embed.block) == (None, None)


def test_t5_has_two_stacks_of_blocks() -> None:
    inventory = take_inventory(tiny.build("t5"))
    blocks = {p.block for p in inventory.parameters if p.block}
    assert blocks == {"encoder.block", "decoder.block"}
    assert inventory.module("encoder.block.0.layer.0.SelfAttention.q").role == "attention.q"  # type: ignore[union-attr]


def test_biases_are_counted_apart() -> None:
    inventory = take_inventory(tiny.build("qwen2"))
    # Qwen2 has biases on q, k and v only: (64 + 32 + 32) per layer, 2 layers.
    assert inventory.biases == 2 * (64 + 32 + 32)
    assert all(p.kind == "bias" for p in inventory.parameters if p.is_bias)


def test_frozen_parameters_follow_requires_grad() -> None:
    model = tiny.build("llama")
    for name, param in model.named_parameters():
        param.requires_grad_("layers.0." in name)
    inventory = take_inventory(model)
    expected = sum(p.numel() for n, p in model.named_parameters() if "layers.0." in n)
    assert inventory.trainable == expected
    assert inventory.frozen == inventory.total - expected


def test_dims_from_config() -> None:
    inventory = take_inventory(tiny.build("mistral"))
    dims = inventory.dims
    assert (dims.hidden_size, dims.num_layers, dims.num_attention_heads) == (64, 2, 4)
    assert (dims.num_key_value_heads, dims.head_dim, dims.vocab_size) == (1, 16, 96)


def test_convolution_kernels_are_weights_not_experts() -> None:
    import torch

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv1d(8, 8, 5))
    kinds = take_inventory(model, config={}).by_kind()
    assert kinds["experts"] == 0
    assert kinds["weight"] == 8 * 3 * 3 * 3 + 8 * 8 * 5
    assert kinds["bias"] == 16
