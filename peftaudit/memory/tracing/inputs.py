"""What a traced training step feeds the model, and which output is its loss: one function per family.

A language model takes token ids and returns ``.loss``. Vision models take
``pixel_values``; multimodal models take token ids with image placeholder
tokens plus the images in the shape their ``forward`` expects. Each family is
one function registered by ``model_type`` in :data:`FAMILIES`: it returns the
:class:`StepInputs` for a model and plan, so a new family is one function.

Conventions, the same for every family (the analytic estimate relies on them):

* ``plan.seq_len`` counts every token the language model sees, image
  placeholders included (what a trainer's ``max_length`` truncates);
  ``plan.images`` images per sample, each ``image_tokens(config, plan)`` tokens.
* Mllama (Llama 3.2 Vision) takes its images through cross-attention layers: each
  image is one ``<|image|>`` token of ``plan.seq_len``, its vision tokens are not
  (``--image-tokens`` does not apply; :data:`CROSS_ATTENTION`).
* Images arrive in the plan's weight dtype (what a processor's output is cast
  to before a half-precision model).
* Vision models without a loss of their own (``ViTModel``, ``Dinov2Model``,
  ``ConvNextModel``, ``CLIPVisionModel``...) get :func:`feature_loss`: the
  mean of the pooled output (the last hidden state where there is none) in
  fp32. It backpropagates through every layer at the cost of one scalar, as a
  task head a user attaches would (whose own few activations are not counted).
* ``CLIPModel`` trains both towers with its own contrastive loss
  (``return_loss=True``), text padded to the text tower's full length (77
  tokens for OpenAI's CLIP), as transformers' contrastive image-text example does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.memory.plan import PlanError, TrainingPlan
from peftaudit.units import SHORT_DTYPES


@dataclass(frozen=True)
class StepInputs:
    """A traced step's inputs (built anew for every micro-batch, under fake tensors) and its loss."""

    make: Callable[[], dict[str, Any]]
    """Token ids and labels, made before the step (a few bytes per token, as the trace always had them)."""
    loss: Callable[[Any], Any]
    images: Callable[[], dict[str, Any]] = dict
    """Image inputs, made when the forward pass starts: megabytes per batch, part of its activations."""


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


def _config(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _section(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key) if key else config
    return value if isinstance(value, Mapping) else {}


def is_vision_model(config: Mapping[str, Any]) -> bool:
    """Whether the model is a vision model that takes images only (or CLIP/SigLIP's image-text pair)."""
    return str(config.get("model_type", "")) in VISION_MODELS


def default_image_size(config: Mapping[str, Any]) -> int | None:
    """A vision model's own image size (``image_size``, or ``vision_config.image_size``)."""
    section = _section(config, VISION_MODELS.get(str(config.get("model_type", "")), ""))
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
    vision = _section(config, "vision_config")
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    # The "default" strategy drops the CLS token; "full" keeps it.
    return side * side + (1 if config.get("vision_feature_select_strategy") == "full" else 0)


def _gemma3_tokens(config: Mapping[str, Any]) -> int:
    return int(config.get("mm_tokens_per_image", 256))


def _qwen_vl_tokens(config: Mapping[str, Any]) -> int:
    vision = _section(config, "vision_config")
    merge = int(vision.get("spatial_merge_size", 2))
    side = QWEN_VL_IMAGE_SIDE // (int(vision.get("patch_size", 14)) * merge)
    return side * side


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


# --- the step's inputs, per family -------------------------------------------------------------


def _dtype(plan: TrainingPlan) -> Any:
    import torch

    return getattr(torch, SHORT_DTYPES[plan.weight_dtype])


def _text(model: Any, plan: TrainingPlan) -> StepInputs:
    """Language models: token ids, with labels per token (per sequence for classifiers)."""
    import torch

    # Training scripts turn the KV cache off (it would keep a copy of every layer's keys and values
    # through the forward pass for nothing); models without the flag do not take it.
    takes_cache = "use_cache" in _config(model)
    per_sequence = type(_base(model)).__name__.endswith("ForSequenceClassification")

    def make() -> dict[str, Any]:
        ids = torch.zeros(plan.batch_size, plan.seq_len, dtype=torch.long)
        labels = torch.zeros(plan.batch_size, dtype=torch.long) if per_sequence else ids
        inputs: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if takes_cache:
            inputs["use_cache"] = False
        return inputs

    return StepInputs(make, _own_loss)


def _own_loss(outputs: Any) -> Any:
    return outputs.loss


def feature_loss(outputs: Any) -> Any:
    """The stand-in loss of a vision model without one: the mean of its pooled output in fp32 (module docstring)."""
    pooled = getattr(outputs, "pooler_output", None)
    features = pooled if pooled is not None else outputs.last_hidden_state
    return features.float().mean()


def _vision(model: Any, plan: TrainingPlan) -> StepInputs:
    """Vision models: square images of the plan's size; class labels where the model has a classifier."""
    import torch

    config = _config(model)
    base = _base(model)
    side = image_size_of(config, plan)
    channels = int(_section(config, VISION_MODELS[config["model_type"]]).get("num_channels", 3))
    classifier = type(base).__name__.endswith("ForImageClassification")
    contrastive = config["model_type"] in ("clip", "siglip")
    text_len = int(_section(config, "text_config").get("max_position_embeddings", 77))

    def images() -> dict[str, Any]:
        return {"pixel_values": torch.zeros(plan.batch_size, channels, side, side, dtype=_dtype(plan))}

    def make() -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        if classifier:
            inputs["labels"] = torch.zeros(plan.batch_size, dtype=torch.long)
        if contrastive:
            inputs["input_ids"] = torch.zeros(plan.batch_size, text_len, dtype=torch.long)
            inputs["return_loss"] = True
        if side != default_image_size(config) and config["model_type"] in ("vit", "deit", "clip", "siglip"):
            # Their learned position embeddings are for the config's size; others interpolate always.
            inputs["interpolate_pos_encoding"] = True
        return inputs

    return StepInputs(make, _own_loss if classifier or contrastive else feature_loss, images)


def _ids_with_images(plan: TrainingPlan, image_token: int, tokens: int) -> Any:
    """Token ids with ``plan.images`` runs of ``tokens`` image placeholders at the start of each sequence."""
    import torch

    ids = torch.zeros(plan.batch_size, plan.seq_len, dtype=torch.long)
    ids[:, : plan.images * tokens] = image_token
    return ids


def _llava(model: Any, plan: TrainingPlan) -> StepInputs:
    """LLaVA 1.5: ``pixel_values`` (batch * images, 3, side, side), one run of placeholders per image."""

    config = _config(model)
    vision = _section(config, "vision_config")
    side = int(vision.get("image_size", 336))
    tokens = image_tokens_of(config, plan)
    token_id = int(config.get("image_token_id", config.get("image_token_index", 32000)))

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, tokens)
        return {"input_ids": ids, "labels": ids, "use_cache": False}

    return StepInputs(make, _own_loss, _square_images(plan, side))


def _square_images(plan: TrainingPlan, side: int) -> Callable[[], dict[str, Any]]:
    """``pixel_values`` of ``batch * images`` square RGB images of ``side`` pixels (none without images)."""

    def images() -> dict[str, Any]:
        import torch

        if not plan.images:
            return {}
        return {"pixel_values": torch.zeros(plan.batch_size * plan.images, 3, side, side, dtype=_dtype(plan))}

    return images


def _gemma3(model: Any, plan: TrainingPlan) -> StepInputs:
    """Gemma 3: 896 px images and ``token_type_ids`` marking image tokens (they attend bidirectionally)."""
    import torch

    config = _config(model)
    side = int(_section(config, "vision_config").get("image_size", 896))
    tokens = image_tokens_of(config, plan)
    token_id = int(config.get("image_token_id", config.get("image_token_index", 262144)))

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, tokens)
        types = torch.zeros_like(ids)
        types[:, : plan.images * tokens] = 1
        return {"input_ids": ids, "labels": ids, "token_type_ids": types, "use_cache": False}

    return StepInputs(make, _own_loss, _square_images(plan, side))


def _qwen_vl(model: Any, plan: TrainingPlan) -> StepInputs:
    """Qwen2/2.5-VL: flattened patches (patches, 3 * 2 * 14 * 14) and ``image_grid_thw`` per image."""
    import torch

    from peftaudit.memory.tracing.standins import known_values

    config = _config(model)
    vision = _section(config, "vision_config")
    patch = int(vision.get("patch_size", 14))
    temporal = int(vision.get("temporal_patch_size", 2))
    merge = int(vision.get("spatial_merge_size", 2))
    tokens = image_tokens_of(config, plan)
    # A square grid of merged tokens (the override rounds down to one).
    side = max(1, int(tokens**0.5))
    if side * side != tokens:
        raise PlanError(f"Qwen-VL image tokens are a square grid of merged patches; {tokens} is not a square")
    grid = side * merge
    token_id = int(config.get("image_token_id", 151655))

    n = plan.batch_size * plan.images

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, tokens)
        inputs: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
        if plan.images:
            # Its vision tower reads the grid's values: a tensor whose values the trace knows.
            inputs["image_grid_thw"] = known_values([[1, grid, grid]] * n)
        return inputs

    def images() -> dict[str, Any]:
        if not plan.images:
            return {}
        return {"pixel_values": torch.zeros(n * grid * grid, 3 * temporal * patch * patch, dtype=_dtype(plan))}

    return StepInputs(make, _own_loss, images)


def _mllama(model: Any, plan: TrainingPlan) -> StepInputs:
    """Mllama (Llama 3.2 Vision): one ``<|image|>`` token per image; the images go to cross-attention.

    ``pixel_values`` (batch, images, tiles, 3, 560, 560) with every image padded to ``max_num_tiles``
    tiles (4), as its image processor pads them (``pack_images``: the vision tower runs all tiles);
    ``aspect_ratio_ids``/``aspect_ratio_mask`` per image and tile, and ``cross_attention_mask``
    (batch, seq, images, tiles) of int64, as the processor returns them.
    """
    import torch

    config = _config(model)
    vision = _section(config, "vision_config")
    side = int(vision.get("image_size", 560))
    tiles = int(vision.get("max_num_tiles", 4))
    token_id = int(config.get("image_token_index", 128256))
    b, n = plan.batch_size, plan.images

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, 1)
        inputs: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
        if n:
            inputs["aspect_ratio_ids"] = torch.ones(b, n, dtype=torch.long)
            inputs["aspect_ratio_mask"] = torch.ones(b, n, tiles, dtype=torch.long)
            inputs["cross_attention_mask"] = torch.ones(b, plan.seq_len, n, tiles, dtype=torch.long)
        return inputs

    def images() -> dict[str, Any]:
        if not n:
            return {}
        return {"pixel_values": torch.zeros(b, n, tiles, 3, side, side, dtype=_dtype(plan))}

    return StepInputs(make, _own_loss, images)


#: ``model_type`` -> the function building that family's step inputs.
FAMILIES: dict[str, Callable[[Any, TrainingPlan], StepInputs]] = {
    **{model_type: _vision for model_type in VISION_MODELS},
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2_5_vl": _qwen_vl,
    "qwen2_vl": _qwen_vl,
    "mllama": _mllama,
}


def step_inputs(model: Any, plan: TrainingPlan) -> StepInputs:
    """The inputs and loss of one traced step of ``model`` under ``plan`` (a language model's by default)."""
    family = FAMILIES.get(str(_config(model).get("model_type", "")), _text)
    return family(model, plan)


@contextlib.contextmanager
def placeholder_checks_off() -> Iterator[None]:
    """Skip transformers' check that image placeholders match image features.

    It counts the placeholder tokens (``torch._check`` on a tensor's value), which fake tensors do
    not have; the inputs above are built so that they match. transformers reads the switch
    (``TRANSFORMERS_DISABLE_TORCH_CHECK``) on every call.
    """
    previous = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous
