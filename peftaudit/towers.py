"""Which tower of a multimodal model each parameter belongs to: vision encoder, projector, language model.

transformers' multimodal classes name their parts, and the names are few:

* the vision encoder is ``vision_tower`` (LLaVA, Gemma 3, PaliGemma), ``visual``
  (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) or ``vision_model`` (Mllama, Idefics3, SmolVLM);
* the projector between them is ``multi_modal_projector`` (LLaVA, Gemma 3, Mllama,
  PaliGemma), ``connector`` (Idefics3, SmolVLM), or sits *inside* the vision module
  as ``merger`` / ``deepstack_merger_list`` (Qwen-VL's patch merger);
* everything else (``language_model``, ``text_model``, ``lm_head``) is the language model,
  parameters held beside the towers too (LLaVA-NeXT's ``image_newline``, trained with the language
  model in LLaVA-NeXT's recipes: ``mm_tunable_parts=mm_language_model`` in its ``llava/train/train.py``).

The split is read from parameter paths alone, so it works on any module walked by
:func:`peftaudit.inventory.take_inventory`, meta or live, and every parameter lands
in exactly one tower: the towers add up to the model's total. A model without a
vision module has no split (:func:`split_towers` returns ``()``), so text-only
reports stay as they were. Vision-only models (ViT, DINOv2, ConvNeXt) have a vision
module at the root, not a named submodule, and dual encoders (CLIP) have no language
model: neither gets a split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

VISION = "vision"
PROJECTOR = "projector"
LANGUAGE_MODEL = "language_model"

#: The towers, in the order a report lists them.
TOWERS: tuple[str, ...] = (VISION, PROJECTOR, LANGUAGE_MODEL)

#: What the report calls each tower.
TOWER_LABELS: dict[str, str] = {
    VISION: "vision encoder",
    PROJECTOR: "projector",
    LANGUAGE_MODEL: "language model",
}

#: Module names transformers gives a multimodal model's vision encoder.
VISION_MODULES: frozenset[str] = frozenset({"vision_tower", "visual", "vision_model"})
#: Module names of the projector, at the top level or inside the vision module (Qwen-VL's merger).
PROJECTOR_MODULES: frozenset[str] = frozenset(
    {"multi_modal_projector", "mm_projector", "connector", "merger", "deepstack_merger_list"}
)


@dataclass(frozen=True)
class Tower:
    """One tower of a multimodal model: its parameters and the module paths that hold them."""

    name: str
    """One of :data:`TOWERS`."""
    params: int
    """Parameters in this tower (tied parameters once, under the name that owns them)."""
    trainable: int
    modules: tuple[str, ...]
    """The shallowest module paths the tower is made of (``model.vision_tower``; ``model.language_model``
    and ``lm_head``), in model order. A tower written by these paths is what a config names to freeze,
    exclude or save it."""

    @property
    def label(self) -> str:
        return TOWER_LABELS[self.name]


def tower_of(parameter: str) -> tuple[str, str]:
    """The tower a parameter (or module) path belongs to, and the module path that decides it.

    ``model.visual.merger.mlp.0.weight`` -> ``("projector", "model.visual.merger")``;
    ``lm_head.weight`` -> ``("language_model", "lm_head")``.
    """
    parts = parameter.split(".")
    vision_at: int | None = None
    for i, part in enumerate(parts):
        if part in PROJECTOR_MODULES:
            return PROJECTOR, ".".join(parts[: i + 1])
        if vision_at is None and part in VISION_MODULES:
            vision_at = i
    if vision_at is not None:
        return VISION, ".".join(parts[: vision_at + 1])
    return LANGUAGE_MODEL, _language_root(parts)


def _language_root(parts: list[str]) -> str:
    # ``model.language_model.layers.0...`` -> ``model.language_model``; ``lm_head.weight`` -> ``lm_head``.
    for i, part in enumerate(parts):
        if part in ("language_model", "text_model"):
            return ".".join(parts[: i + 1])
    # Outside a named language model (``lm_head``, an older layout's ``model.norm``): the owning module.
    return ".".join(parts[:-1])


def is_multimodal(names: Iterable[str], *, has_output_head: bool = False) -> bool:
    """Whether these parameter paths make a vision-language model: a named vision module and a
    language model (a ``language_model`` module, or an output head).

    Dual encoders (CLIP, SigLIP: ``vision_model`` beside ``text_model``, no output head) are not:
    they have no language model to adapt, and their report keeps a single tower.
    """
    names = list(names)
    vision = any(tower_of(name)[0] == VISION for name in names)
    language = has_output_head or any("language_model" in name.split(".") for name in names)
    return vision and language


def split_towers(inventory: Inventory) -> tuple[Tower, ...]:
    """The model's towers, vision encoder first; ``()`` when it has no named vision module.

    Every parameter is in exactly one tower, so ``sum(t.params for t in towers) == inventory.total``.
    A tower with no parameters (a projector without weights) is still listed, at zero.
    """
    names = [p.name for p in inventory.parameters]
    if not is_multimodal(names, has_output_head=inventory.output_head is not None):
        return ()
    params = dict.fromkeys(TOWERS, 0)
    trainable = dict.fromkeys(TOWERS, 0)
    roots: dict[str, list[str]] = {t: [] for t in TOWERS}
    placed = [(p, *tower_of(p.name)) for p in inventory.parameters]
    # A language-model parameter held by the module that also holds the vision tower (LLaVA-NeXT's
    # ``model.image_newline``) is named by its own path: its owner, ``model``, would cover every tower.
    others = {root for _, tower, root in placed if tower != LANGUAGE_MODEL}
    for p, tower, root in placed:
        if tower == LANGUAGE_MODEL and (not root or any(o == root or o.startswith(root + ".") for o in others)):
            root = p.name
        params[tower] += p.numel
        if p.trainable:
            trainable[tower] += p.numel
        if root and root not in roots[tower]:
            roots[tower].append(root)
    return tuple(Tower(name=t, params=params[t], trainable=trainable[t], modules=_shallowest(roots[t])) for t in TOWERS)


def _shallowest(paths: list[str]) -> tuple[str, ...]:
    """Drop paths inside another listed path (``model.language_model`` covers ``model.language_model.x``)."""
    return tuple(p for p in paths if not any(o != p and p.startswith(o + ".") for o in paths))


def is_vision_encoder(inventory: Inventory) -> bool:
    """Whether the model is an image encoder without a language model (ViT, DINOv2, CLIP, ConvNeXt, Swin).

    Read from structure: a 2-D or 3-D convolution (the patch embedding or a conv stem), no output head
    and no vision-language split. Text models have no convolution over images; VLMs have towers.
    """
    if inventory.output_head is not None or split_towers(inventory):
        return False
    return any(m.type in ("Conv2d", "Conv3d") for m in inventory.modules)
