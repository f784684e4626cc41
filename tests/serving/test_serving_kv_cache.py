"""KV cache sizes (:mod:`peftaudit.serving.kv_cache`) against what the engines really hold.

transformers: for every distinct generating architecture in the catalog, the real model class is built
from its catalog config cut to 6 layers (head counts, head sizes, hidden sizes and the layer-type pattern
kept; sliding windows set to 5 so an 8-token prompt plus one decode step overflows them) under fake
tensors, run once with ``use_cache=True`` and once more for one generated token, and every cache layer's
key and value tensors' bytes are compared with the estimate for that layer.

vLLM (not installed): per-token sizes against numbers outside our code: vLLM 0.11.0's own source (page
formula, MLA head size, grouping docs), the DeepSeek ISCA'25 paper's table, and vLLM start-up logs whose
"Available KV cache memory" and "GPU KV cache size" lines pin the bytes per token.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from peftaudit.errors import PeftauditError
from peftaudit.serving.kv_cache import (
    LayerCache,
    kv_bytes_per_token,
    kv_heads_split,
    layer_caches,
    sequence_bytes,
)
from peftaudit.sources.catalog import entries
from peftaudit.sources.load import load

LAYERS = 6  # gemma-3 needs 6 to reach its first full layer; Mllama's first cross layer is 3
WINDOW = 5  # transformers keeps window - 1 = 4 tokens
PROMPT = 8
CONTEXT = PROMPT + 1  # after one decode step
ENCODER_TOKENS = 12  # T5's encoder input, unlike its decoder length so the two cannot be confused
BF16 = 2
GIB = 2**30


def _text(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


@functools.cache
def _catalog() -> dict[str, dict[str, Any]]:
    return {entry.id: dict(entry.config) for entry in entries()}


def _architecture(config: dict[str, Any]) -> str:
    return str((config.get("architectures") or [""])[0])


@functools.cache
def _generates(architecture: str) -> bool:
    """transformers' own answer: the class can ``generate()`` (has GenerationMixin)."""
    import transformers

    return bool(getattr(transformers, architecture).can_generate())


def _representatives() -> list[str]:
    """One catalog model per generating architecture and attention layout (sliding or not, layer_types)."""
    chosen: dict[tuple[Any, ...], str] = {}
    for model_id, config in sorted(_catalog().items()):
        architecture = _architecture(config)
        if not _generates(architecture):
            continue
        text = _text(config)
        key = (architecture, text.get("model_type"), text.get("sliding_window") is not None, "layer_types" in text)
        chosen.setdefault(key, model_id)
    return sorted(chosen.values())


def _cut(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    text = _text(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        if isinstance(text.get(key), int):
            text[key] = min(text[key], LAYERS)
    if text.get("layer_types"):
        text["layer_types"] = text["layer_types"][:LAYERS]
    if text.get("sliding_window"):
        text["sliding_window"] = WINDOW
    if text.get("cross_attention_layers"):
        text["cross_attention_layers"] = [i for i in text["cross_attention_layers"] if i < LAYERS]
    return config


def _generate_two_steps(architecture: str, config: Any) -> tuple[Any, Any]:
    """Build ``architecture`` under fake tensors, prefill PROMPT tokens, decode one: (model, cache)."""
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, architecture)
    with FakeTensorMode(allow_non_fake_inputs=True), no_init_weights(), torch.no_grad():
        model = cls._from_config(config, dtype=torch.bfloat16)
        ids = torch.zeros(1, PROMPT, dtype=torch.long)
        if config.is_encoder_decoder:
            encoder_ids = torch.zeros(1, ENCODER_TOKENS, dtype=torch.long)
            out = model(input_ids=encoder_ids, decoder_input_ids=ids, use_cache=True)
            encoded = (out.encoder_last_hidden_state,)
            out = model(encoder_outputs=encoded, decoder_input_ids=ids[:, :1], cache=out.cache, use_cache=True)
        elif config.model_type == "mllama":
            # One image at the catalog's full tile count: the cross layers cache what the vision model emits.
            vision = config.vision_config
            tiles = vision.max_num_tiles
            pixels = torch.zeros(1, 1, tiles, 3, vision.image_size, vision.image_size, dtype=torch.bfloat16)
            out = model(
                input_ids=ids,
                pixel_values=pixels,
                aspect_ratio_ids=torch.ones(1, 1, dtype=torch.long),
                aspect_ratio_mask=torch.ones(1, 1, tiles, dtype=torch.long),
                cross_attention_mask=torch.ones(1, PROMPT, 1, tiles, dtype=torch.long),
                use_cache=True,
            )
            mask = torch.ones(1, 1, 1, tiles, dtype=torch.long)
            out = model(input_ids=ids[:, :1], cross_attention_mask=mask, cache=out.cache, use_cache=True)
        else:
            out = model(input_ids=ids, use_cache=True)
            out = model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
    return model, out.cache


def _held_bytes(cache: Any, estimate: LayerCache, encoder_decoder: bool) -> int:
    """Bytes of the key and value tensors the real cache layer holds (batch 1)."""
    if encoder_decoder:
        half = cache.cross_attention_cache if estimate.kind == "cross" else cache.self_attention_cache
        layer = half.layers[estimate.layer]
    else:
        layer = cache.layers[estimate.layer]
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return int(keys.nbytes + values.nbytes)


def _compare_with_forward(architecture: str, config: Any) -> tuple[LayerCache, ...]:
    from peftaudit.inventory import take_inventory

    model, cache = _generate_two_steps(architecture, config)
    inventory = take_inventory(model)  # config = model.config.to_dict(), what the model was built from
    encoder_tokens = ENCODER_TOKENS if config.is_encoder_decoder else None
    estimates = layer_caches(inventory, "transformers", encoder_tokens=encoder_tokens)
    for estimate in estimates:
        held = _held_bytes(cache, estimate, bool(config.is_encoder_decoder))
        assert held == estimate.sequence_bytes(CONTEXT, BF16), (architecture, estimate)
    # Every layer the cache has is accounted for, once per kind.
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if config.is_encoder_decoder else [cache]
    assert len(estimates) == sum(len(c.layers) for c in caches)
    return estimates


@pytest.mark.parametrize("model_id", _representatives())
def test_transformers_cache_bytes_match_a_real_forward(model_id: str) -> None:
    from transformers import AutoConfig

    raw = _cut(_catalog()[model_id])
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    estimates = _compare_with_forward(_architecture(_catalog()[model_id]), config)
    # Where the model slides, the cap is exercised: those layers keep fewer tokens than the context.
    assert all(e.tokens_kept(CONTEXT) == WINDOW - 1 for e in estimates if e.kind == "sliding")


def test_representatives_cover_every_generating_architecture() -> None:
    generating = {_architecture(c) for c in _catalog().values() if _generates(_architecture(c))}
    covered = {_architecture(_catalog()[m]) for m in _representatives()}
    assert covered == generating
    # Catalog layouts the brief names: T5, Mllama, DeepSeek-V3, gpt-oss, gemma-2/3, Mistral, Phi-3, Falcon, OPT, GPT-2.
    assert {
        "T5ForConditionalGeneration",
        "MllamaForConditionalGeneration",
        "DeepseekV3ForCausalLM",
        "GptOssForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForConditionalGeneration",
        "MistralForCausalLM",
        "Phi3ForCausalLM",
        "FalconForCausalLM",
        "OPTForCausalLM",
        "GPT2LMHeadModel",
    } <= covered


def test_layers_without_attention_hold_no_kv() -> None:
    """A hybrid linear-attention model (Qwen3-Next layout): its linear layers hold no keys or values."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen3_next",
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        vocab_size=128,
    )
    estimates = _compare_with_forward("Qwen3NextForCausalLM", config)
    assert [e.kind for e in estimates] == ["none", "none", "none", "full"]
    assert all(e.note and e.bytes_per_token(BF16) == 0 for e in estimates[:3])


@pytest.mark.parametrize("model_id", sorted(m for m, c in _catalog().items() if not _generates(_architecture(c))))
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_models_that_do_not_generate_raise_one_line(model_id: str, engine: str) -> None:
    inventory = load(model_id).inventory
    with pytest.raises(PeftauditError, match="not a generative model") as info:
        layer_caches(inventory, engine)
    assert "\n" not in str(info.value)


@functools.cache
def _caches(model_id: str, engine: str) -> tuple[LayerCache, ...]:
    return layer_caches(load(model_id).inventory, engine)


# --- transformers rules on the full catalog configs -------------------------------------------------------


def test_transformers_sliding_layers_keep_window_minus_one() -> None:
    """cache_utils.py:244-247 (5.25): "Only cache the last `self.sliding_window - 1` tokens"."""
    mistral = _caches("mistralai/Mistral-7B-v0.1", "transformers")  # config sliding_window 4096, no layer_types
    assert {(c.kind, c.window) for c in mistral} == {("sliding", 4095)}
    assert mistral[0].tokens_kept(10_000) == 4095 and mistral[0].tokens_kept(100) == 100
    phi3 = _caches("microsoft/Phi-3-mini-4k-instruct", "transformers")  # sliding_window 2047
    assert {(c.kind, c.window) for c in phi3} == {("sliding", 2046)}
    gemma3 = _caches("google/gemma-3-27b-pt", "transformers")
    assert Counter((c.kind, c.window) for c in gemma3) == {("sliding", 1023): 52, ("full", None): 10}


def test_transformers_mllama_caches_one_image_of_vision_tokens() -> None:
    caches = _caches("meta-llama/Llama-3.2-11B-Vision", "transformers")
    cross = [c for c in caches if c.kind == "cross"]
    assert [c.layer for c in cross] == [3, 8, 13, 18, 23, 28, 33, 38]
    # 4 tiles x ((560 // 14) ** 2 patches + 1 class token), what the fake forward above also holds.
    assert {c.fixed_tokens for c in cross} == {4 * 1601}
    assert sequence_bytes(cross, 10, BF16) == 8 * 6404 * 2 * 8 * 128 * BF16


def test_t5_cross_attention_follows_the_encoder_length() -> None:
    inventory = load("google-t5/t5-small").inventory
    caches = layer_caches(inventory, encoder_tokens=512)
    self_layers = [c for c in caches if c.kind == "full"]
    cross = [c for c in caches if c.kind == "cross"]
    assert len(self_layers) == len(cross) == 6
    assert sequence_bytes(cross, 1, BF16) == 6 * 512 * 2 * 8 * 64 * BF16
    # Without an encoder length the cross cache is as long as the context; per-token counts it then.
    default = layer_caches(inventory)
    assert kv_bytes_per_token(default, BF16) == 2 * kv_bytes_per_token(caches, BF16)


# --- vLLM rules -------------------------------------------------------------------------------------------

# Per-token KV bytes at bf16 from Table 1 of "Insights into DeepSeek-V3: Scaling Challenges and Reflections
# on Hardware for AI Architectures" (ISCA '25, https://arxiv.org/abs/2505.09343): 70.272 KB, 327.680 KB,
# 516.096 KB (decimal KB).
PUBLISHED_BF16_BYTES_PER_TOKEN = {
    "deepseek-ai/DeepSeek-V3": 70_272,
    "Qwen/Qwen2.5-72B": 327_680,
    "meta-llama/Llama-3.1-405B": 516_096,
}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_BF16_BYTES_PER_TOKEN))
def test_bytes_per_token_match_the_deepseek_v3_paper(model_id: str) -> None:
    for engine in ("vllm", "transformers"):  # transformers 5.25 keeps DeepSeek-V3's latent too (512 + 64)
        assert kv_bytes_per_token(_caches(model_id, engine), BF16) == PUBLISHED_BF16_BYTES_PER_TOKEN[model_id]


def test_vllm_mla_is_one_576_element_latent_per_layer() -> None:
    """vLLM 0.11.0 MLA backends take head size 576 only (v1/attention/backends/mla/common.py:297-299,
    ``get_supported_head_sizes`` returns ``[576]``) with one KV head and no factor 2
    (``MLAAttentionSpec.page_size_bytes``, v1/kv_cache_interface.py:146-153)."""
    caches = _caches("deepseek-ai/DeepSeek-V3", "vllm")
    assert len(caches) == 61
    assert {(c.kind, c.key_elements, c.value_elements, c.kv_heads) for c in caches} == {("mla", 576, 0, 1)}
    # Every tensor-parallel rank holds the whole latent.
    assert sequence_bytes(caches, 1000, BF16, tensor_parallel=8) == sequence_bytes(caches, 1000, BF16)
    assert kv_heads_split(caches, 8) == (1, True)


def test_vllm_unsupported_architectures_raise() -> None:
    """vLLM 0.11.0 registry.py:334-343: Mllama and the encoder-decoders but Whisper went with V0 (0.10.2)."""
    for model_id in ("meta-llama/Llama-3.2-11B-Vision", "google-t5/t5-small"):
        with pytest.raises(PeftauditError, match=r"vLLM 0\.11\.0"):
            layer_caches(load(model_id).inventory, "vllm")


def test_vllm_sliding_layers() -> None:
    """arg_utils.py:1172-1177: models that are not interleaved slide every layer by the config's window;
    interleaved ones per layer (gemma2.py:148-149, gemma3.py:151-152), gpt-oss the even layers (gpt_oss.py:107)."""
    assert {(c.kind, c.window) for c in _caches("mistralai/Mistral-7B-v0.1", "vllm")} == {("sliding", 4096)}
    assert {(c.kind, c.window) for c in _caches("microsoft/Phi-3-mini-4k-instruct", "vllm")} == {("sliding", 2047)}
    assert {c.kind for c in _caches("Qwen/Qwen2.5-7B", "vllm")} == {"full"}  # use_sliding_window false
    gpt_oss = _caches("openai/gpt-oss-20b", "vllm")
    assert [c.kind for c in gpt_oss[:4]] == ["sliding", "full", "sliding", "full"]
    assert {c.window for c in gpt_oss if c.kind == "sliding"} == {128}


def test_vllm_pads_hybrid_groups_like_its_design_doc() -> None:
    """docs/design/hybrid_kv_cache_manager.md (v0.11.0), case 3: gemma-3-27b's 52 sliding + 10 full layers
    make groups of 10, the last sliding group holding 2 layers and 8 padding layers."""
    caches = _caches("google/gemma-3-27b-pt", "vllm")
    real = Counter(c.kind for c in caches if c.layer >= 0)
    padding = [c for c in caches if c.layer == -1]
    assert real == {"sliding": 52, "full": 10}
    assert len(padding) == 8 and {c.kind for c in padding} == {"sliding"} and all(c.note for c in padding)
    assert not [c for c in _caches("openai/gpt-oss-120b", "vllm") if c.layer == -1]  # 18 + 18: no padding


def test_vllm_sliding_blocks() -> None:
    """Blocks a sliding layer holds per request, against vLLM's own worked examples."""
    # kv_cache_interface.py:209-213: block size 4, window 4: the window [CDEF] of 6 tokens takes [XXCD] [EF].
    layer = LayerCache(0, "sliding", 8, 8, 1, window=4)
    assert layer.blocks(6, 4, scheduled=2) == 2
    # hybrid_kv_cache_manager.md: block size 16, window 32, request of 112 tokens: 7 blocks for a full
    # layer, 2 for each sliding group.
    assert LayerCache(0, "full", 8, 8, 1).blocks(112, 16) == 7
    assert LayerCache(0, "sliding", 8, 8, 1, window=32).blocks(112, 16) == 2
    # Never more than SlidingWindowSpec.max_memory_usage_bytes allows: cdiv(window - 1 + new, block) + 1.
    for window in (4, 5, 32, 33):
        for scheduled in (1, 7, 16):
            cap = -(-(window - 1 + scheduled) // 16) + 1
            held = [LayerCache(0, "sliding", 8, 8, 1, window=window).blocks(n, 16, scheduled) for n in range(1, 400)]
            assert max(held) <= cap


# vLLM V1 start-up logs: "Available KV cache memory" (GiB, as printed) and "GPU KV cache size" (tokens), with
# the engine settings the log states. All but the first are also in tests/serving/data/vllm_startup_logs.json.
_DENNISLEE = "https://github.com/dennislee22/vLLM-benchmarking/blob/HEAD/log/"
_GUARDKIT = "https://github.com/guardkit/guardkit/blob/HEAD/docs/reviews/"
VLLM_LOGS = {
    # vLLM 0.15.1, A100, bf16.
    "llama31-8b": (
        "meta-llama/Llama-3.1-8B",
        "https://github.com/ilseokoh/vllm-gce/blob/HEAD/README.md",
        1,
        2,
        19.28,
        157_936,
    ),
    # vLLM 0.10.1.1, A100 80GB; Qwen2-7B-Instruct has Qwen2.5-7B's 28 layers x 4 KV heads x 128.
    "qwen2-7b-tp1": ("Qwen/Qwen2.5-7B", _DENNISLEE + "vllm-7B-1gpuA10080GB-0.25GRAM.log", 1, 2, 5.01, 93_872),
    "qwen2-7b-tp2": (
        "Qwen/Qwen2.5-7B",
        _DENNISLEE + "vllm-7B-2gpuA10080GB-0.5GRAM-same-node.log",
        2,
        2,
        31.83,
        1_192_160,
    ),
    "qwen3-14b": ("Qwen/Qwen3-14B", "https://github.com/LMCache/LMCache/issues/1739", 1, 2, 6.51, 42_656),
    # vLLM 0.13.0 (NVIDIA 26.01), fp8 KV cache.
    "qwen25-14b-fp8kv": (
        "Qwen/Qwen2.5-14B",
        _GUARDKIT + "additonal-templates/qwen-docker-success.md",
        1,
        1,
        30.46,
        332_672,
    ),
    "qwen3-30b-fp8kv": ("Qwen/Qwen3-30B-A3B", _GUARDKIT + "graphiti-qwen3/run-2.md", 1, 1, 4.04, 88_176),
    # vLLM 0.10.1.1, TP4, hybrid sliding + full: 2 groups of 18 layers.
    "gpt-oss-120b-tp4": (
        "openai/gpt-oss-120b",
        _DENNISLEE + "vllm-120B-4gpuA10080GB-0.8GRAM-diff-nodes.log",
        4,
        2,
        45.32,
        2_640_144,
    ),
    # vLLM 0.11.0rc2 (ROCm): 7 groups of 10 ("Add 8 padding layers"), 89,994 blocks.
    "gemma3-27b": (
        "google/gemma-3-27b-pt",
        "https://github.com/TaintsAndTokenizersInc/vllm_multimodal_rocm_examples/blob/HEAD/example_logs.md",
        1,
        2,
        109.86,
        205_696,
    ),
}


def _logged_tokens(caches: tuple[LayerCache, ...], available: float, tp: int, dtype_bytes: int) -> int:
    """vLLM's "GPU KV cache size" for ``available`` bytes (kv_cache_utils.py:1004-1070, v0.11.0).

    Layers fall into groups of ``group_size`` (one group for a uniform model); a block id spans one layer
    of each group's slot, so a block costs ``group_size`` pages and the printed tokens are
    ``num_blocks // num_groups * block_size``. Block size 16 (the default in every log here).
    """
    attention = [c for c in caches if c.kind != "none"]
    specs = Counter((c.kind, c.window) for c in attention)
    group_size = min(specs.values())
    groups = len(attention) // group_size
    page_per_token = sequence_bytes(attention[:1], 1, dtype_bytes, tp)
    assert all(sequence_bytes([c], 1, dtype_bytes, tp) == page_per_token for c in attention)  # uniform page
    blocks = int(available // (group_size * 16 * page_per_token))
    return blocks // groups * 16


@pytest.mark.parametrize("log", sorted(VLLM_LOGS))
def test_vllm_kv_cache_size_in_start_up_logs(log: str) -> None:
    model_id, source, tp, dtype_bytes, available_gib, tokens = VLLM_LOGS[log]
    # The log prints available memory to 0.01 GiB: the token count must fall between the two ends.
    caches = _caches(model_id, "vllm")
    low = _logged_tokens(caches, (available_gib - 0.005) * GIB, tp, dtype_bytes)
    high = _logged_tokens(caches, (available_gib + 0.005) * GIB, tp, dtype_bytes)
    assert low <= tokens <= high, (source, low, tokens, high)


def test_logs_cited_here_are_in_the_shared_log_data() -> None:
    data = json.loads((Path(__file__).parent / "data" / "vllm_startup_logs.json").read_text())
    logged = {
        (r["catalog_model"], r["logged"]["available_kv_cache_gib"], r["logged"]["kv_cache_tokens"])
        for r in data["logs"]
    }
    for log, (model_id, _source, _tp, _dtype, available, tokens) in VLLM_LOGS.items():
        if log != "llama31-8b":  # found for this test, not in the shared file
            assert (model_id, available, tokens) in logged


# --- tensor parallelism, totals and bad input -------------------------------------------------------------


def test_tensor_parallel_split_of_kv_heads() -> None:
    llama = _caches("meta-llama/Llama-3.1-8B", "vllm")
    assert kv_heads_split(llama, 2) == (4, True)
    assert kv_heads_split(llama, 16) == (1, False)  # replicated: 8 heads over 16 GPUs
    assert sequence_bytes(llama, 1000, BF16, tensor_parallel=2) * 2 == sequence_bytes(llama, 1000, BF16)
    assert sequence_bytes(llama, 1000, BF16, tensor_parallel=16) == sequence_bytes(llama, 1000, BF16, 8)
    falcon = _caches("tiiuae/falcon-7b", "vllm")  # multi-query: one KV head (falcon.py:108-109)
    assert {c.kv_heads for c in falcon} == {1}
    assert kv_heads_split(falcon, 2) == (1, False)
    assert sequence_bytes(falcon, 1000, BF16, tensor_parallel=2) == sequence_bytes(falcon, 1000, BF16)


def test_totals_add_up_the_layers() -> None:
    caches = _caches("google/gemma-2-2b", "transformers")
    assert kv_bytes_per_token(caches, BF16) == sum(c.bytes_per_token(BF16) for c in caches)
    context = 10_000
    assert sequence_bytes(caches, context, BF16) == sum(c.sequence_bytes(context, BF16) for c in caches)
    full = [c for c in caches if c.kind == "full"]
    sliding = [c for c in caches if c.kind == "sliding"]
    assert sequence_bytes(caches, context, BF16) == (
        len(full) * context * full[0].bytes_per_token(BF16) + len(sliding) * 4095 * sliding[0].bytes_per_token(BF16)
    )


def test_bad_input_raises_one_line() -> None:
    inventory = load("meta-llama/Llama-3.2-1B").inventory
    with pytest.raises(PeftauditError, match="unknown serving engine"):
        layer_caches(inventory, "tgi")
    with pytest.raises(PeftauditError, match="no config"):
        layer_caches(replace(inventory, config=None))
    caches = layer_caches(inventory)
    with pytest.raises(PeftauditError, match="context"):
        sequence_bytes(caches, -1, BF16)
    with pytest.raises(PeftauditError, match="tensor parallel"):
        kv_heads_split(caches, 0)
