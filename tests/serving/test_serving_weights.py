"""Served weight bytes (:mod:`peftaudit.serving.weights`), checked against real quantized tensors.

* nf4, fp8, int8: a tiny random-init Llama is quantized on the CPU the way vLLM does it
  (bitsandbytes' ``quantize_4bit`` with vLLM's arguments, per-tensor float8 casting per fused
  vLLM layer, bitsandbytes' per-row int8), whole and cut for each GPU as vLLM cuts it, and
  the real tensors' bytes are added up;
* AWQ and GPTQ: no packer runs on a CPU, so the totals of published checkpoints
  (``data/published_checkpoint_sizes.json``, each cited) are matched to the byte;
* bf16: the real model's own parameter bytes, tied weights once.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from peftaudit.errors import ConfigError, PeftauditError
from peftaudit.serving.weights import PRECISIONS, serving_weights

DATA = Path(__file__).parent / "data"
PUBLISHED = json.loads((DATA / "published_checkpoint_sizes.json").read_text())["checkpoints"]

# A Llama with a vocabulary that is not a multiple of 64 (vLLM pads it) and two key/value heads
# (replicated on four GPUs).
TINY: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}
HEAD_DIM = 64
# vLLM pads vocabulary-parallel embeddings to a multiple of 64 rows before splitting them
# (vllm/model_executor/layers/vocab_parallel_embedding.py: DEFAULT_VOCAB_PADDING_SIZE = 64).
VOCAB_PADDING = 64
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A real, randomly initialised tiny Llama on the CPU (bf16) and its inventory."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftaudit.inventory import take_inventory

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(LlamaConfig(**TINY, dtype="bfloat16")).to(torch.bfloat16)
        return model, take_inventory(model)


def _linears(model: Any) -> dict[str, Any]:
    """The decoder blocks' linear weights by name: what every quantized precision converts."""
    return {
        name: p.detach() for name, p in model.named_parameters() if ".layers." in name and name.endswith("_proj.weight")
    }


def _shard(name: str, weight: Any, tp: int) -> Any:
    """Rank 0's slice of a linear weight under vLLM's tensor parallelism."""
    if any(f".{n}." in name for n in ROW):
        return weight[:, : weight.shape[1] // tp]
    rows = weight.shape[0]
    if any(f".{n}." in name for n in ("k_proj", "v_proj")):
        heads = rows // HEAD_DIM
        return weight[: HEAD_DIM * max(1, heads // tp)]  # fewer key/value heads than GPUs: one each
    return weight[: rows // tp]


def _dense_bytes_on_gpu(model: Any, tp: int) -> int:
    """Bytes of everything but the block linear weights on one GPU: embeddings and head by padded vocab."""
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight") and ".layers." in name:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            padded = -(-p.shape[0] // VOCAB_PADDING) * VOCAB_PADDING
            total += padded // tp * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def _nf4_bytes(weight: Any) -> int:
    """vLLM's in-flight bitsandbytes call (bitsandbytes_loader.py, _unquantized_generator) on the CPU."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.contiguous(), compress_statistics=True, quant_type="nf4")
    tensors = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- against real quantized tensors ----------------------------------------------------------------


def test_nf4_bytes_are_bitsandbytes_own(tiny: tuple[Any, Any]) -> None:
    pytest.importorskip("bitsandbytes")
    model, inventory = tiny
    served = serving_weights(inventory, "nf4")
    linears = _linears(model)
    assert served.quantized_bytes + served.constant_bytes == sum(_nf4_bytes(w) for w in linears.values())
    assert served.quantized_params == sum(w.numel() for w in linears.values())
    assert served.dense_bytes == sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n not in linears
    )
    # vLLM quantizes each GPU's slice after cutting it: the slices' quantization states, not the whole's.
    for tp in (2, 4):
        real = sum(_nf4_bytes(_shard(n, w, tp)) for n, w in linears.items()) + _dense_bytes_on_gpu(model, tp)
        assert served.per_gpu(tp) == real


def _fp8_bytes(weight: Any) -> int:
    """Per-tensor float8 e4m3 with one fp32 scale, as vLLM's ``scaled_fp8_quant(weight, scale=None)``."""
    import torch

    scale = (weight.float().abs().max() / torch.finfo(torch.float8_e4m3fn).max).reshape(1)
    codes = (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.numel() * codes.element_size() + scale.numel() * scale.element_size()


def _vllm_layers(model: Any, tp: int = 1) -> list[Any]:
    """Each block's weights as vLLM's fused layers hold them: qkv_proj, o_proj, gate_up_proj, down_proj."""
    import torch

    linears = _linears(model)
    layers = []
    for i in range(TINY["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."

        def shard(name: str) -> Any:
            return _shard(name, linears[name], tp)

        layers.append(torch.cat([shard(a + f"{n}.weight") for n in ("q_proj", "k_proj", "v_proj")]))
        layers.append(shard(a + "o_proj.weight"))
        layers.append(torch.cat([shard(m + f"{n}.weight") for n in ("gate_proj", "up_proj")]))
        layers.append(shard(m + "down_proj.weight"))
    return layers


def test_fp8_bytes_are_per_tensor_float8_of_vllms_layers(tiny: tuple[Any, Any]) -> None:
    model, inventory = tiny
    served = serving_weights(inventory, "fp8")
    assert served.quantized_bytes + served.constant_bytes == sum(_fp8_bytes(w) for w in _vllm_layers(model))
    assert served.constant_bytes == 4 * 4 * TINY["num_hidden_layers"]  # one fp32 scale per fused layer
    for tp in (2, 4):
        real = sum(_fp8_bytes(w) for w in _vllm_layers(model, tp)) + _dense_bytes_on_gpu(model, tp)
        assert served.per_gpu(tp) == real


def test_int8_bytes_are_per_channel_int8(tiny: tuple[Any, Any]) -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    model, inventory = tiny
    served = serving_weights(inventory, "int8")
    real = 0
    for weight in _linears(model).values():
        codes, row_scales, _ = functional.int8_vectorwise_quant(weight.half())
        assert str(row_scales.dtype) == "torch.float32" and row_scales.numel() == weight.shape[0]
        real += codes.numel() * codes.element_size() + row_scales.numel() * row_scales.element_size()
    assert served.quantized_bytes + served.constant_bytes == real


def test_bf16_bytes_are_the_models_own_with_tied_weights_once() -> None:
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from peftaudit.inventory import take_inventory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)).to(torch.bfloat16)
        inventory = take_inventory(model)
    served = serving_weights(inventory, "bf16")
    assert served.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())  # tied once
    # One padded vocabulary matrix per GPU, not two.
    vocab = -(-TINY["vocab_size"] // VOCAB_PADDING) * VOCAB_PADDING
    assert served.per_gpu(1) - served.total_bytes == (vocab - TINY["vocab_size"]) * TINY["hidden_size"] * 2


# --- against published checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> Any:
    from peftaudit.sources.load import load

    cache: dict[str, Any] = {}

    def get(model_id: str) -> Any:
        if model_id not in cache:
            cache[model_id] = load(model_id).inventory
        return cache[model_id]

    return get


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e["catalog_model"] + ":" + e["precision"] for e in PUBLISHED])
def test_published_checkpoint_totals(catalog: Any, entry: dict[str, Any]) -> None:
    inventory = catalog(entry["catalog_model"])
    by_precision = serving_weights(inventory, entry["precision"], group_size=entry["group_size"])
    assert by_precision.total_bytes == entry["total_size"]
    own = dataclasses.replace(inventory, quantization_config=entry["quantization_config"])
    auto = serving_weights(own, "auto")
    assert auto.total_bytes == entry["total_size"]
    assert auto.label == by_precision.label


def test_gptq_differs_from_awq_by_its_g_idx(catalog: Any) -> None:
    inventory = catalog("meta-llama/Llama-3.1-8B")
    gptq, awq = serving_weights(inventory, "gptq"), serving_weights(inventory, "awq")
    layers = inventory.dims.num_layers
    hidden, intermediate = inventory.dims.hidden_size, inventory.dims.intermediate_size
    # q, k, v, o, gate, up read the hidden state; down reads the intermediate one: one int32 each.
    assert gptq.total_bytes - awq.total_bytes == 4 * layers * (6 * hidden + intermediate)


def test_gptq_g_idx_per_gpu_follows_the_split(catalog: Any) -> None:
    # Column-parallel layers keep every input feature on each GPU (a whole g_idx); row-parallel ones
    # (o_proj, down_proj: RowParallelLinear) keep a 1/tp slice of them.
    inventory = catalog("meta-llama/Llama-3.1-8B")
    gptq, awq = serving_weights(inventory, "gptq"), serving_weights(inventory, "awq")
    layers, hidden, intermediate = (
        inventory.dims.num_layers,
        inventory.dims.hidden_size,
        inventory.dims.intermediate_size,
    )
    for tp in (2, 8):
        g_idx = 4 * layers * (5 * hidden + hidden // tp + intermediate // tp)
        assert gptq.per_gpu(tp) - awq.per_gpu(tp) == g_idx


# --- what each precision keeps dense, and per-GPU rules -----------------------------------------------


def test_split_follows_vllms_layer_classes(tiny: tuple[Any, Any]) -> None:
    # vllm/model_executor/models/llama.py: QKVParallelLinear and MergedColumnParallelLinear (rows),
    # RowParallelLinear o_proj/down_proj (columns), VocabParallelEmbedding/ParallelLMHead (vocab).
    _, inventory = tiny
    splits = {t.name: t.split for t in serving_weights(inventory, "awq").tensors}
    for name in COLUMN:
        assert {s for n, s in splits.items() if f".{name}." in n} == {"rows"}, name
    for name in ROW:
        assert {s for n, s in splits.items() if f".{name}." in n} == {"cols"}, name
    assert splits["model.embed_tokens.weight"] == splits["lm_head.weight"] == "vocab"
    assert {s for n, s in splits.items() if "norm" in n} == {"replicated"}


def test_every_precision_keeps_embeddings_head_and_norms_dense(tiny: tuple[Any, Any]) -> None:
    model, inventory = tiny
    linear_params = sum(w.numel() for w in _linears(model).values())
    for precision in PRECISIONS:
        if precision == "mxfp4":  # MoE experts only: a dense model has none to quantize
            with pytest.raises(PeftauditError, match="MXFP4 quantizes fused MoE experts"):
                serving_weights(inventory, precision)
            continue
        served = serving_weights(inventory, precision)
        assert served.total_params == inventory.total
        expected = 0 if precision in ("auto", "bf16", "fp16") else linear_params
        assert served.quantized_params == expected, precision


def test_auto_follows_the_checkpoints_quantization_config(tiny: tuple[Any, Any]) -> None:
    _, inventory = tiny
    gptq = dataclasses.replace(inventory, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 64})
    assert serving_weights(gptq, "auto").total_bytes == serving_weights(inventory, "gptq", group_size=64).total_bytes
    assert serving_weights(inventory, "auto").label == "bf16 (the checkpoint's dtype)"
    mxfp4 = dataclasses.replace(inventory, quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(PeftauditError, match="MXFP4 quantizes fused MoE experts"):
        serving_weights(mxfp4, "auto")
    unknown = dataclasses.replace(inventory, quantization_config={"quant_method": "hqq"})
    with pytest.raises(ConfigError, match="'hqq'"):
        serving_weights(unknown, "auto")


def test_float32_checkpoints_are_served_in_half_precision() -> None:
    from peftaudit.sources.load import load

    inventory = load("openai-community/gpt2").inventory  # float32 weights
    served = serving_weights(inventory, "auto")
    assert served.dense_dtype == "bf16"
    assert served.total_bytes == 2 * inventory.total


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda inv: serving_weights(inv, "int4"), "unknown precision 'int4'"),
        (lambda inv: serving_weights(inv, "awq", group_size=0), "group size"),
        (lambda inv: serving_weights(inv, "bf16").per_gpu(0), "tensor parallel size"),
    ],
)
def test_bad_input_is_one_line(tiny: tuple[Any, Any], call: Any, message: str) -> None:
    with pytest.raises(PeftauditError, match=message) as error:
        call(tiny[1])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model_id", "published_gib"), [("openai/gpt-oss-120b", 60.8), ("openai/gpt-oss-20b", 12.8)])
def test_mxfp4_checkpoints_match_the_model_cards_sizes(model_id: str, published_gib: float) -> None:
    """gpt-oss stores its MoE experts in MXFP4 (4-bit values, one 8-bit scale per 32) and the rest in bf16: the
    model card (arXiv:2508.10925, Table 1) gives checkpoint sizes of 60.8 GiB and 12.8 GiB, to 0.1 GiB. The
    catalog entries keep the Hub's quantization_config, so ``auto`` serves them packed."""
    from peftaudit.sources.load import load

    inventory = load(model_id).inventory
    served = serving_weights(inventory, "auto")
    assert served.label == "MXFP4 experts, the rest bf16"
    assert round(served.total_bytes / 2**30, 1) == published_gib
    assert served.total_bytes == serving_weights(inventory, "mxfp4").total_bytes
    # Everything but the experts stays bf16: the packed part is the experts' 4.25 bits a parameter.
    experts = sum(p.numel for p in inventory.parameters if p.kind == "experts" and len(p.shape) == 3)
    assert served.quantized_bytes + served.constant_bytes == experts // 2 + experts // 32
