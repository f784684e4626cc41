"""The diffusers model classes this plugin knows, and the ``model_type`` each is audited as.

diffusers configs carry ``_class_name`` but no ``model_type``; peftaudit's
inventory keys architecture rules on ``model_type``, so each supported class
gets one here and the source writes it into the built model's config.
"""

from __future__ import annotations

#: diffusers class name -> the ``model_type`` peftaudit sees for it.
MODEL_TYPES: dict[str, str] = {
    "UNet2DConditionModel": "diffusers-unet-2d-condition",
    "SD3Transformer2DModel": "diffusers-sd3-transformer",
    "FluxTransformer2DModel": "diffusers-flux-transformer",
}

UNET = MODEL_TYPES["UNet2DConditionModel"]
SD3 = MODEL_TYPES["SD3Transformer2DModel"]
FLUX = MODEL_TYPES["FluxTransformer2DModel"]

#: Short names accepted by :func:`peftaudit_diffusers.targets.lora_targets`.
KIND_ALIASES: dict[str, str] = {"unet": UNET, "sd": UNET, "sdxl": UNET, "sd3": SD3, "flux": FLUX}


def model_type_for(kind: str) -> str:
    """The ``model_type`` for a short kind (``unet``, ``sdxl``, ``sd3``, ``flux``), a class name, or a model type."""
    key = kind.strip()
    if key in MODEL_TYPES:
        return MODEL_TYPES[key]
    if key in MODEL_TYPES.values():
        return key
    alias = KIND_ALIASES.get(key.lower())
    if alias is None:
        known = ", ".join(sorted([*KIND_ALIASES, *MODEL_TYPES]))
        raise ValueError(f"unknown diffusers model kind '{kind}'; known: {known}")
    return alias
