"""LLaVA-NeXT's any-resolution images in a trace: every image's tiles packed at once.

``LlavaNextModel.pack_image_features`` lays out each image's tile features one image at a
time (a Python loop: reshape the grid of tiles, cut the padding off, add a newline feature per
row, put the base tile first). The step then allocates per image, so its events differ in number
at another batch size, and a profile cannot be fitted over batch sizes. The trace's images all
have the same size (tracing/inputs.py: ``image_sizes`` of known values), so the same operations run
on all of them at once here, as one tensor per operation: the same layout, values and bytes kept
for the backward pass. The loop's temporaries (two copies of one image's grid, a few tens of
megabytes per image) are then alive for every image at once, before the language model runs: not
where a step peaks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

#: The module whose model packs the tiles, and the model.
_MODULE = "transformers.models.llava_next.modeling_llava_next"


def install(patch: Callable[[Any, str, Any], None]) -> None:
    """Pack LLaVA-NeXT's images at once for the trace, where its module is loaded (the model is built before)."""
    module = sys.modules.get(_MODULE)
    cls = getattr(module, "LlavaNextModel", None) if module is not None else None
    if cls is not None and "pack_image_features" in vars(cls):
        patch(cls, "pack_image_features", packed_at_once(vars(cls)["pack_image_features"]))


def packed_at_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """``pack_image_features`` for images of one size given by known values: one operation for all of them.

    Anything else (images of several sizes, a single tile, sizes whose values are not known, tile
    features that are not one tensor's consecutive parts) runs the model's own loop.
    """

    def pack_image_features(
        self: Any,
        image_features: Any,
        image_sizes: Any,
        vision_feature_select_strategy: Any,
        image_newline: Any = None,
    ) -> Any:
        stacked = _one_tensor(image_features)
        sizes = _known_sizes(image_sizes)
        if stacked is None or sizes is None or len(set(sizes)) != 1 or len(sizes) != stacked.shape[0]:
            return original(self, image_features, image_sizes, vision_feature_select_strategy, image_newline)
        if stacked.shape[1] <= 1:
            return original(self, image_features, image_sizes, vision_feature_select_strategy, image_newline)
        return _pack(self, stacked, sizes[0], image_newline)

    return pack_image_features


def _known_sizes(image_sizes: Any) -> list[tuple[int, ...]] | None:
    from peftaudit.memory.tracing.standins import _known_class

    if not isinstance(image_sizes, _known_class()):
        return None
    return [tuple(int(v) for v in size) for size in image_sizes.tolist()]


def _one_tensor(image_features: Any) -> Any:
    """The tile features of every image as one (images, tiles, tokens, dim) view, or None.

    They are ``torch.split`` parts of the projector's output: consecutive, equal parts of one
    tensor (its ``_base``), which is viewed whole instead (no copy).
    """
    parts = list(image_features)
    if not parts:
        return None
    base = parts[0]._base
    shape = tuple(parts[0].shape)
    if base is None or any(p._base is not base or tuple(p.shape) != shape for p in parts):
        return None
    if tuple(base.shape) != (len(parts) * shape[0], *shape[1:]) or not base.is_contiguous():
        return None
    offsets = [p.storage_offset() - base.storage_offset() for p in parts]
    step = parts[0].numel()
    if offsets != [i * step for i in range(len(parts))]:
        return None
    return base.view(len(parts), *shape)


def _pack(model: Any, stacked: Any, size: tuple[int, ...], image_newline: Any) -> Any:
    """The model's per-image layout (``LlavaNextModel.pack_image_features``), on every image at once."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    config = model.config
    images = stacked.shape[0]
    base_features = stacked[:, 0]
    grid = stacked[:, 1:]
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
    # (images, rows, cols, side, side, dim) -> (images, dim, rows * side, cols * side), as per image.
    grid = grid.reshape(images, rows, cols, side, side, -1)
    grid = grid.permute(0, 5, 1, 3, 2, 4).contiguous()
    grid = grid.flatten(2, 3).flatten(3, 4)
    # The padding cut off one image (a view: its shape says where) is cut off them all.
    height, width = grid.shape[2:]
    kept = unpad_image(grid[0], list(size))
    top, left = (height - kept.shape[1]) // 2, (width - kept.shape[2]) // 2
    grid = grid[:, :, top : top + kept.shape[1], left : left + kept.shape[2]]
    if image_newline is not None:
        newline = image_newline[None, :, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
        grid = torch.cat((grid, newline), dim=-1)
    grid = grid.flatten(2, 3).transpose(1, 2)
    packed = torch.cat((base_features, grid), dim=1)
    lengths = torch.tensor([packed.shape[1]] * images, dtype=torch.long, device=stacked.device)
    return list(packed.unbind(0)), lengths
