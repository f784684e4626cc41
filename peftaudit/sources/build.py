"""Build a transformers model skeleton on the meta device from a config dict."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from peftaudit.errors import ConfigError, RemoteCodeRequired

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DTYPE_KEYS = ("dtype", "torch_dtype")


def build_from_config(
    config: Mapping[str, Any],
    *,
    model_id: str,
    trust_remote_code: bool = False,
    local_dir: str | None = None,
) -> torch.nn.Module:
    """Instantiate the model ``config`` describes on ``torch.device("meta")``.

    The class is the first of the config's ``architectures`` that transformers
    has, falling back to the causal-LM Auto class for the ``model_type`` (or the
    base Auto class). Nothing is downloaded or allocated. Remote code runs only
    with ``trust_remote_code`` and only from a local directory.
    """
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{model_id}: config.json has no 'model_type'")
    needs_remote = model_type not in CONFIG_MAPPING
    if needs_remote and not config.get("auto_map"):
        raise ConfigError(
            f"{model_id}: transformers {transformers.__version__} does not know model type "
            f"'{model_type}' (upgrade transformers, or check the config)"
        )
    if needs_remote and not trust_remote_code:
        raise RemoteCodeRequired(
            f"{model_id}: model type '{model_type}' is not built into transformers and needs "
            "the repository's own code; pass --trust-remote-code to allow running it"
        )

    with _quiet_transformers():
        if needs_remote:
            return _build_remote(model_id, local_dir)
        kwargs = {k: v for k, v in config.items() if k != "model_type"}
        try:
            cfg = AutoConfig.for_model(model_type, **kwargs)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{model_id}: invalid config.json: {exc}") from exc
        cls = _model_class(cfg, model_type)
        dtype = _dtype(config)
        try:
            # Initialisers do nothing useful on meta tensors and cost most of the build time.
            with torch.device("meta"), _no_init_weights():
                model: torch.nn.Module = cls._from_config(cfg, dtype=dtype)
            # Skipping initialisation also skips tying; tie as from_pretrained would.
            tie = getattr(model, "tie_weights", None)
            if callable(tie):
                tie()
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
            raise ConfigError(f"{model_id}: transformers cannot build this config: {exc}") from exc
    return model


def _model_class(cfg: Any, model_type: str) -> Any:
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if cls is not None and hasattr(cls, "_from_config"):
            return cls
    auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    return auto._model_mapping[type(cfg)]


def _dtype(config: Mapping[str, Any]) -> Any:
    import torch

    for key in _DTYPE_KEYS:
        value = config.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return _dtype(text)
    return torch.float32


def _build_remote(model_id: str, local_dir: str | None) -> torch.nn.Module:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if local_dir is None:
        raise RemoteCodeRequired(
            f"{model_id}: remote code is only run from a local directory; download the repository and pass its path"
        )
    try:
        cfg = AutoConfig.from_pretrained(local_dir, trust_remote_code=True)
        auto_map = getattr(cfg, "auto_map", {}) or {}
        auto = AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else AutoModel
        with torch.device("meta"):
            model: torch.nn.Module = auto.from_config(cfg, trust_remote_code=True)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{model_id}: the repository's code could not build the model: {exc}") from exc
    return model


def _no_init_weights() -> contextlib.AbstractContextManager[object]:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same counts)
        return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' config chatter (token ids out of range and the like)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def read_config_file(path: str, model_id: str) -> dict[str, Any]:
    """Read and validate a config.json: a JSON object, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{model_id}: no config file at {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{model_id}: {path} is not valid JSON (truncated or malformed): {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{model_id}: cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{model_id}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


#: Config keys that are sizes: a zero or negative value is a broken config.
SIZE_KEYS: frozenset[str] = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "head_dim",
        "max_position_embeddings",
        "n_embd",
        "n_layer",
        "n_head",
        "n_positions",
        "n_inner",
        "d_model",
        "d_ff",
        "d_kv",
        "num_layers",
        "num_heads",
        "ffn_dim",
        "moe_intermediate_size",
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "num_experts_per_tok",
    }
)


def validate_sizes(config: Mapping[str, Any], model_id: str, where: str = "") -> None:
    """Refuse zero, negative or non-integer sizes before transformers sees them."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            validate_sizes(value, model_id, f"{where}{key}.")
            continue
        if key not in SIZE_KEYS or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{model_id}: config '{where}{key}' must be an integer, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{model_id}: config '{where}{key}' must be positive, got {value}")
