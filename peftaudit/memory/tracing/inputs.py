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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peftaudit.memory.images import (
    LLAVA_NEXT_IMAGE_SIDE,
    VISION_MODELS,
    any_resolution,
    default_image_size,
    idefics3_sub_image_tokens,
    image_size_of,
    image_tokens_of,
    sub_config,
)
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


def _config(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    channels = int(sub_config(config, VISION_MODELS[config["model_type"]]).get("num_channels", 3))
    classifier = type(base).__name__.endswith("ForImageClassification")
    contrastive = config["model_type"] in ("clip", "siglip")
    text_len = int(sub_config(config, "text_config").get("max_position_embeddings", 77))

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
    vision = sub_config(config, "vision_config")
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
    return _typed_images(model, plan, side=896, token_id=262144, image_type=1)


def _typed_images(model: Any, plan: TrainingPlan, *, side: int, token_id: int, image_type: int) -> StepInputs:
    """Square images and ``token_type_ids``: ``image_type`` on the images' tokens, the other type elsewhere.

    ``side`` and ``token_id`` are the family's defaults where its config does not say.
    """
    import torch

    config = _config(model)
    side = int(sub_config(config, "vision_config").get("image_size", side))
    tokens = image_tokens_of(config, plan)
    token_id = int(config.get("image_token_id", config.get("image_token_index", token_id)))

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, tokens)
        types = torch.full_like(ids, 1 - image_type)
        types[:, : plan.images * tokens] = image_type
        return {"input_ids": ids, "labels": ids, "token_type_ids": types, "use_cache": False}

    return StepInputs(make, _own_loss, _square_images(plan, side))


def _qwen_vl(model: Any, plan: TrainingPlan) -> StepInputs:
    """Qwen2/2.5-VL: flattened patches (patches, 3 * 2 * 14 * 14) and ``image_grid_thw`` per image."""
    import torch

    from peftaudit.memory.tracing.standins import known_values

    config = _config(model)
    vision = sub_config(config, "vision_config")
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
    vision = sub_config(config, "vision_config")
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


def _llava_next(model: Any, plan: TrainingPlan) -> StepInputs:
    """LLaVA-NeXT: each image as its any-resolution tiles, and ``image_sizes`` whose values it reads.

    ``pixel_values`` (batch * images, tiles, 3, 336, 336) and ``image_sizes`` (batch * images, 2), as
    its processor returns them for :data:`LLAVA_NEXT_IMAGE_SIDE` px square images (:func:`any_resolution`).
    The model reads the sizes' values (``.tolist()``) to lay out and unpad each image's grid of tiles:
    they are a tensor whose values the trace knows (:func:`~peftaudit.memory.tracing.standins.known_values`).
    """
    import torch

    from peftaudit.memory.tracing.standins import known_values

    config = _config(model)
    tile = int(sub_config(config, "vision_config").get("image_size", 336))
    layout = any_resolution(config, LLAVA_NEXT_IMAGE_SIDE, LLAVA_NEXT_IMAGE_SIDE)
    token_id = int(config.get("image_token_id", config.get("image_token_index", 32000)))
    n = plan.batch_size * plan.images

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, layout.tokens)
        inputs: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
        if n:
            inputs["image_sizes"] = known_values([[LLAVA_NEXT_IMAGE_SIDE, LLAVA_NEXT_IMAGE_SIDE]] * n)
        return inputs

    def images() -> dict[str, Any]:
        if not n:
            return {}
        return {"pixel_values": torch.zeros(n, layout.tiles, 3, tile, tile, dtype=_dtype(plan))}

    return StepInputs(make, _own_loss, images)


def _paligemma(model: Any, plan: TrainingPlan) -> StepInputs:
    """PaliGemma: the images' tokens first, then the text; ``token_type_ids`` 0 on the prefix, 1 on the suffix.

    Its processor, given the training target (``suffix=``), marks the prefix (images and prompt, which
    attend to each other bidirectionally) with 0 and the suffix (causal, the tokens the loss is on) with
    1; here the prefix is the images' tokens. Without images every token is suffix: the mask is built all
    the same (the model makes it from ``token_type_ids``).
    """
    return _typed_images(model, plan, side=224, token_id=257152, image_type=0)


def _idefics3(model: Any, plan: TrainingPlan) -> StepInputs:
    """Idefics3 / SmolVLM: each image as its sub-images, with the processor's pixel mask.

    ``pixel_values`` (batch, images * sub-images, 3, side, side) and ``pixel_attention_mask``
    (batch, images * sub-images, side, side) of int64, all ones (no padding), as the processor
    returns them (:data:`IDEFICS3_SUB_IMAGES`; ``--image-tokens`` sets how many sub-images). The
    model reads which images are padding from the pixel values; the trace answers that none is
    (:func:`~peftaudit.memory.tracing.standins._idefics3_stand_ins`).
    """
    import torch

    config = _config(model)
    side = int(sub_config(config, "vision_config").get("image_size", 384))
    tokens = image_tokens_of(config, plan)
    subs = plan.images * (tokens // idefics3_sub_image_tokens(config))
    token_id = int(config.get("image_token_id", 128257))

    def make() -> dict[str, Any]:
        ids = _ids_with_images(plan, token_id, tokens)
        return {"input_ids": ids, "labels": ids, "use_cache": False}

    def images() -> dict[str, Any]:
        if not plan.images:
            return {}
        return {
            "pixel_values": torch.zeros(plan.batch_size, subs, 3, side, side, dtype=_dtype(plan)),
            "pixel_attention_mask": torch.ones(plan.batch_size, subs, side, side, dtype=torch.long),
        }

    return StepInputs(make, _own_loss, images)


def _qwen_vl_typed(model: Any, plan: TrainingPlan) -> StepInputs:
    """Qwen2-VL and Qwen3-VL: Qwen2.5-VL's inputs, with ``mm_token_type_ids`` and ids whose values the trace knows.

    With images they require the token types (the processor returns them, 1 on image tokens), and
    their step reads the types' values (``get_rope_index`` lays out the 3-D positions from them);
    Qwen3-VL also selects the image tokens' positions with a boolean mask made from the ids (its
    deepstack features are added there). Both are tensors of known values
    (:func:`~peftaudit.memory.tracing.standins.known_values`; 16 bytes per token, not counted).
    """
    from peftaudit.memory.tracing.standins import known_values

    config = _config(model)
    base = _qwen_vl(model, plan)  # its images, and its square grid of merged patches
    if not plan.images:
        return base
    per_image = image_tokens_of(config, plan)
    grid = round(per_image**0.5) * int(sub_config(config, "vision_config").get("spatial_merge_size", 2))
    tokens, text = plan.images * per_image, plan.seq_len - plan.images * per_image
    token_id = int(config.get("image_token_id", 151655))

    def make() -> dict[str, Any]:
        ids = known_values([[token_id] * tokens + [0] * text] * plan.batch_size)
        return {
            "input_ids": ids,
            "labels": ids,
            "mm_token_type_ids": known_values([[1] * tokens + [0] * text] * plan.batch_size),
            "image_grid_thw": known_values([[1, grid, grid]] * (plan.batch_size * plan.images)),
            "use_cache": False,
        }

    return StepInputs(make, _own_loss, base.images)


#: ``model_type`` -> the function building that family's step inputs.
FAMILIES: dict[str, Callable[[Any, TrainingPlan], StepInputs]] = {
    **{model_type: _vision for model_type in VISION_MODELS},
    "llava": _llava,
    "gemma3": _gemma3,
    "qwen2_5_vl": _qwen_vl,
    "qwen2_vl": _qwen_vl_typed,
    "mllama": _mllama,
    "llava_next": _llava_next,
    "paligemma": _paligemma,
    "idefics3": _idefics3,
    "smolvlm": _idefics3,
    "qwen3_vl": _qwen_vl_typed,
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
