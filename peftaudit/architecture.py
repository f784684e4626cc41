"""Architecture rules: which module of a model is attention, MLP, experts, router, head.

Rules are data: a regular expression over the module's path, the role it
gives, and optionally the ``model_type`` values it applies to. Built-in rules
live in :mod:`peftaudit.builtin.architectures` and are registered through the
same hook a third-party plugin uses (``peftaudit_register_architecture_rules``).

Where no rule matches, a module is classified by its structure (an
``nn.Embedding`` is an embedding, a class named ``*Norm`` is a norm, ...), so an
unknown architecture still gets parameter kinds; only roles that need names
(q versus v, gate versus up) stay unknown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ModuleRole(StrEnum):
    """What a module does in the network, in the words LoRA users use."""

    ATTENTION_Q = "attention.q"
    ATTENTION_K = "attention.k"
    ATTENTION_V = "attention.v"
    ATTENTION_O = "attention.o"
    ATTENTION_QKV = "attention.qkv"
    """A fused query/key/value projection (GPT-2 ``c_attn``, Falcon ``query_key_value``)."""
    ATTENTION_OTHER = "attention.other"
    """Other attention projections (DeepSeek's low-rank ``q_a_proj``/``kv_a_proj``)."""
    MLP_GATE = "mlp.gate"
    MLP_UP = "mlp.up"
    MLP_GATE_UP = "mlp.gate_up"
    MLP_DOWN = "mlp.down"
    EXPERTS = "experts"
    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    EMBEDDING = "embedding"
    OUTPUT_HEAD = "output_head"
    NORM = "norm"
    CLASSIFIER = "classifier"
    POOLER = "pooler"


@dataclass(frozen=True)
class ArchitectureRule:
    """Give ``role`` to modules whose path matches ``pattern`` (``re.search``).

    ``model_types`` limits the rule to those ``config.model_type`` values; empty
    means every model. ``module_types`` limits it to modules of those class names.
    """

    pattern: str
    role: ModuleRole
    model_types: tuple[str, ...] = ()
    module_types: tuple[str, ...] = ()
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.pattern))

    def matches(self, path: str, module_type: str, model_type: str | None) -> bool:
        if self.model_types and model_type not in self.model_types:
            return False
        if self.module_types and module_type not in self.module_types:
            return False
        return self._compiled.search(path) is not None


@dataclass(frozen=True)
class ArchitectureRules:
    """An ordered set of rules: rules for a specific model type win over generic ones."""

    rules: tuple[ArchitectureRule, ...] = ()

    def role(self, path: str, module_type: str, model_type: str | None) -> ModuleRole | None:
        specific = (r for r in self.rules if r.model_types)
        generic = (r for r in self.rules if not r.model_types)
        for group in (specific, generic):
            for rule in group:
                if rule.matches(path, module_type, model_type):
                    return rule.role
        return None

    def knows(self, model_type: str | None) -> bool:
        """Whether any rule names this model type specifically."""
        return any(model_type in r.model_types for r in self.rules)

    @classmethod
    def from_rules(cls, rules: Iterable[ArchitectureRule]) -> ArchitectureRules:
        return cls(tuple(rules))


def classify_module(path: str, module: Any, model_type: str | None, rules: ArchitectureRules) -> ModuleRole | None:
    """The role of one module: a matching rule first, then its structure."""
    module_type = type(module).__name__
    role = rules.role(path, module_type, model_type)
    if role is not None:
        return role
    return _structural_role(module_type)


def _structural_role(module_type: str) -> ModuleRole | None:
    if "Rotary" in module_type:
        return None
    if module_type.endswith("Embedding") or module_type == "Embedding":
        return ModuleRole.EMBEDDING
    if "Norm" in module_type:
        return ModuleRole.NORM
    if module_type.endswith("Experts"):
        return ModuleRole.EXPERTS
    if "Router" in module_type:
        return ModuleRole.ROUTER
    return None
