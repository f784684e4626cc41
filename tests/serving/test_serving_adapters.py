"""Serving adapters: reading a real saved peft adapter, and vLLM v0.11.0's preallocated LoRA slots.

The slot sizes are checked against stacked buffers built here on the meta device with the shapes
vLLM v0.11.0's ``create_lora_weights`` gives them (restated below with file:line), from the model's
own config values, not from peftaudit's inventory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import TINY

import peftaudit.catalog
from peftaudit.errors import PeftauditError
from peftaudit.serving.adapters import (
    break_even,
    lora_slots,
    merged_bytes,
    punica_metadata_bytes,
    read_adapter,
    vllm_max_lora_rank,
)
from peftaudit.sources.load import load, load_config

LLAMA_8B = "meta-llama/Llama-3.1-8B"


# ------------------------------------------------------------------------------------------------
# A real saved adapter


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in TINY["llama"].items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 16},
        modules_to_save=["lm_head"],
    )
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(_tiny_llama(), config).save_pretrained(str(out))
    return out


def test_read_adapter_bytes_match_the_saved_tensors(saved_adapter: Path) -> None:
    from safetensors import safe_open

    adapter = read_adapter(saved_adapter)
    weights = saved_adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    loaded = sum(t.numel() * t.element_size() for t in tensors.values())
    header = int.from_bytes(weights.read_bytes()[:8], "little")
    assert adapter.tensor_bytes == loaded == weights.stat().st_size - 8 - header
    assert adapter.tensors == len(tensors)
    assert adapter.dtype == "fp32"


def test_read_adapter_reads_the_config_back(saved_adapter: Path) -> None:
    adapter = read_adapter(saved_adapter)
    assert adapter.peft_type == "LORA"
    assert (adapter.rank, adapter.alpha, adapter.max_rank) == (8, 16.0, 16)
    assert set(adapter.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert adapter.modules_to_save == ("lm_head",)
    assert set(adapter.module_kinds) == {"q_proj", "v_proj", "down_proj"}


def test_an_adapters_own_targets_size_the_slots(saved_adapter: Path) -> None:
    adapter = read_adapter(saved_adapter)
    inv = load_config(TINY["llama"], model_id="tiny-llama", origin="test").inventory
    slots = lora_slots(
        inv, max_loras=2, max_lora_rank=vllm_max_lora_rank(adapter.max_rank), targets=adapter.module_kinds
    )
    h, kv_out, inter, layers = 64, 2 * 16, 128, 2
    # (L, 1, r, in) + (L, 1, out, r) per slice, per layer, bf16.
    per_layer = sum(2 * 16 * (i + o) for i, o in ((h, h), (h, kv_out), (inter, h)))
    assert slots.bytes_total == per_layer * layers * 2
    assert slots.modules == ("q_proj", "v_proj", "down_proj")


@pytest.mark.parametrize(
    "files, needle",
    [
        ({"adapter_model.safetensors": b"\0" * 16}, "adapter_config.json"),
        ({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04"}, "never unpickles"),
        ({"adapter_config.json": b"{}", "adapter_model.safetensors": b"\xff" * 12}, "adapter_model.safetensors"),
        ({"adapter_config.json": b"[1]", "adapter_model.safetensors": b""}, "JSON object"),
    ],
    ids=["no-config", "pickle-only", "bad-header", "config-not-object"],
)
def test_read_adapter_refuses_bad_directories(tmp_path: Path, files: dict[str, bytes], needle: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(PeftauditError, match=needle) as info:
        read_adapter(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# vLLM's slots, rebuilt on the meta device


def _catalog_config(model_id: str) -> dict[str, Any]:
    path = Path(peftaudit.catalog.__file__).parent / "models" / f"{model_id.replace('/', '__')}.json"
    config: dict[str, Any] = json.loads(path.read_text())["config"]
    return config


def _pad(n: int, to: int) -> int:
    return math.ceil(n / to) * to


def vllm_llama_buffers(cfg: dict[str, Any], loras: int, rank: int, tp: int, sharded: bool) -> list[torch.Tensor]:
    """The tensors vLLM v0.11.0 allocates on one GPU for LoRA on a LlamaForCausalLM (bf16), on meta.

    * MergedQKVParallelLinearWithLoRA (lora/layers/column_parallel_linear.py:200-223, slices 393-404):
      per q/k/v slice A (L, 1, r or r/tp if fully sharded, hidden), B (L, 1, heads/tp * head_dim or
      max(1, kv/tp) * head_dim, r).
    * MergedColumnParallelLinearWithLoRA (same lines, slices 184-186): gate/up A (L, 1, r', hidden),
      B (L, 1, inter/tp, r).
    * RowParallelLinearWithLoRA (lora/layers/base_linear.py:54-79, row_parallel_linear.py:27-28):
      A (L, 1, r, in/tp), B (L, 1, out or out/tp if fully sharded, r).
    * VocabParallelEmbeddingWithLoRA (lora/layers/vocal_parallel_embedding.py:50-78): A (L, vocab + 256, r),
      B (L, 1, hidden, r), embeddings_tensors (L, 256, hidden).
    * LogitsProcessorWithLoRA (lora/layers/logits_processor.py:91-126): A (L, 1, r, hidden),
      B (L, 1, ceil((vocab + 256) / 256) * 256, r), embeddings_tensors (L, 256, hidden), and for tp > 1 an
      int64 sharded_to_full_mapping over pad(vocab, 256) + 256 rows (vocab_parallel_embedding.py:311-350).
    * The base rows LoRA adds (model_executor/models/llama.py:348-358, 542-557): embed_tokens gets
      256 * L rows (padding 64), an untied lm_head pads vocab + 256 to 256 instead of vocab to 64;
      each rank holds 1/tp of the rows.
    """
    meta, bf16 = "meta", torch.bfloat16
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    a_rank = rank // tp if sharded else rank
    kv_per_rank = 1 if tp >= kv else kv // tp
    out: list[torch.Tensor] = []
    for _ in range(cfg["num_hidden_layers"]):
        for size in (heads // tp * head_dim, kv_per_rank * head_dim, kv_per_rank * head_dim):  # q, k, v
            out += [torch.zeros(loras, 1, a_rank, hidden, dtype=bf16, device=meta)]
            out += [torch.zeros(loras, 1, size, rank, dtype=bf16, device=meta)]
        out += [torch.zeros(loras, 1, rank, heads * head_dim // tp, dtype=bf16, device=meta)]  # o_proj
        out += [torch.zeros(loras, 1, hidden // tp if sharded else hidden, rank, dtype=bf16, device=meta)]
        for _slice in range(2):  # gate, up
            out += [torch.zeros(loras, 1, a_rank, hidden, dtype=bf16, device=meta)]
            out += [torch.zeros(loras, 1, inter // tp, rank, dtype=bf16, device=meta)]
        out += [torch.zeros(loras, 1, rank, inter // tp, dtype=bf16, device=meta)]  # down_proj
        out += [torch.zeros(loras, 1, hidden // tp if sharded else hidden, rank, dtype=bf16, device=meta)]
    out += [
        torch.zeros(loras, vocab + 256, rank, dtype=bf16, device=meta),
        torch.zeros(loras, 1, hidden, rank, dtype=bf16, device=meta),
        torch.zeros(loras, 256, hidden, dtype=bf16, device=meta),
        torch.zeros(loras, 1, rank, hidden, dtype=bf16, device=meta),
        torch.zeros(loras, 1, _pad(vocab + 256, 256), rank, dtype=bf16, device=meta),
        torch.zeros(loras, 256, hidden, dtype=bf16, device=meta),
    ]
    if tp > 1:
        out += [torch.zeros(_pad(vocab, 256) + 256, dtype=torch.long, device=meta)]
    embed_rows = (_pad(vocab, 64) + 256 * loras) // tp - _pad(vocab, 64) // tp
    out += [torch.zeros(embed_rows, hidden, dtype=bf16, device=meta)]
    if not cfg.get("tie_word_embeddings"):
        head_rows = (_pad(vocab, 256) + 256) // tp - _pad(vocab, 64) // tp
        out += [torch.zeros(head_rows, hidden, dtype=bf16, device=meta)]
    return out


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def llama_8b() -> Any:
    return load(LLAMA_8B).inventory


def test_llama_8b_default_slots_equal_vllms_buffers(llama_8b: Any) -> None:
    slots = lora_slots(llama_8b, max_loras=1, max_lora_rank=16, dtype="bf16")
    expected = _nbytes(vllm_llama_buffers(_catalog_config(LLAMA_8B), 1, 16, tp=1, sharded=False))
    assert slots.bytes_total == slots.per_gpu(1) == expected
    # By hand: 32 layers x 1,310,720 slot elements (A 622,592 + B 688,128) x 2 bytes = 80 MiB of linear
    # slots; embedding and LM-head slots 3,170,304 elements each; 256 + 256 extra vocab rows of 4096.
    # No quoted vLLM figure for this was found (vLLM's log folds it into "Model loading took").
    assert expected == 32 * 1_310_720 * 2 + 2 * 3_170_304 * 2 + 512 * 4096 * 2 == 100_761_600
    assert slots.modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    )
    assert sum(value for _, value in slots.per_module) == slots.bytes_total


@pytest.mark.parametrize(("loras", "rank", "tp", "sharded"), [(4, 64, 2, False), (2, 32, 8, True), (3, 16, 16, False)])
def test_llama_8b_slots_per_gpu_equal_vllms_buffers(
    llama_8b: Any, loras: int, rank: int, tp: int, sharded: bool
) -> None:
    slots = lora_slots(llama_8b, max_loras=loras, max_lora_rank=rank, tensor_parallel=tp, fully_sharded=sharded)
    expected = _nbytes(vllm_llama_buffers(_catalog_config(LLAMA_8B), loras, rank, tp=tp, sharded=sharded))
    assert slots.per_gpu(tp) == expected
    assert slots.bytes_total == tp * expected


def test_given_targets_size_only_their_buffers(llama_8b: Any) -> None:
    slots = lora_slots(llama_8b, max_loras=2, max_lora_rank=32, targets=["q_proj", "v_proj"])
    # q: A (2, 1, 32, 4096) + B (2, 1, 4096, 32); v: A (2, 1, 32, 4096) + B (2, 1, 1024, 32); 32 layers, bf16.
    buffers = [torch.zeros(2, 1, 32, 4096, dtype=torch.bfloat16, device="meta") for _ in range(2)]
    buffers += [torch.zeros(2, 1, 4096, 32, dtype=torch.bfloat16, device="meta")]
    buffers += [torch.zeros(2, 1, 1024, 32, dtype=torch.bfloat16, device="meta")]
    assert slots.bytes_total == 32 * _nbytes(buffers)
    assert slots.modules == ("q_proj", "v_proj")


def test_moe_experts_get_no_slots_and_the_router_a_replicated_pair() -> None:
    inv = load_config(TINY["mixtral"], model_id="tiny-mixtral", origin="test").inventory
    slots = lora_slots(inv, max_loras=1, max_lora_rank=8)
    assert "gate" in slots.modules and not any("expert" in m for m in slots.modules)
    assert any("fused MoE" in note for note in slots.notes)
    router = dict(slots.per_module)["gate"]
    assert router == 2 * (8 * 64 + 4 * 8) * 2  # 2 layers x (A (1,1,8,64) + B (1,1,4,8)) x bf16
    assert slots.breakdown(2) and dict(slots.breakdown(2))["gate"] == router  # replicated, not split


def test_tied_head_adds_no_extra_rows_and_qwen2_has_no_embedding_slots() -> None:
    untied = load_config(TINY["llama"], model_id="tiny-llama", origin="test").inventory
    tied = load_config(TINY["llama_tied"], model_id="tiny-llama-tied", origin="test").inventory
    extra = dict(lora_slots(untied, max_lora_rank=8).per_module)["lora_extra_vocab"]
    assert extra == (256 + (_pad(128, 256) + 256 - _pad(128, 64))) * 64 * 2
    assert dict(lora_slots(tied, max_lora_rank=8).per_module)["lora_extra_vocab"] == 256 * 64 * 2
    qwen = lora_slots(load_config(TINY["qwen2"], model_id="tiny-qwen2", origin="test").inventory, max_lora_rank=8)
    assert "lm_head" not in qwen.modules and "embed_tokens" not in qwen.modules


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_lora_rank": 0}, "positive"),
        ({"max_lora_rank": 24}, "use 32"),
        ({"max_lora_rank": 64}, "smaller dimension 32"),  # k_proj: 2 kv heads x 16
        ({"max_lora_rank": 128, "targets": ["q_proj"]}, "smaller dimension 64"),
        ({"max_lora_rank": 8, "max_loras": 0}, "max_loras"),
        ({"max_lora_rank": 8, "targets": ["qkv"]}, "unknown LoRA target 'qkv'"),
        ({"max_lora_rank": 8, "tensor_parallel": 3}, "does not split"),
        ({"max_lora_rank": 8, "dtype": "fp8"}, "dtype"),
    ],
)
def test_lora_slots_refuses_bad_input(kwargs: dict[str, Any], needle: str) -> None:
    inv = load_config(TINY["llama"], model_id="tiny-llama", origin="test").inventory
    with pytest.raises(PeftauditError, match=needle) as info:
        lora_slots(inv, **kwargs)
    assert "\n" not in str(info.value)


def test_models_vllm_serves_no_lora_for_are_refused() -> None:
    gpt2 = load_config(TINY["gpt2"], model_id="tiny-gpt2", origin="test").inventory
    with pytest.raises(PeftauditError, match="SupportsLoRA"):
        lora_slots(gpt2, max_lora_rank=8)
    qwen = load_config(TINY["qwen2"], model_id="tiny-qwen2", origin="test").inventory
    with pytest.raises(PeftauditError, match="embedding_modules"):
        lora_slots(qwen, max_lora_rank=8, targets=["lm_head"])
    big_vocab = load_config({**TINY["llama"], "vocab_size": 257_000}, model_id="tiny-big-vocab", origin="test")
    with pytest.raises(PeftauditError, match="257024"):
        lora_slots(big_vocab.inventory, max_lora_rank=8)
    assert lora_slots(big_vocab.inventory, max_lora_rank=8, targets=["q_proj"]).bytes_total > 0


# ------------------------------------------------------------------------------------------------
# Merged copies, the break-even, the punica metadata


def test_break_even_is_the_first_count_where_merged_copies_cost_more() -> None:
    for weights, slots in [(16_000, 100), (1000, 1000), (1000, 999), (1000, 2500), (7, 0)]:
        n = break_even(weights, slots)
        assert merged_bytes(weights, n) > weights + slots
        assert merged_bytes(weights, n - 1) <= weights + slots
    assert merged_bytes(10, 3) == 30
    with pytest.raises(PeftauditError):
        break_even(0, 10)


def test_punica_metadata_is_negligible() -> None:
    # 8192 tokens, 256 seqs, 4 LoRAs: int64 5 x 8192 + 3 x 256, int32 meta 2 x (2n + 2 x 5 + 6).
    expected = 8 * (5 * 8192 + 3 * 256) + 4 * (2 * 8192 + 16) + 4 * (2 * 256 + 16)
    assert punica_metadata_bytes(8192, 256, 4) == expected < 512 * 1024
