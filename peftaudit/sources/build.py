"""Build a transformers model skeleton on the meta device from a config dict.

Everything a config can get wrong is one :class:`~peftaudit.errors.ConfigError`
naming the field: a config file too large or not a regular file
(:data:`MAX_CONFIG_BYTES`), sizes that are not positive integers, a skeleton
too large to build (:data:`MAX_LAYERS`, :data:`MAX_EXPERT_BLOCKS`), values
transformers' own validation refuses, and a model with no parameters at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from peftaudit.errors import ConfigError, RemoteCodeRequired

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftaudit.sources.base import ResolvedModel, SourceOptions

_DTYPE_KEYS = ("dtype", "torch_dtype")

#: config.json files are kilobytes; a larger one is refused before it is read
#: (same style of limit as the verifier's ``MAX_JSON_BYTES`` for index files).
MAX_CONFIG_BYTES = 50 << 20

_NOTHING = "nothing to audit (check 'architectures')"


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
    with ``trust_remote_code`` and only from a local directory. A config that
    fails :func:`validate_config` or transformers' own validation, or that builds
    a model with no parameters (nothing to audit), is a :class:`ConfigError`.
    """
    validate_config(config, model_id)
    with _quiet_transformers():
        model = _build(config, model_id=model_id, trust_remote_code=trust_remote_code, local_dir=local_dir)
    if not any(p.numel() for p in model.parameters()):
        raise ConfigError(f"{model_id}: the config builds a {type(model).__name__} with no parameters: {_NOTHING}")
    return model


def build_resolved(resolved: ResolvedModel, options: SourceOptions) -> torch.nn.Module:
    """The skeleton of a resolved config file (local folder or hub cache): remote code only if allowed."""
    return build_from_config(
        resolved.config,
        model_id=resolved.id,
        trust_remote_code=options.trust_remote_code,
        local_dir=resolved.local_dir,
    )


def _build(
    config: Mapping[str, Any], *, model_id: str, trust_remote_code: bool, local_dir: str | None
) -> torch.nn.Module:
    import torch
    import transformers
    from huggingface_hub.errors import StrictDataclassError
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

    if needs_remote:
        return _build_remote(model_id, local_dir)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
    except StrictDataclassError as exc:  # transformers' typed configs validate on construction
        raise ConfigError(f"{model_id}: invalid config.json: {_strict_message(exc)}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{model_id}: invalid config.json: {exc}") from exc
    cls = _model_class(cfg, model_type)
    if cls is transformers.PreTrainedModel:
        # Refused before it is built: building the bare base class makes transformers cache "may use
        # grouped experts" on PreTrainedModel itself (it reads modeling_utils.py's source, which names
        # the decorator), and every model class not yet built inherits that answer for the rest of the
        # process: a BERT built later asks for grouped experts and fails.
        raise ConfigError(f"{model_id}: the config builds a PreTrainedModel with no parameters: {_NOTHING}")
    dtype = _dtype(config)
    try:
        # Initialisers do nothing useful on meta tensors and cost most of the build time.
        with torch.device("meta"), _no_init_weights():
            model: torch.nn.Module = cls._from_config(cfg, dtype=dtype)
        # Skipping initialisation also skips tying; tie as from_pretrained would.
        tie = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()
    except StrictDataclassError as exc:
        raise ConfigError(f"{model_id}: invalid config.json: {_strict_message(exc)}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise ConfigError(f"{model_id}: transformers cannot build this config: {exc}") from exc
    return model


def _strict_message(exc: Exception) -> str:
    """huggingface_hub's strict-dataclass error as one line: the field, then what is wrong with it.

    Its text is ``Validation error for field 'F':\n    TypeError: ...`` (or ``for
    validator 'V'``); the cause's own message is the useful part.
    """
    header, _, detail = str(exc).partition("\n")
    detail = detail.strip()
    kind, sep, cause = detail.partition(": ")
    if sep and kind.isidentifier():
        detail = cause
    field = header.partition("for field ")[2].rstrip(":")
    if field and field.strip("'") not in detail:
        return f"{field}: {detail}"
    return detail or header


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
    """Read and validate a config.json: a JSON object, or a one-line error.

    The file's type and size are checked on the open descriptor before anything
    is read: a FIFO or device is refused (reading it could wait forever or never
    end), and so is a file over :data:`MAX_CONFIG_BYTES`.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore the flag.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise ConfigError(f"{model_id}: no config file at {path}") from exc
    except OSError as exc:
        raise ConfigError(f"{model_id}: cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{model_id}: {path} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(_too_large(model_id, path, info.st_size))
        try:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # the file may have grown since fstat
        except OSError as exc:
            raise ConfigError(f"{model_id}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_large(model_id, path, len(raw)))
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors, and huge integers
        raise ConfigError(f"{model_id}: {path} is not valid JSON (truncated or malformed): {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{model_id}: {path} must hold a JSON object, not {type(data).__name__}")
    return data


def _too_large(model_id: str, path: str, size: int) -> str:
    return f"{model_id}: {path} of {size} bytes exceeds the {MAX_CONFIG_BYTES}-byte limit for config files"


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
        # One size per stage is a list of sizes (Swin's num_heads [3, 6, 12, 24]).
        for size in value if isinstance(value, list) and value else [value]:
            if isinstance(size, bool) or not isinstance(size, int):
                raise ConfigError(f"{model_id}: config '{where}{key}' must be an integer, got {value!r}")
            if size <= 0:
                raise ConfigError(f"{model_id}: config '{where}{key}' must be positive, got {value}")


#: Config keys that count layers; encoder and decoder counts at the same level add up.
LAYER_KEYS: frozenset[str] = frozenset(
    {
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "num_encoder_layers",
        "num_decoder_layers",
        "encoder_layers",
        "decoder_layers",
    }
)
#: Config keys that count experts per MoE layer.
EXPERT_KEYS: frozenset[str] = frozenset({"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"})
#: Building a skeleton costs about a millisecond per layer, and memory with it; published
#: models have a few hundred layers at most (Llama 3.1 405B has 126), so more is a broken config.
MAX_LAYERS = 1_000
#: Layers x experts: some architectures build one module per expert, a few seconds per ten
#: thousand (google/switch-c-2048 has 27 layers x 2,048 experts = 55,296).
MAX_EXPERT_BLOCKS = 100_000


def validate_config(config: Mapping[str, Any], model_id: str) -> None:
    """Everything peftaudit checks in a config before transformers sees it.

    Sizes must be positive integers (:func:`validate_sizes`), ``architectures``
    a list of class names, and the skeleton small enough to build in seconds:
    at most :data:`MAX_LAYERS` layers and :data:`MAX_EXPERT_BLOCKS` experts in all.
    """
    validate_sizes(config, model_id)
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise ConfigError(f"{model_id}: config 'architectures' must be a list of class names, got {architectures!r}")
    _validate_skeleton(config, model_id)


def _validate_skeleton(config: Mapping[str, Any], model_id: str, where: str = "") -> None:
    layers = 0
    experts = 1
    for key, value in config.items():
        if isinstance(value, Mapping):
            _validate_skeleton(value, model_id, f"{where}{key}.")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue  # non-integers are validate_sizes' (or transformers') to refuse
        if key in LAYER_KEYS:
            if value > MAX_LAYERS:
                raise ConfigError(
                    f"{model_id}: config '{where}{key}' is {value}; peftaudit builds skeletons of at most "
                    f"{MAX_LAYERS:,} layers (far more than any published model)"
                )
            layers += max(value, 0)
        elif key in EXPERT_KEYS:
            experts = max(experts, value)
    if experts > 1 and layers * experts > MAX_EXPERT_BLOCKS:
        raise ConfigError(
            f"{model_id}: config{' ' + where.rstrip('.') if where else ''} has {layers:,} layers x {experts:,} "
            f"experts = {layers * experts:,} experts in all; peftaudit builds skeletons of at most "
            f"{MAX_EXPERT_BLOCKS:,}"
        )
