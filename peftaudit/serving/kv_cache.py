"""KV cache per token and per sequence, layer by layer, as an inference engine holds it.

Two engines, each read from its own source at a named release:

``"transformers"`` (5.25, the version peftaudit is tested with): what the cache classes hold after a
forward with ``use_cache=True`` (``transformers/cache_utils.py``):

* ``DynamicCache(config=...)`` makes one layer per decoder layer from ``get_layer_types_and_kwargs``
  (cache_utils.py:2017-2064): the config's ``layer_types`` if given, else every layer is
  ``"sliding_attention"`` when ``sliding_window`` is set, ``"chunked_attention"`` when
  ``attention_chunk_size`` is set, otherwise ``"full_attention"``; ``"moe"``/``"mlp"`` and layers that reuse
  another layer's KV (``kv_sharing_modes == "reuse"``) become ``DummyLayer`` (no KV). So Mistral-7B-v0.1
  (``sliding_window`` 4096) and Phi-3-mini-4k (2047) get a sliding layer everywhere; Qwen2.5's config sets
  ``sliding_window`` to ``None`` when ``use_sliding_window`` is false, so its layers are full.
* ``DynamicLayer`` (cache_utils.py:104-146) concatenates every token: ``[batch, kv_heads, tokens, head_dim]``.
* ``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` tokens (cache_utils.py:244-247,
  "Only cache the last `self.sliding_window - 1` tokens"); ``chunked_attention`` uses the same class with
  ``attention_chunk_size`` as its window (cache_utils.py:1527-1528, 2054-2055). While a step runs it
  briefly holds ``window - 1`` plus the new tokens (the ``torch.cat`` before the slice): a transient, not
  counted here.
* Encoder-decoder models (T5) use ``EncoderDecoderCache(DynamicCache, DynamicCache)``
  (models/t5/modeling_t5.py:692): self-attention over the decoder tokens plus a cross-attention cache of
  the encoder output's keys and values, ``num_heads * d_kv`` per encoder token, in every decoder layer.
* Mllama's cross-attention layers (``text_config.cross_attention_layers``) store the projected vision
  states in the same ``DynamicCache`` (models/mllama/modeling_mllama.py:443-453): per image
  ``max_num_tiles * ((image_size // patch_size) ** 2 + 1)`` tokens (the vision model's output after it
  strips its padding patches, modeling_mllama.py:990-995; 4 * 1601 = 6404 for Llama-3.2-11B-Vision), and
  they hold nothing for a text-only prompt (the layer is skipped, modeling_mllama.py:1136-1139).
* DeepSeek-V3 caches the compressed latent, not decompressed heads: keys ``kv_lora_rank`` (the
  normalized ``kv_nope``) and values ``qk_rope_head_dim`` (the roped ``k_rot``), one "head"
  (models/deepseek_v3/modeling_deepseek_v3.py:431-444, "Cache read / write is performed while latent
  KV is still compressed"), expanded after the cache read.
* Falcon-7b (``multi_query``, not the new decoder architecture) caches one KV head
  (models/falcon/modeling_falcon.py:278, 302-303).

``"vllm"`` (0.11.0, read from the release's source distribution on PyPI):

* Page of one layer (``vllm/v1/kv_cache_interface.py:63-66``): ``2 * block_size * num_kv_heads *
  head_size * dtype_bytes``; MLA (kv_cache_interface.py:146-153): ``block_size * num_kv_heads *
  head_size * dtype_bytes`` with ``num_kv_heads`` 1 (``config/model.py:1179-1183``, ``get_num_kv_heads``:
  "When using MLA during decode it becomes MQA") and ``head_size = kv_lora_rank + qk_rope_head_dim``
  (``get_head_size``, config/model.py:1091-1098; 576 for DeepSeek-V3): one latent per token, no factor 2.
* Which layers slide (``engine/arg_utils.py:1172-1177``, ``attention/layer.py:110-117``): a model whose
  ``layer_types`` mix full and sliding layers (``transformers_utils/config.py:439-447``, ``is_interleaved``)
  slides per layer (gemma2.py:148-149, gemma3.py:151-152, llama.py:174-193; gpt_oss.py:107 slides the
  even layers); any other model slides every layer when its text config has a ``sliding_window``
  (Mistral-7B-v0.1, Phi-3-mini-4k).
* A sliding layer keeps, per request, the blocks that still hold one of the last ``sliding_window - 1``
  computed tokens, plus the blocks of the tokens being computed: ``remove_skipped_blocks`` frees the
  ``(num_computed - sliding_window + 1) // block_size`` leading blocks
  (``v1/core/single_type_kv_cache_manager.py:375-390``), at most ``cdiv(sliding_window - 1 + new,
  block_size) + 1`` blocks (``SlidingWindowSpec.max_memory_usage_bytes``, kv_cache_interface.py:196-214).
  In tokens: ``min(context, sliding_window)`` at a decode step; :meth:`LayerCache.blocks` gives the blocks.
* Hybrid models (full + sliding) are split into KV-cache groups of ``min(layers per spec)`` layers, the
  last group of a spec padded with empty layers that take memory all the same
  (``v1/core/kv_cache_utils.py:894-1001``; the design doc's gemma-3-27b example: 52 sliding + 10 full
  layers give 6 sliding groups of 10, the last with 8 padding layers). :func:`layer_caches` adds those
  padding slots as sliding entries with ``layer = -1``. With the hybrid manager off (KV transfer or KV
  events configured, non-GPU platforms: ``config/__init__.py:498-529``) vLLM turns sliding layers into
  full ones instead (kv_cache_utils.py:1096-1146); that mode is not modelled.
* Not supported by vLLM 0.11.0: Mllama and the encoder-decoder models other than Whisper
  (``model_executor/models/registry.py:334-343``, removed with V0 in 0.10.2; T5 is not in the registry);
  :func:`layer_caches` raises for them.

Layers without attention (``linear_attention``, ``conv``, ``mamba``, ...) hold no KV: they are listed with
``kind="none"`` and zero sizes; their recurrent state is out of scope here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from peftaudit.errors import PeftauditError

#: The engines :func:`layer_caches` knows.
ENGINES: tuple[str, ...] = ("transformers", "vllm")

#: Layer kinds of :class:`LayerCache`.
KINDS: tuple[str, ...] = ("full", "sliding", "mla", "cross", "none")

# Architecture class names that generate text (and so keep a KV cache): causal LMs, GPT-2 style LM heads,
# and conditional-generation models (encoder-decoder and vision-language). Masked LMs, encoders and
# classifiers do not.
_GENERATING_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

# transformers' layer types (cache_utils.py:1524-1539) to our kinds. "hybrid" layers also keep a
# linear-attention state, which is out of scope; "mamba" is not a transformers cache type but is what
# hybrid configs elsewhere call their state-space layers.
_FULL_TYPES = frozenset({"full_attention", "hybrid"})
_SLIDING_TYPES = frozenset({"sliding_attention", "chunked_attention", "hybrid_sliding"})
_NO_KV_TYPES = frozenset({"linear_attention", "conv", "mamba", "moe", "mlp", "dummy"})

# vLLM 0.11.0 uses MLA for these text model types when kv_lora_rank is set (config/model.py:1076-1089,
# ModelConfig.is_deepseek_mla).
_VLLM_MLA_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_mtp", "kimi_k2", "longcat_flash"})
# transformers model types whose MLA cache layout was read and tested (latent keys + rope values).
_HF_MLA_TYPES = frozenset({"deepseek_v3"})
# vLLM 0.11.0's registry (model_executor/models/registry.py:334-343) lists these as removed in 0.10.2.
_VLLM_REMOVED = {"MllamaForConditionalGeneration": "0.10.2"}


@dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps in the KV cache, per sequence, under one engine's rules.

    Sizes are elements per cached token (multiply by the cache dtype's bytes); a layer's tokens are the
    context (``full``, ``mla``), the last ``window`` of it (``sliding``), or a fixed count independent of
    the context (``cross``: encoder tokens, vision tokens).
    """

    layer: int
    """Decoder layer index; ``-1`` for a vLLM group-padding slot (memory vLLM sets aside for no layer)."""
    kind: str
    """One of :data:`KINDS`: ``"full" | "sliding" | "mla" | "cross" | "none"``."""
    key_elements: int
    """Elements per cached token for the keys: ``kv_heads * head_dim``; MLA: the latent (transformers:
    ``kv_lora_rank``; vLLM: ``kv_lora_rank + qk_rope_head_dim``, its one tensor)."""
    value_elements: int
    """Elements per cached token for the values (0 where the engine stores one tensor, vLLM MLA;
    transformers' DeepSeek-V3 keeps the roped key part, ``qk_rope_head_dim``, in the value slot)."""
    kv_heads: int
    """Heads the cache splits over under tensor parallelism (1 for an MLA latent, which every rank holds)."""
    window: int | None = None
    """Tokens a sliding layer keeps, by the engine's own rule (transformers ``sliding_window - 1``, vLLM
    ``sliding_window`` counting the token being computed); ``None`` = all."""
    fixed_tokens: int | None = None
    """Cross-attention: tokens cached whatever the context (encoder length, vision tokens); ``None`` for a
    cross layer means "as many as the context" (an encoder input as long as the prompt)."""
    note: str = ""
    """Why a layer holds nothing, or what a padding slot is."""

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes per cached token of this layer, keys and values, for the whole model (no TP split)."""
        return (self.key_elements + self.value_elements) * dtype_bytes

    def tokens_kept(self, context: int) -> int:
        """Tokens this layer holds for one sequence of ``context`` tokens."""
        _check_count("context", context)
        if self.kind == "none":
            return 0
        if self.kind == "cross":
            return context if self.fixed_tokens is None else self.fixed_tokens
        if self.kind == "sliding" and self.window is not None:
            return min(context, self.window)
        return context

    def sequence_bytes(self, context: int, dtype_bytes: int) -> int:
        """Bytes this layer holds for one sequence of ``context`` tokens (no TP split)."""
        return self.tokens_kept(context) * self.bytes_per_token(dtype_bytes)

    def blocks(self, context: int, block_size: int, scheduled: int = 1) -> int:
        """vLLM's paged blocks this layer holds for one request of ``context`` tokens (vllm engine rule).

        ``context`` counts the ``scheduled`` tokens being computed this step. A sliding layer frees the
        ``(computed - window + 1) // block_size`` leading blocks before allocating
        (single_type_kv_cache_manager.py:375-390, kv_cache_manager.py:253), so it holds at most
        ``cdiv(window - 1 + scheduled, block_size) + 1`` blocks (kv_cache_interface.py:196-214).
        """
        _check_count("context", context)
        if block_size < 1 or scheduled < 0:
            raise PeftauditError(f"block_size must be >= 1 and scheduled >= 0, got {block_size} and {scheduled}")
        if self.kind == "none":
            return 0
        tokens = self.fixed_tokens if self.kind == "cross" and self.fixed_tokens is not None else context
        allocated = -(-tokens // block_size)
        if self.kind != "sliding" or self.window is None:
            return allocated
        freed = max(0, (context - scheduled - self.window + 1) // block_size)
        return allocated - freed


def layer_caches(
    inventory: Any, engine: str = "transformers", *, encoder_tokens: int | None = None
) -> tuple[LayerCache, ...]:
    """The KV cache of every decoder layer of ``inventory``'s model under ``engine`` (see module docstring).

    ``inventory``: a :class:`~peftaudit.inventory.Inventory` (its ``config`` and ``architecture`` are read).
    ``encoder_tokens``: tokens a cross-attention layer caches: T5's encoder input length (default: as long
    as the context), Mllama's vision tokens (default: one image at ``max_num_tiles`` tiles).

    Raises :class:`~peftaudit.errors.PeftauditError` for a model that does not generate (no decoder KV),
    an unknown engine, an architecture the engine does not run, or a layer type it cannot size.
    """
    if engine not in ENGINES:
        raise PeftauditError(f"unknown serving engine {engine!r} (choose from {', '.join(ENGINES)})")
    if encoder_tokens is not None:
        _check_count("encoder_tokens", encoder_tokens)
    config = getattr(inventory, "config", None)
    architecture = str(getattr(inventory, "architecture", "") or "")
    if not isinstance(config, Mapping):
        raise PeftauditError(f"{architecture or 'model'}: no config to size the KV cache from")
    if not architecture:
        names = config.get("architectures") or []
        architecture = str(names[0]) if names else str(config.get("model_type") or "model")
    if not architecture.endswith(_GENERATING_SUFFIXES):
        raise PeftauditError(f"{architecture}: not a generative model, so there is no decoder KV cache to size")
    text = _decoder_config(config)
    if engine == "vllm":
        return _vllm_caches(architecture, config, text)
    return _transformers_caches(architecture, config, text, encoder_tokens)


def kv_bytes_per_token(caches: Iterable[LayerCache], dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """Bytes one more context token adds while no window is full, per GPU under ``tensor_parallel``: every
    layer whose cache grows with the context counted (full, sliding, MLA, vLLM padding slots; cross layers
    only when their length follows the context)."""
    return sequence_bytes([c for c in caches if _grows_with_context(c)], 1, dtype_bytes, tensor_parallel)


def sequence_bytes(caches: Iterable[LayerCache], context: int, dtype_bytes: int, tensor_parallel: int = 1) -> int:
    """Bytes the cache holds for one sequence of ``context`` tokens, per GPU under ``tensor_parallel``.

    Each layer's heads split over the GPUs, at least one head per GPU (vLLM ``get_num_kv_heads``:
    ``max(1, kv_heads // tp)``, replicated when ``tp > kv_heads``); an MLA latent is whole on every GPU.
    Where the heads do not divide (no engine runs that; see :func:`kv_heads_split`) the largest share,
    ``ceil(kv_heads / tp)``, is counted.
    """
    _check_count("context", context)
    total = 0
    for cache in caches:
        if cache.kind == "none" or cache.kv_heads == 0:
            continue
        heads = _heads_per_gpu(cache.kv_heads, tensor_parallel)
        per_token = cache.bytes_per_token(dtype_bytes) * heads // cache.kv_heads
        total += cache.tokens_kept(context) * per_token
    return total


def kv_heads_split(caches: Iterable[LayerCache], tensor_parallel: int) -> tuple[int, bool]:
    """KV heads per GPU under ``tensor_parallel`` (the most any layer has) and whether every layer's heads
    divide evenly (``kv_heads % tp == 0``).

    ``False`` means some GPU holds a replicated head (vLLM replicates when ``tp > kv_heads`` and
    ``tp % kv_heads == 0``) or the split is uneven (which vLLM refuses, e.g. falcon.py:112-119). MLA
    latents are whole on every GPU by design and are left out; a model with only MLA layers answers
    ``(1, True)``.
    """
    if tensor_parallel < 1:
        raise PeftauditError(f"tensor parallel size must be >= 1, got {tensor_parallel}")
    heads = [c.kv_heads for c in caches if c.kind in ("full", "sliding", "cross") and c.kv_heads > 0]
    if not heads:
        return 1, True
    per_gpu = max(_heads_per_gpu(h, tensor_parallel) for h in heads)
    return per_gpu, all(h % tensor_parallel == 0 for h in heads)


# ---------------------------------------------------------------------------------------------------------
# transformers


def _transformers_caches(
    architecture: str, config: Mapping[str, Any], text: Mapping[str, Any], encoder_tokens: int | None
) -> tuple[LayerCache, ...]:
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    if text.get("kv_lora_rank") is not None:
        if model_type not in _HF_MLA_TYPES:
            raise PeftauditError(
                f"{architecture}: the transformers KV cache of latent-attention model type {model_type!r} "
                "is not sized (only deepseek_v3 is)"
            )
        # modeling_deepseek_v3.py:431-444: the cache holds kv_nope [b, 1, t, kv_lora_rank] as keys and
        # k_rot [b, 1, t, qk_rope_head_dim] as values.
        latent = _int(text, "kv_lora_rank")
        rope = _int(text, "qk_rope_head_dim")
        return tuple(
            LayerCache(layer=i, kind="mla", key_elements=latent, value_elements=rope, kv_heads=1)
            for i in range(_num_layers(text, architecture))
        )

    kv_heads, head_dim = _heads_and_dim(text, architecture)
    elements = kv_heads * head_dim
    kinds = _hf_layer_kinds(text, architecture)
    caches: list[LayerCache] = []
    cross_layers = set(text.get("cross_attention_layers") or ())
    vision_tokens = _mllama_vision_tokens(config) if cross_layers else None
    for i, (kind, window) in enumerate(kinds):
        if i in cross_layers:
            # modeling_mllama.py:443-453: the layer caches the projected vision states (DynamicLayer).
            tokens = encoder_tokens if encoder_tokens is not None else vision_tokens
            caches.append(LayerCache(i, "cross", elements, elements, kv_heads, fixed_tokens=tokens))
        elif kind == "none":
            caches.append(LayerCache(i, "none", 0, 0, 0, note=_NO_KV_NOTE))
        else:
            caches.append(LayerCache(i, kind, elements, elements, kv_heads, window=window))
    if config.get("is_encoder_decoder"):
        # EncoderDecoderCache: a cross-attention cache over the encoder tokens in every decoder layer.
        for i in range(len(kinds)):
            caches.append(LayerCache(i, "cross", elements, elements, kv_heads, fixed_tokens=encoder_tokens))
    return tuple(caches)


def _hf_layer_kinds(text: Mapping[str, Any], architecture: str) -> list[tuple[str, int | None]]:
    """(kind, window) per layer by transformers' ``get_layer_types_and_kwargs`` (cache_utils.py:2017-2064)."""
    layers = _num_layers(text, architecture)
    types = _layer_types(text, layers)
    if types is None:
        if text.get("sliding_window") is not None:
            types = ["sliding_attention"] * layers
        elif text.get("attention_chunk_size") is not None:
            types = ["chunked_attention"] * layers
        else:
            types = ["full_attention"] * layers
    sharing = text.get("kv_sharing_modes")
    if isinstance(sharing, Sequence) and not isinstance(sharing, str):
        types = ["dummy" if mode == "reuse" else t for t, mode in zip(types, sharing, strict=False)]
    kinds: list[tuple[str, int | None]] = []
    for layer_type in types:
        if layer_type in _FULL_TYPES:
            kinds.append(("full", None))
        elif layer_type in _SLIDING_TYPES:
            key = "attention_chunk_size" if layer_type == "chunked_attention" else "sliding_window"
            size = _hf_window(text, key, architecture)
            # DynamicSlidingWindowLayer keeps sliding_window - 1 tokens (cache_utils.py:244-247).
            kinds.append(("sliding", size - 1))
        elif layer_type in _NO_KV_TYPES:
            kinds.append(("none", None))
        else:
            raise PeftauditError(f"{architecture}: layer type {layer_type!r} has no known KV cache size")
    return kinds


def _hf_window(text: Mapping[str, Any], key: str, architecture: str) -> int:
    size = text.get(key)
    if not isinstance(size, int) or size < 1:
        raise PeftauditError(f"{architecture}: a sliding layer needs a positive '{key}', got {size!r}")
    if key == "sliding_window" and text.get("use_bidirectional_attention") and text.get("model_type") == "gemma3_text":
        # configuration_gemma3.py: __post_init__ halves the window (sw // 2 + 1) and to_dict writes back
        # (sw - 1) * 2, so the dict holds the value before the halving.
        size = size // 2 + 1
    return size


def _mllama_vision_tokens(config: Mapping[str, Any]) -> int | None:
    """One image's vision tokens in Mllama: max_num_tiles * (patches per tile + class token)."""
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        return None
    try:
        tiles = int(vision["max_num_tiles"])
        per_tile = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
    except (KeyError, TypeError, ValueError):
        return None
    return tiles * per_tile


# ---------------------------------------------------------------------------------------------------------
# vLLM


def _vllm_caches(architecture: str, config: Mapping[str, Any], text: Mapping[str, Any]) -> tuple[LayerCache, ...]:
    if architecture in _VLLM_REMOVED:
        raise PeftauditError(
            f"{architecture}: vLLM 0.11.0 does not run this architecture (supported until "
            f"{_VLLM_REMOVED[architecture]}, removed with the V0 engine)"
        )
    if config.get("is_encoder_decoder"):
        raise PeftauditError(
            f"{architecture}: vLLM 0.11.0 runs no encoder-decoder model but Whisper, so its KV cache is not sized"
        )
    model_type = str(text.get("model_type") or "")
    layers = _num_layers(text, architecture)
    if model_type in _VLLM_MLA_TYPES and text.get("kv_lora_rank") is not None:
        # get_head_size: kv_lora_rank + qk_rope_head_dim, one KV head; MLAAttentionSpec has no factor 2.
        latent = _int(text, "kv_lora_rank") + int(text.get("qk_rope_head_dim") or 0)
        return tuple(LayerCache(i, "mla", latent, 0, 1) for i in range(layers))

    kv_heads = _vllm_kv_heads(config, text, architecture)
    head_dim = _head_dim(text, architecture)
    elements = kv_heads * head_dim
    types = _layer_types(text, layers)
    interleaved = types is not None and {"full_attention", "sliding_attention"} <= set(types)
    # arg_utils.py:1172-1177: a model that is not interleaved slides every layer by the config's window.
    model_window = None if interleaved else text.get("sliding_window")
    caches: list[LayerCache] = []
    for i in range(layers):
        layer_type = types[i] if types is not None else "full_attention"
        if layer_type in _NO_KV_TYPES:
            caches.append(LayerCache(i, "none", 0, 0, 0, note=_NO_KV_NOTE))
            continue
        if layer_type not in _FULL_TYPES | _SLIDING_TYPES:
            raise PeftauditError(f"{architecture}: layer type {layer_type!r} has no known vLLM KV cache size")
        # gpt_oss.py:107 slides the even layers ("Only apply sliding window to every other layer").
        sliding = i % 2 == 0 if model_type == "gpt_oss" else layer_type == "sliding_attention"
        window = text.get("sliding_window") if sliding and interleaved else model_window
        if window is not None:
            caches.append(LayerCache(i, "sliding", elements, elements, kv_heads, window=int(window)))
        else:
            caches.append(LayerCache(i, "full", elements, elements, kv_heads))
    return tuple(caches) + _vllm_group_padding(caches)


def _vllm_group_padding(caches: Sequence[LayerCache]) -> tuple[LayerCache, ...]:
    """Empty layers vLLM adds so every KV-cache group of a hybrid model has the same layer count.

    kv_cache_utils.py:970-985: ``group_size = min(layers per spec)``; each spec's layers are padded up to a
    multiple of it. Uniform models (one spec) get one group and no padding.
    """
    specs: Counter[LayerCache] = Counter()
    example: dict[LayerCache, LayerCache] = {}
    for cache in caches:
        if cache.kind == "none":
            continue
        key = replace(cache, layer=0)
        specs[key] += 1
        example.setdefault(key, cache)
    if len(specs) < 2:
        return ()
    group_size = min(specs.values())
    padding: list[LayerCache] = []
    for key, count in specs.items():
        missing = (-count) % group_size
        note = f"vLLM group padding: {count} {key.kind} layers fill groups of {group_size}"
        padding.extend(replace(example[key], layer=-1, note=note) for _ in range(missing))
    return tuple(padding)


def _vllm_kv_heads(config: Mapping[str, Any], text: Mapping[str, Any], architecture: str) -> int:
    """``ModelConfig.get_total_num_kv_heads`` (vLLM 0.11.0 config/model.py:1125-1177), for the configs we read."""
    falcon_new = config.get("model_type") in ("falcon", "RefinedWeb", "RefinedWebModel") and bool(
        config.get("new_decoder_architecture")
    )
    if not falcon_new and text.get("multi_query"):
        return 1
    for key in ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num"):
        value = text.get(key)
        if value is not None:
            return int(value)
    return _num_heads(text, architecture)


# ---------------------------------------------------------------------------------------------------------
# config reading shared by both engines

_NO_KV_NOTE = "no attention KV (state-space / linear / MLP-only layer); its state is not sized"


def _decoder_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The decoder's text config, as ``PreTrainedConfig.get_text_config(decoder=True)`` picks it."""
    for key in ("decoder", "generator", "text_config"):
        sub = config.get(key)
        if isinstance(sub, Mapping):
            return sub
    return config


def _heads_and_dim(text: Mapping[str, Any], architecture: str) -> tuple[int, int]:
    """KV heads and head size as the transformers attention modules use them."""
    if text.get("multi_query") and not text.get("new_decoder_architecture"):
        kv_heads = 1  # modeling_falcon.py:278
    elif text.get("model_type") == "falcon":
        kv_heads = int(text.get("num_kv_heads") or _num_heads(text, architecture))
    else:
        value = text.get("num_key_value_heads")
        kv_heads = int(value) if value is not None else _num_heads(text, architecture)
    return kv_heads, _head_dim(text, architecture)


def _head_dim(text: Mapping[str, Any], architecture: str) -> int:
    for key in ("head_dim", "d_kv"):
        value = text.get(key)
        if isinstance(value, int) and value > 0:
            return value
    hidden = _first_int(text, ("hidden_size", "n_embd", "d_model"))
    if hidden is None:
        raise PeftauditError(f"{architecture}: the config gives no head_dim or hidden_size to size the KV cache")
    return hidden // _num_heads(text, architecture)


def _num_heads(text: Mapping[str, Any], architecture: str) -> int:
    heads = _first_int(text, ("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads"))
    if heads is None or heads < 1:
        raise PeftauditError(f"{architecture}: the config gives no attention head count")
    return heads


def _num_layers(text: Mapping[str, Any], architecture: str) -> int:
    keys = ("num_decoder_layers", "decoder_layers", "num_hidden_layers", "n_layer", "num_layers")
    layers = _first_int(text, keys)
    if layers is None or layers < 1:
        raise PeftauditError(f"{architecture}: the config gives no decoder layer count")
    return layers


def _layer_types(text: Mapping[str, Any], layers: int) -> list[str] | None:
    types = text.get("layer_types")
    if not isinstance(types, Sequence) or isinstance(types, str) or not types:
        return None
    return [str(t) for t in types][:layers]


def _first_int(text: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _int(text: Mapping[str, Any], key: str) -> int:
    value = text.get(key)
    if not isinstance(value, int):
        raise PeftauditError(f"config field '{key}' must be an integer, got {value!r}")
    return value


def _heads_per_gpu(kv_heads: int, tensor_parallel: int) -> int:
    if tensor_parallel < 1:
        raise PeftauditError(f"tensor parallel size must be >= 1, got {tensor_parallel}")
    if kv_heads % tensor_parallel == 0 or tensor_parallel % kv_heads == 0:
        return max(1, kv_heads // tensor_parallel)
    return -(-kv_heads // tensor_parallel)


def _grows_with_context(cache: LayerCache) -> bool:
    if cache.kind == "none":
        return False
    return cache.kind != "cross" or cache.fixed_tokens is None


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PeftauditError(f"{name} must be a whole number >= 0, got {value!r}")
