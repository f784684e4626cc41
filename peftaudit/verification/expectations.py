"""What is supposed to change: read from a PeftModel, from patterns, or from an adapter.

Every tensor gets one role. ``must-change`` tensors (adapter weights,
``modules_to_save`` copies, tensors an ``--expect`` pattern names) are
reported when they did not change; ``may-change`` tensors (trainable biases,
``--allow`` patterns) may or may not; everything else is ``frozen`` and must be
bit-for-bit what it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from peftaudit.errors import PeftauditError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: ``init_lora_weights`` values that rewrite the base weight at initialisation.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


class Role(Enum):
    """What a tensor is expected to do between two snapshots."""

    MUST = "must-change"
    MAY = "may-change"
    FROZEN = "frozen"


@dataclass(frozen=True)
class Pattern:
    """A glob, or a regular expression when written ``re:<regex>``.

    A glob matches the whole name or any run of dot-separated parts of it:
    ``lora_*`` matches ``...q_proj.lora_A.default.weight``; ``classifier``
    matches ``classifier.weight`` but not ``pre_classifier.weight``. A regex
    matches anywhere in the name (``re.search``).
    """

    text: str

    def __post_init__(self) -> None:
        if not self.text or self.text == "re:":
            raise PeftauditError("an empty pattern matches nothing; give a glob or re:<regex>")
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as exc:
                raise PeftauditError(f"pattern {self.text!r}: not a regular expression: {exc}") from None

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return re.search(self.text[3:], name) is not None
        p = self.text
        return any(fnmatchcase(name, form) for form in (p, f"*.{p}", f"{p}.*", f"*.{p}.*"))


def patterns(texts: Iterable[str]) -> tuple[Pattern, ...]:
    """Patterns from command-line or API strings."""
    return tuple(Pattern(t) for t in texts)


@dataclass(frozen=True)
class Expectations:
    """The role of every tensor, and facts the diff uses to name causes.

    ``targets`` are module paths that carry an adapter: a rounding-level change
    in their weights is the signature of a merge/unmerge round-trip.
    ``rewrites_base`` records an initialisation (PiSSA, OLoRA, CorDA, LoftQ)
    that rewrites the base weights of those modules.
    """

    must: frozenset[str] = frozenset()
    may: frozenset[str] = frozenset()
    must_patterns: tuple[Pattern, ...] = ()
    may_patterns: tuple[Pattern, ...] = ()
    targets: frozenset[str] = frozenset()
    rewrites_base: bool = False
    origin: tuple[str, ...] = field(default=())

    def role(self, name: str) -> Role:
        """The tensor's role; a pattern the user gave overrides what the model or adapter says."""
        if any(p.matches(name) for p in self.must_patterns):
            return Role.MUST
        if any(p.matches(name) for p in self.may_patterns):
            return Role.MAY
        if name in self.must:
            return Role.MUST
        if name in self.may:
            return Role.MAY
        return Role.FROZEN

    @property
    def empty(self) -> bool:
        return not (self.must or self.may or self.must_patterns or self.may_patterns)

    def is_target_weight(self, name: str) -> bool:
        """Whether ``name`` is a base weight of a module that carries an adapter."""
        if ".base_layer." in name:
            return True
        module = name.rsplit(".", 1)[0] if "." in name else ""
        return module in self.targets

    def combine(self, other: Expectations) -> Expectations:
        """Both sets of expectations at once (roles add up; MUST wins over MAY)."""
        return Expectations(
            must=self.must | other.must,
            may=self.may | other.may,
            must_patterns=self.must_patterns + other.must_patterns,
            may_patterns=self.may_patterns + other.may_patterns,
            targets=self.targets | other.targets,
            rewrites_base=self.rewrites_base or other.rewrites_base,
            origin=self.origin + tuple(o for o in other.origin if o not in self.origin),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "must": sorted(self.must),
            "may": sorted(self.may),
            "must_patterns": [p.text for p in self.must_patterns],
            "may_patterns": [p.text for p in self.may_patterns],
            "targets": sorted(self.targets),
            "rewrites_base": self.rewrites_base,
            "origin": list(self.origin),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Expectations:
        return cls(
            must=frozenset(data.get("must", ())),
            may=frozenset(data.get("may", ())),
            must_patterns=patterns(data.get("must_patterns", ())),
            may_patterns=patterns(data.get("may_patterns", ())),
            targets=frozenset(data.get("targets", ())),
            rewrites_base=bool(data.get("rewrites_base", False)),
            origin=tuple(data.get("origin", ())),
        )


def from_patterns(expect: Sequence[str] = (), allow: Sequence[str] = ()) -> Expectations:
    """Expectations from ``--expect`` (must change) and ``--allow`` (may change) patterns."""
    origin = (("--expect",) if expect else ()) + (("--allow",) if allow else ())
    return Expectations(must_patterns=patterns(expect), may_patterns=patterns(allow), origin=origin)


def from_model(model: torch.nn.Module) -> Expectations:
    """Expectations read from a live model.

    For a PeftModel: the active adapters' weights and ``modules_to_save``
    copies must change, biases may change when the config trains them
    (``bias="all"`` or ``"lora_only"``), everything else is frozen. Inactive
    adapters are frozen. The adapter weights are what each tuner layer
    declares in ``adapter_layer_names`` (LoRA, LoHa, LoKr, VeRA, OFT, BOFT,
    AdaLoRA, IA3, trainable tokens, ... alike) plus the prompt encoder of
    prompt learning; what a tuner keeps fixed (``other_param_names``: VeRA's
    projections, AdaLoRA's ``ranknum``) and weights a variant freezes by
    design (``frozen_peft_weight_names``: MiCA's ``lora_B``) are frozen. For
    any other module: trainable parameters may change and the rest is frozen.
    """
    config = getattr(model, "peft_config", None)
    if not isinstance(config, Mapping) or not config:
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        return Expectations(may=frozenset(trainable), origin=("requires_grad",))

    must: set[str] = set()
    targets: set[str] = set()
    active_all: set[str] = set()
    for module_name, module in model.named_modules():
        layer_names = getattr(module, "adapter_layer_names", None)
        if not layer_names:
            continue
        prefix = f"{module_name}." if module_name else ""
        active = set(_active_adapters(module))
        active_all |= active
        if hasattr(module, "base_layer"):
            targets.add(module_name)
        # Weights a variant keeps frozen by design (MiCA's lora_B, peft >= 0.21): not expected to change.
        frozen = getattr(module, "frozen_peft_weight_names", None) or {}
        for attr in layer_names:
            holder = _get_path(module, attr)
            if holder is None:
                continue
            for pname, _ in holder.named_parameters(remove_duplicate=False):
                adapter = pname.split(".", 1)[0]
                if adapter in active and attr not in frozen.get(adapter, ()):
                    must.add(f"{prefix}{attr}.{pname}")
    prompt = getattr(model, "prompt_encoder", None)
    if prompt is not None:
        active_all |= set(_active_adapters(model))
        for pname, _ in prompt.named_parameters(remove_duplicate=False):
            if pname.split(".", 1)[0] in active_all:
                must.add(f"prompt_encoder.{pname}")

    may: set[str] = set()
    rewrites = False
    bias_modes = set()
    for adapter in active_all or set(config):
        cfg = config.get(adapter)
        if cfg is None:
            continue
        bias_modes.add(str(getattr(cfg, "bias", "none")))
        init = getattr(cfg, "init_lora_weights", None)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            rewrites = True
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    if "all" in bias_modes:
        may |= {n for n in names if n.endswith(".bias")}
    if "lora_only" in bias_modes:
        may |= {n for n in names if n.endswith(".base_layer.bias")}
    return Expectations(
        must=frozenset(must),
        may=frozenset(may - must),
        targets=frozenset(targets),
        rewrites_base=rewrites,
        origin=("PeftModel",),
    )


def _active_adapters(module: Any) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        return [active]
    return list(active or [])


def _get_path(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if hasattr(module, "named_parameters") else None
