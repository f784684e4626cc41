"""A saved adapter's ``adapter_config.json``, read as peft reads it, for the verifier.

peft builds a ``LoraConfig`` from the file: a key that is absent takes the
dataclass default (``r`` 8, ``lora_alpha`` 8, no rsLoRA, no patterns), and
``LoraModel._create_and_replace`` picks each module's rank and alpha with
``peft.utils.other.get_pattern_key``: the first key of ``rank_pattern`` /
``alpha_pattern`` for which ``re.match(rf"(.*\\.)?({key})$", module)``
matches, else ``r`` / ``lora_alpha``. ``LoraLayer.update_layer`` then sets
the scale to ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

Values peft would trip over later (``r: "x"``, an alpha that is not a
number, a pattern key that is not a regular expression) are refused here
with one line naming the file and the key, so a wrong merge can never pass
because its scale could not be worked out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peftaudit.units import is_finite_number
from peftaudit.verification.errors import CheckpointError
from peftaudit.verification.expectations import BASE_REWRITING_INITS

#: peft's ``LoraConfig`` defaults (peft/tuners/lora/config.py: ``r: int = 8``, ``lora_alpha: int = 8``).
DEFAULT_R = 8
DEFAULT_ALPHA = 8
_BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class Scale:
    """peft's scale for one module, and how it was derived (for messages)."""

    value: float
    rank: int
    rule: str


@dataclass(frozen=True)
class LoraSettings:
    """The fields of ``adapter_config.json`` the verifier uses, validated, with peft's defaults filled in.

    ``where`` names the file (for messages); ``defaults`` lists the keys the
    file leaves out and that therefore take peft's default value.
    """

    where: str
    r: int = DEFAULT_R
    lora_alpha: float = DEFAULT_ALPHA
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | str | None = None
    init_lora_weights: bool | str = True
    defaults: tuple[str, ...] = ()
    #: The file's ``peft_type``; for other methods than LoRA only the fields they share are read.
    peft_type: str = "LORA"

    @property
    def origin(self) -> str:
        """Where the expectations came from: the file, and which values are peft's defaults."""
        notes = [f"{key} missing: peft's default {_number(value)}" for key, value in self._defaulted()]
        return self.where + (f" ({'; '.join(notes)})" if notes else "")

    def _defaulted(self) -> list[tuple[str, float]]:
        values = {"r": float(self.r), "lora_alpha": self.lora_alpha}
        return [(key, values[key]) for key in self.defaults if key in values]

    def rank_for(self, module: str) -> tuple[int, str | None]:
        """The rank peft gives ``module`` and the ``rank_pattern`` key that chose it (None: ``r``)."""
        key = _pattern_key(self.rank_pattern, module)
        return (self.r, None) if key is None else (dict(self.rank_pattern)[key], key)

    def scale_for(self, module: str) -> Scale:
        """peft's scaling for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank, rank_key = self.rank_for(module)
        alpha_key = _pattern_key(self.alpha_pattern, module)
        alpha = self.lora_alpha if alpha_key is None else dict(self.alpha_pattern)[alpha_key]
        if alpha_key is not None:
            alpha_text = f"alpha_pattern[{alpha_key!r}] {_number(alpha)}"
        else:
            alpha_text = f"lora_alpha {_number(alpha)}" + (" (peft's default)" if "lora_alpha" in self.defaults else "")
        if rank_key is not None:
            rank_text = f"rank_pattern[{rank_key!r}] {rank}"
        else:
            rank_text = f"r {rank}" + (" (peft's default)" if "r" in self.defaults else "")
        if self.use_rslora:
            return Scale(alpha / math.sqrt(rank), rank, f"{alpha_text} / sqrt({rank_text}) (use_rslora)")
        return Scale(alpha / rank, rank, f"{alpha_text} / {rank_text}")

    def module_matches(self, module: str) -> bool:
        """Whether ``module`` is one of ``modules_to_save`` (peft: a regex string, or name suffixes)."""
        keys = self.modules_to_save
        if not keys:
            return False
        if isinstance(keys, str):
            return re.fullmatch(keys, module) is not None
        return any(module == k or module.endswith("." + k) for k in keys)

    @property
    def rewrites_base(self) -> bool:
        """An initialisation (PiSSA, OLoRA, CorDA, LoftQ) that rewrites the targets' base weights."""
        init = self.init_lora_weights
        return isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS)


def _pattern_key(patterns: tuple[tuple[str, Any], ...], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key that matches, in the file's order.
    for key, _ in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _number(value: float) -> str:
    return f"{value:g}"


def read_lora_settings(config: Any, where: str) -> LoraSettings:
    """Validate an adapter config (the parsed ``adapter_config.json``) as peft would use it.

    ``config`` None means there is no file: peft cannot load such an adapter,
    and the merge's scale cannot be known, so it is refused. Raises
    :class:`CheckpointError` naming ``where`` and the offending key.
    """
    if config is None:
        raise CheckpointError(
            f"{where}: missing; peft cannot load an adapter without it, and the scale a merge must "
            "apply (lora_alpha / r) comes from it"
        )
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: adapter config is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or not peft_type:
        raise CheckpointError(f"{where}: peft_type {peft_type!r} is not a peft method name")
    if peft_type != "LORA":
        return _other_method(config, where, peft_type)
    defaults = tuple(key for key in ("r", "lora_alpha") if key not in config)
    return LoraSettings(
        where=where,
        r=_rank(config.get("r", DEFAULT_R), where, "r"),
        lora_alpha=_alpha(config.get("lora_alpha", DEFAULT_ALPHA), where, "lora_alpha"),
        use_rslora=_flag(config, "use_rslora", where),
        rank_pattern=_patterns(config, "rank_pattern", where, _rank),
        alpha_pattern=_patterns(config, "alpha_pattern", where, _alpha),
        use_dora=_flag(config, "use_dora", where),
        fan_in_fan_out=_flag(config, "fan_in_fan_out", where),
        bias=_bias(config.get("bias"), where),
        modules_to_save=_module_names(config.get("modules_to_save"), where),
        init_lora_weights=_init(config.get("init_lora_weights", True), where),
        defaults=defaults,
    )


def _other_method(config: Mapping[str, Any], where: str, peft_type: str) -> LoraSettings:
    """Another peft method (LoHa, VeRA, AdaLoRA, prompt tuning, ...): the fields an audit uses.

    Their ``bias`` modes are named after the method (``"boft_only"``, ``"vera_only"``);
    AdaLoRA's ``rank_pattern`` holds rank masks, not ranks, and is not read.
    """
    bias = config.get("bias")
    if bias is not None and (not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only"))):
        raise CheckpointError(f"{where}: bias {bias!r} is not one of none, all, <method>_only")
    return LoraSettings(
        where=where,
        bias=str(bias or "none"),
        modules_to_save=_module_names(config.get("modules_to_save"), where),
        init_lora_weights=_init(config.get("init_lora_weights", True), where),
        peft_type=peft_type,
    )


def _rank(value: Any, where: str, key: str) -> int:
    # LoraLayer.update_layer: "`r` should be a positive integer value".
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: {key} {value!r} is not a positive integer (peft's LoRA rank)")
    return value


def _alpha(value: Any, where: str, key: str) -> float:
    if not is_finite_number(value):
        raise CheckpointError(f"{where}: {key} {value!r} is not a finite number (peft's LoRA alpha)")
    return float(value)


def _flag(config: Mapping[str, Any], key: str, where: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} {value!r} is not true or false")
    return value


def _patterns(config: Mapping[str, Any], key: str, where: str, check: Any) -> tuple[tuple[str, Any], ...]:
    table = config.get(key)
    if table is None:
        return ()
    if not isinstance(table, Mapping):
        raise CheckpointError(f"{where}: {key} is not a JSON object of module pattern -> value")
    out = []
    for pattern, value in table.items():
        if not isinstance(pattern, str) or not pattern:
            raise CheckpointError(f"{where}: {key} key {pattern!r} is not a module name or regular expression")
        try:
            re.compile(pattern)  # alone first, so the error's position is within the key
            re.compile(rf"(.*\.)?({pattern})$")  # as peft's get_pattern_key uses it
        except re.error as exc:
            raise CheckpointError(f"{where}: {key} key {pattern!r} is not a regular expression: {exc}") from None
        out.append((pattern, check(value, where, f"{key}[{pattern!r}]")))
    return tuple(out)


def _bias(value: Any, where: str) -> str:
    if value is None:
        return "none"
    if value not in _BIAS_MODES:
        raise CheckpointError(f"{where}: bias {value!r} is not one of {', '.join(_BIAS_MODES)}")
    return str(value)


def _module_names(value: Any, where: str) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise CheckpointError(f"{where}: modules_to_save {value!r} is not a regular expression: {exc}") from None
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{where}: modules_to_save is not a list of module names")
    return tuple(value)


def _init(value: Any, where: str) -> bool | str:
    if value is None:
        return True
    if not isinstance(value, (bool, str)):
        raise CheckpointError(f"{where}: init_lora_weights {value!r} is not true, false or a method name")
    return value
