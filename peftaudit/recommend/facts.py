"""What the readiness checks need to know about a model beyond its inventory.

The inventory says which parameters exist; some checks also need the model's
config (token ids, ``auto_map``) and what its class supports (gradient
checkpointing, SDPA, flash attention). :func:`model_facts` reads those once from
the built skeleton, so the checks stay pure functions of plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftaudit.inventory import text_config as language_config


@dataclass(frozen=True)
class ModelFacts:
    """Config values and class capabilities, read once from the model."""

    model_id: str
    config: Mapping[str, Any] = field(default_factory=dict)
    """The model's ``config.json`` content."""
    supports_gradient_checkpointing: bool | None = None
    supports_sdpa: bool | None = None
    supports_flash_attention: bool | None = None
    remote_code: bool = False
    """The model type is not built into transformers: its repository's code must run."""

    @property
    def text_config(self) -> Mapping[str, Any]:
        """The language model's part of a multimodal config (else the config itself)."""
        return language_config(self.config)

    def to_dict(self) -> dict[str, Any]:
        """The facts as JSON-ready data (:meth:`from_dict` reads them back equal)."""
        return {
            "model_id": self.model_id,
            "config": dict(self.config),
            "supports_gradient_checkpointing": self.supports_gradient_checkpointing,
            "supports_sdpa": self.supports_sdpa,
            "supports_flash_attention": self.supports_flash_attention,
            "remote_code": self.remote_code,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFacts:
        """The facts :meth:`to_dict` wrote (raises ``KeyError``/``TypeError`` on anything else)."""
        return cls(
            model_id=data["model_id"],
            config=dict(data["config"]),
            supports_gradient_checkpointing=data["supports_gradient_checkpointing"],
            supports_sdpa=data["supports_sdpa"],
            supports_flash_attention=data["supports_flash_attention"],
            remote_code=bool(data["remote_code"]),
        )

    def token_id(self, name: str) -> int | list[int] | None:
        """A special token id (``pad_token_id``, ``eos_token_id``...), from the text config or the top level."""
        for source in (self.text_config, self.config):
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                return list(value)
        return None


def model_facts(model: Any, *, model_id: str, config: Mapping[str, Any] | None = None) -> ModelFacts:
    """Read the facts from a built model (meta device is fine: nothing is computed)."""
    cls = type(model)
    if config is None:
        to_dict = getattr(getattr(model, "config", None), "to_dict", None)
        config = to_dict() if callable(to_dict) else {}
    return ModelFacts(
        model_id=model_id,
        config=dict(config or {}),
        supports_gradient_checkpointing=_flag(cls, "supports_gradient_checkpointing"),
        supports_sdpa=_flag(cls, "_supports_sdpa"),
        # transformers 5 says _supports_flash_attn; 4.x said _supports_flash_attn_2.
        supports_flash_attention=_flag(cls, "_supports_flash_attn", "_supports_flash_attn_2"),
        remote_code=needs_remote_code(config or {}),
    )


def needs_remote_code(config: Mapping[str, Any]) -> bool:
    """Whether building this config runs code from the model's repository."""
    model_type = config.get("model_type")
    if not config.get("auto_map"):
        return False
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:  # pragma: no cover - transformers is a dependency
        return True
    return model_type not in CONFIG_MAPPING


def _flag(cls: type, *names: str) -> bool | None:
    for name in names:
        value = getattr(cls, name, None)
        if isinstance(value, bool):
            return value
    return None
