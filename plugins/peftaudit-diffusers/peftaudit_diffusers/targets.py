"""The LoRA target modules diffusers' own training scripts use, per model kind.

``to_q, to_k, to_v, to_out.0`` is what diffusers' ``train_dreambooth_lora``
and ``train_dreambooth_lora_sdxl`` put in ``LoraConfig(target_modules=...)``
for the UNet; the SD3 and Flux scripts add the joint-attention text
projections and the feed-forward layers of both streams.
"""

from __future__ import annotations

from peftaudit_diffusers.kinds import FLUX, SD3, UNET, model_type_for

_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_TARGETS = (
    *_UNET_TARGETS,
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

LORA_TARGETS: dict[str, tuple[str, ...]] = {UNET: _UNET_TARGETS, SD3: _JOINT_TARGETS, FLUX: _JOINT_TARGETS}


def lora_targets(kind: str) -> tuple[str, ...]:
    """The usual peft ``target_modules`` (module-name suffixes) for ``kind``.

    ``kind`` is ``unet`` (also ``sd``/``sdxl``), ``sd3`` or ``flux``, a diffusers
    class name such as ``FluxTransformer2DModel``, or the model type this plugin
    reports. Raises ``ValueError`` for anything else.
    """
    return LORA_TARGETS[model_type_for(kind)]
