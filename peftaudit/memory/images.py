"""Images in a training plan: which models take them, how many tokens one takes, and whether the plan's apply.

Vision models (:data:`VISION_MODELS`) take batches of images at a side ``--image-size``
sets; multimodal models take ``--images`` per sample, each a number of tokens in the
language model's sequence that its config and processor defaults set
(:func:`image_tokens_of`) and ``--image-tokens`` overrides where the family allows it.
No torch here: the estimate, the report and the trace's input builders
(:mod:`peftaudit.memory.tracing.inputs`) all ask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan

#: Vision models: ``model_type`` -> the ``config`` key that holds the vision settings (``""``: the root).
VISION_MODELS: dict[str, str] = {
    "vit": "",
    "deit": "",
    "dinov2": "",
    "convnext": "",
    "convnextv2": "",
    "swin": "",
    "swinv2": "",
    "clip_vision_model": "",
    "siglip_vision_model": "",
    "clip": "vision_config",
    "siglip": "vision_config",
}


def sub_config(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """The sub-config at ``key`` (``""``: the config itself); empty where there is none."""
    value = config.get(key) if key else config
    return value if isinstance(value, Mapping) else {}


def is_vision_model(config: Mapping[str, Any]) -> bool:
    """Whether the model is a vision model that takes images only (or CLIP/SigLIP's image-text pair)."""
    return str(config.get("model_type", "")) in VISION_MODELS


def default_image_size(config: Mapping[str, Any]) -> int | None:
    """A vision model's own image size (``image_size``, or ``vision_config.image_size``)."""
    section = sub_config(config, VISION_MODELS.get(str(config.get("model_type", "")), ""))
    size = section.get("image_size")
    if isinstance(size, list | tuple) and size:
        size = size[0]
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def image_size_of(config: Mapping[str, Any], plan: TrainingPlan) -> int:
    """The square image side a vision model is traced at: the plan's, else the config's, else 224."""
    return plan.image_size or default_image_size(config) or 224


# --- multimodal models -------------------------------------------------------------------------


#: Qwen2-VL / Qwen2.5-VL have no fixed image size: the processor resizes each image to multiples of
#: 28 px (14 px patches, 2 x 2 merged) between ``min_pixels`` and ``max_pixels``. The default here is
#: LLaMA-Factory's ``image_max_pixels`` (768 * 768), the most used fine-tuning recipe for these
#: models; the processor's smart_resize makes a 768 x 768 image 756 x 756: 54 x 54 patches, 729 tokens.
#: Source: ProcessorArguments.image_max_pixels in
#: https://github.com/hiyouga/LlamaFactory/blob/main/src/llamafactory/hparams/model_args.py
QWEN_VL_IMAGE_SIDE = 756


def _llava_tokens(config: Mapping[str, Any]) -> int:
    if isinstance(config.get("image_seq_length"), int):
        return int(config["image_seq_length"])
    vision = sub_config(config, "vision_config")
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    # The "default" strategy drops the CLS token; "full" keeps it.
    return side * side + (1 if config.get("vision_feature_select_strategy") == "full" else 0)


def _gemma3_tokens(config: Mapping[str, Any]) -> int:
    return int(config.get("mm_tokens_per_image", 256))


def _qwen_vl_tokens(config: Mapping[str, Any]) -> int:
    vision = sub_config(config, "vision_config")
    merge = int(vision.get("spatial_merge_size", 2))
    side = QWEN_VL_IMAGE_SIDE // (int(vision.get("patch_size", 14)) * merge)
    return side * side


#: LLaVA-NeXT tiles each image by its ``image_grid_pinpoints`` ("any resolution"): the processor
#: picks the pinpoint resolution that keeps the most of the image, cuts it into tiles of the vision
#: tower's ``image_size`` and adds the whole image resized to one tile (the base tile). Tokens and
#: tiles follow from the image's size, so a size is fixed here: a 768 x 768 image, what LLaMA-Factory's
#: default ``image_max_pixels`` (768 * 768, as for Qwen-VL above) brings larger images to. llava-v1.6's
#: pinpoints tile it at 672 x 672: 2 x 2 tiles of 336 px plus the base tile (5 tiles through the vision
#: tower), and 24 x 24 base tokens + 48 x 48 grid tokens + 48 row newlines = 2,928 image tokens.
LLAVA_NEXT_IMAGE_SIDE = 768


@dataclass(frozen=True)
class AnyResolution:
    """How LLaVA-NeXT's processor lays out one image: tiles through the vision tower, tokens in the text."""

    tiles: int
    """Tiles of ``image_size`` pixels: the grid's and the base tile (``image_size_to_num_patches``)."""
    tokens: int
    """Image tokens in the language model's sequence (the processor's ``_get_number_of_features``)."""


def any_resolution(config: Mapping[str, Any], height: int, width: int) -> AnyResolution:
    """LLaVA-NeXT's tiles and image tokens for a ``height`` x ``width`` image, from its config.

    The processor's arithmetic (transformers' ``select_best_resolution``, ``image_size_to_num_patches``
    and ``LlavaNextProcessor._get_number_of_features``), written out: the estimate reads the config only.
    """
    vision = sub_config(config, "vision_config")
    tile = int(vision.get("image_size", 336))
    side = tile // int(vision.get("patch_size", 14))
    pinpoints = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    # The resolution that keeps the most of the image, then the one that wastes the least.
    best: tuple[int, int] = (tile, tile)
    kept, wasted = 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        if effective > kept or (effective == kept and h * w - effective < wasted):
            best, kept, wasted = (int(h), int(w)), effective, h * w - effective
    rows, cols = -(-best[0] // tile), -(-best[1] // tile)
    # The grid's features, the processor's padding to the pinpoint's aspect removed, one newline per row.
    grid_h, grid_w = side * (best[0] // tile), side * (best[1] // tile)
    if width / height > grid_w / grid_h:
        grid_h -= (grid_h - int(round(height * (grid_w / width), 7))) // 2 * 2
    else:
        grid_w -= (grid_w - int(round(width * (grid_h / height), 7))) // 2 * 2
    full = config.get("vision_feature_select_strategy") == "full"  # keeps the CLS token of the base tile
    return AnyResolution(tiles=rows * cols + 1, tokens=grid_h * grid_w + grid_h + side * side + int(full))


def _llava_next_tokens(config: Mapping[str, Any]) -> int:
    return any_resolution(config, LLAVA_NEXT_IMAGE_SIDE, LLAVA_NEXT_IMAGE_SIDE).tokens


def _paligemma_tokens(config: Mapping[str, Any]) -> int:
    # One token per patch of the vision tower (224 px in 14 px patches: 256), as PaliGemmaConfig sets
    # ``num_image_tokens`` from them; the processor writes as many placeholders (``image_seq_length``).
    vision = sub_config(config, "vision_config")
    side = int(vision.get("image_size", 224)) // int(vision.get("patch_size", 14))
    return side * side


# --- Idefics3 / SmolVLM and Qwen3-VL ---------------------------------------------------------

#: Idefics3 and SmolVLM resize each image's longest edge to 4 x their vision tower's ``image_size``
#: and split it into sub-images of that size, plus the whole image resized to one (the global
#: image); each sub-image is (image_size / patch_size)^2 / scale_factor^2 tokens after the
#: connector's pixel shuffle. A square image is 4 x 4 sub-images and the global one: 17. These are
#: the processors' settings as published with the models (``size`` / ``max_image_size``): 1536 / 384
#: for SmolVLM-Instruct and SmolVLM2-2.2B-Instruct (81 tokens a sub-image: 1,377 an image), 2048 /
#: 512 for SmolVLM2-256M/500M (64: 1,088), and Idefics3ImageProcessor's defaults, 4 * 364 / 364, for
#: Idefics3-8B (169: 2,873). Sources: preprocessor_config.json of HuggingFaceTB/SmolVLM2-2.2B-Instruct
#: and HuggingFaceTB/SmolVLM2-256M-Video-Instruct on the Hub; transformers' image_processing_idefics3.py.
IDEFICS3_SUB_IMAGES = 4 * 4 + 1

#: Qwen3-VL's patches are 16 px, merged 2 x 2: the processor resizes images to multiples of 32 px
#: (smart_resize). The image is the one Qwen2/2.5-VL's estimate takes (:data:`QWEN_VL_IMAGE_SIDE`:
#: LLaMA-Factory's ``image_max_pixels``, 768 x 768); 768 is a multiple of 32: 24 x 24 = 576 tokens.
QWEN3_VL_IMAGE_SIDE = 768


def idefics3_sub_image_tokens(config: Mapping[str, Any]) -> int:
    vision = sub_config(config, "vision_config")
    side = int(vision.get("image_size", 384)) // int(vision.get("patch_size", 14))
    return side * side // int(config.get("scale_factor", 2)) ** 2


def _idefics3_tokens(config: Mapping[str, Any]) -> int:
    return IDEFICS3_SUB_IMAGES * idefics3_sub_image_tokens(config)


def _qwen3_vl_tokens(config: Mapping[str, Any]) -> int:
    vision = sub_config(config, "vision_config")
    factor = int(vision.get("patch_size", 16)) * int(vision.get("spatial_merge_size", 2))
    side = max(1, round(QWEN3_VL_IMAGE_SIDE / factor))  # the processor's smart_resize
    return side * side


def _whole_sub_images(config: Mapping[str, Any], tokens: int) -> str | None:
    per = idefics3_sub_image_tokens(config)
    if tokens % per == 0:
        return None
    return (
        f"its images are whole sub-images of {per} tokens each ({IDEFICS3_SUB_IMAGES} = "
        f"{IDEFICS3_SUB_IMAGES * per:,} tokens for a square image split 4 x 4, {per} without splitting)"
    )


def _square_grid(config: Mapping[str, Any], tokens: int) -> str | None:
    side = max(1, int(tokens**0.5))
    return None if side * side == tokens else "its image tokens are a square grid of merged patches (576 = 24 x 24)"


#: ``--image-tokens`` where a family takes only some counts: ``model_type`` -> why a count does not
#: fit it (``None``: it does). Idefics3/SmolVLM count whole sub-images (one image without splitting is
#: one); Qwen-VL a square grid of merged patches (the builder lays the image out as one).
IMAGE_TOKEN_UNITS: dict[str, Callable[[Mapping[str, Any], int], str | None]] = {
    "idefics3": _whole_sub_images,
    "smolvlm": _whole_sub_images,
    "qwen2_vl": _square_grid,
    "qwen2_5_vl": _square_grid,
    "qwen3_vl": _square_grid,
}


#: Multimodal families whose images reach the text through cross-attention layers, not placeholder
#: runs: each image is one ``<|image|>`` token in the text sequence, and its vision tokens (Mllama: 4
#: tiles of (560/14)^2 + 1 = 1,601 patches) are the keys and values of the cross-attention layers.
#: ``--image-tokens`` does not apply to them.
CROSS_ATTENTION: frozenset[str] = frozenset({"mllama"})

#: Multimodal families: ``model_type`` -> the image tokens one image takes by default (from the config).
IMAGE_TOKENS: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "llava": _llava_tokens,
    "gemma3": _gemma3_tokens,
    "qwen2_5_vl": _qwen_vl_tokens,
    "qwen2_vl": _qwen_vl_tokens,
    **{model_type: (lambda config: 1) for model_type in CROSS_ATTENTION},
    "llava_next": _llava_next_tokens,
    "paligemma": _paligemma_tokens,
    "idefics3": _idefics3_tokens,
    "smolvlm": _idefics3_tokens,
    "qwen3_vl": _qwen3_vl_tokens,
}


def _llava_next_fixed(config: Mapping[str, Any]) -> str:
    layout = any_resolution(config, LLAVA_NEXT_IMAGE_SIDE, LLAVA_NEXT_IMAGE_SIDE)
    return (
        f"its any-resolution tiles set the image tokens from the image's size (estimated for a "
        f"{LLAVA_NEXT_IMAGE_SIDE} px square image: {layout.tiles} tiles, {layout.tokens:,} tokens)"
    )


#: Families whose image tokens follow from the image's size, not a setting: ``model_type`` -> why
#: ``--image-tokens`` is refused for them (from the config).
TOKENS_FROM_IMAGE_SIZE: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "llava_next": _llava_next_fixed,
}


#: Families whose image step the fake-tensor trace cannot run with eager attention, and why. Their
#: vision towers split attention per image and window by sizes read from ``image_grid_thw``'s values:
#: the trace runs them on a grid whose values it knows, as one sequence of all patches
#: (:func:`~peftaudit.memory.tracing.standins.known_values`), which keeps what SDPA and flash
#: attention keep (per token); eager attention keeps one matrix per image or window.
NOT_TRACEABLE_EAGER: dict[str, str] = {
    model_type: "with eager attention its vision tower keeps one attention matrix per image and window, "
    "which the trace does not split (use sdpa or flash attention)"
    for model_type in ("qwen2_vl", "qwen2_5_vl")
} | {
    "qwen3_vl": "with eager attention its vision tower keeps one attention matrix per image, which the trace "
    "does not split (use sdpa or flash attention)"
}


def takes_images(config: Mapping[str, Any]) -> bool:
    """Whether ``--images`` applies: a multimodal model whose image inputs we know how to build."""
    return str(config.get("model_type", "")) in IMAGE_TOKENS


def image_tokens_of(config: Mapping[str, Any], plan: TrainingPlan) -> int:
    """Tokens one image takes in the language model's sequence: the plan's override, else the config's."""
    if plan.image_tokens is not None:
        return plan.image_tokens
    default = IMAGE_TOKENS.get(str(config.get("model_type", "")))
    return default(config) if default is not None else 0


def check_images(config: Mapping[str, Any], plan: TrainingPlan, name: str) -> None:
    """Raise :class:`PlanError` where the plan's images do not apply to this model or do not fit its sequence."""
    vision = is_vision_model(config)
    if plan.image_size is not None and not vision:
        raise PlanError(
            f"--image-size applies to vision models; {name} is not one (use --images for a multimodal model)"
        )
    if plan.images == 0 and plan.image_tokens is None:
        return
    if not takes_images(config):
        kind = "is a vision model: its batch is images, set --image-size" if vision else "has no image inputs"
        raise PlanError(f"--images/--image-tokens apply to multimodal models; {name} {kind}")
    if plan.image_tokens is not None and str(config.get("model_type", "")) in CROSS_ATTENTION:
        raise PlanError(
            f"--image-tokens does not apply to {name}: its images reach the text through cross-attention "
            "(one <|image|> token each in seq-len); the vision tokens per image are fixed by its tiles"
        )
    fixed = TOKENS_FROM_IMAGE_SIZE.get(str(config.get("model_type", "")))
    if plan.image_tokens is not None and fixed is not None:
        raise PlanError(f"--image-tokens does not apply to {name}: {fixed(config)}")
    units = IMAGE_TOKEN_UNITS.get(str(config.get("model_type", "")))
    problem = units(config, plan.image_tokens) if units is not None and plan.image_tokens is not None else None
    if problem:
        raise PlanError(f"--image-tokens {plan.image_tokens:,} does not fit {name}: {problem}")
    if plan.images == 0:
        return
    reason = NOT_TRACEABLE_EAGER.get(str(config.get("model_type", ""))) if plan.attention == "eager" else None
    if reason:
        raise PlanError(f"{name}: images are not estimated yet: {reason}")
    tokens = plan.images * image_tokens_of(config, plan)
    if tokens >= plan.seq_len:
        raise PlanError(
            f"{plan.images} image(s) x {image_tokens_of(config, plan)} tokens = {tokens:,} tokens do not fit in "
            f"seq-len {plan.seq_len:,} (it counts image tokens too): raise --seq-len or lower --images/--image-tokens"
        )
