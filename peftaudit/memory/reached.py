"""Which parameters one training step reaches: those the loss depends on, so that get a gradient.

A trainable parameter whose module does not run in a step, or runs but feeds
nothing the loss depends on, keeps ``grad = None`` after ``backward()``, and
torch's optimizers keep no state for it (``AdamW`` skips a parameter whose
``grad`` is ``None``). Static memory counts gradients and optimizer states for
the parameters a step reaches only (:mod:`~peftaudit.memory.analytic.static`).
The rule, checked parameter by parameter against the fake-tensor trace
(``tests/memory/test_memory_reached.py``):

* a multimodal model's step without images (``--images 0``) does not run its
  vision encoder or projector, nor the parameters that lay out image tokens
  (LLaVA-NeXT's ``image_newline``); Mllama skips its cross-attention layers
  (``cross_attention_layers``) when no image is given;
* with images, a model that takes its image features from one vision layer's
  hidden states (LLaVA's ``vision_feature_layer=-2``) drops the layers after it
  and what follows the layer stack (CLIP's ``post_layernorm`` only acts on the
  pooled output, which LLaVA does not read);
* the masked-image-modeling token of a vision embedding (``embeddings.mask_token``
  of ViT, DINOv2, Swin) is used only where a mask is passed, as in pretraining.

DeepSpeed's ZeRO keeps flat partitions of every trainable parameter, reached or
not (:mod:`~peftaudit.memory.analytic.sharding` reads both figures).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from peftaudit.inventory import Inventory
from peftaudit.memory.plan import TrainingPlan
from peftaudit.towers import LANGUAGE_MODEL, VISION, split_towers, tower_of

#: Parameters of a vision embedding used only when a step passes a mask (``bool_masked_pos``), which
#: fine-tuning does not. (ViTMAE's decoder ``mask_token`` is used in every step: it is not an embedding's.)
MASK_TOKENS = frozenset({"embeddings.mask_token"})
#: Language-model parameters used only around image tokens (LLaVA-NeXT's row separator).
IMAGE_ONLY = frozenset({"image_newline"})


def unreached(inventory: Inventory, plan: TrainingPlan) -> tuple[str, ...]:
    """Module and parameter paths of ``inventory`` that one step under ``plan`` gives no gradient.

    A parameter (or an adapter on a module) is unreached when its path is one of these or
    lies inside one (:func:`is_unreached`).
    """
    config = inventory.config or {}
    paths = [p.name for p in inventory.parameters if any(_ends_with(p.name, m) for m in MASK_TOKENS)]
    if not plan.images:
        # Mllama skips a cross-attention layer when no image is given, multimodal or text model alone.
        paths += _cross_attention_layers(inventory, config)
    towers = split_towers(inventory)
    if towers and not plan.images:
        paths += [m for t in towers if t.name != LANGUAGE_MODEL for m in t.modules]
        paths += [p.name for p in inventory.parameters if any(_ends_with(p.name, m) for m in IMAGE_ONLY)]
    elif towers:
        paths += _after_feature_layer(inventory, config)
    return tuple(paths)


def is_unreached(path: str, paths: tuple[str, ...]) -> bool:
    """Whether the module or parameter at ``path`` is one of ``paths`` (:func:`unreached`) or inside one."""
    return any(path == p or path.startswith(p + ".") for p in paths)


def dropped_feature_layers(config: Mapping[str, Any], layers: tuple[int, ...]) -> tuple[int, ...]:
    """The vision layers after the one a model takes its image features from (``vision_feature_layer``).

    ``layers``: the vision stack's layer indices. ``hidden_states[k]`` is the output of the k-th
    layer (``hidden_states[0]`` the embedding's), so ``-2`` drops the last layer. The layers run
    forward, but nothing the loss depends on reads their output.
    """
    layer = config.get("vision_feature_layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer >= -1:
        return ()
    return layers[len(layers) + layer + 1 :]


def _after_feature_layer(inventory: Inventory, config: Mapping[str, Any]) -> list[str]:
    """The vision layers after the feature layer, and the vision modules after the layer stack."""
    if not isinstance(config.get("vision_feature_layer"), int):
        return []
    vision = [p for p in inventory.parameters if tower_of(p.name)[0] == VISION]
    stack = next((p.block for p in vision if p.block is not None), None)
    if stack is None:
        return []
    layers = tuple(sorted({p.layer for p in vision if p.block == stack and p.layer is not None}))
    paths = [f"{stack}.{i}" for i in dropped_feature_layers(config, layers)]
    # hidden_states are the layers' outputs: what runs after the stack (a final norm, a pooling
    # head) only feeds the tower's own outputs, which the model does not read.
    last = max(i for i, p in enumerate(vision) if p.block == stack)
    paths += [p.module for p in vision[last + 1 :] if p.block != stack]
    return list(dict.fromkeys(paths))


def _cross_attention_layers(inventory: Inventory, config: Mapping[str, Any]) -> list[str]:
    """Mllama's cross-attention layers, in the language model's layer stack."""
    indices = next(_found(config, "cross_attention_layers"), None)
    if not isinstance(indices, list) or not indices:
        return []
    blocks = {
        p.block
        for p in inventory.parameters
        if p.block is not None and p.block.rpartition(".")[2] == "layers" and tower_of(p.name)[0] == LANGUAGE_MODEL
    }
    return [f"{block}.{i}" for block in sorted(blocks) for i in indices if isinstance(i, int)]


def _ends_with(path: str, tail: str) -> bool:
    """Whether ``path`` ends with the whole dotted components ``tail``."""
    return path == tail or path.endswith("." + tail)


def _found(config: Mapping[str, Any], key: str) -> Iterator[Any]:
    """Values of ``key`` in ``config`` and its sub-configs (``text_config``)."""
    if key in config:
        yield config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            yield from _found(value, key)
