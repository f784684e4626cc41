"""How peft matches a config against a model's module and parameter paths: the one copy of its rules.

The recommender (which names to write), the readiness checks (what a config
would adapt) and the memory estimator (what trains, so what it costs) all ask
these functions, so ``--checks``, ``recommend`` and ``memory`` cannot disagree
about what ``all-linear`` or a name list selects. Each rule is peft 0.21's, from
``peft/tuners/tuners_utils.py`` unless said otherwise:

* ``target_modules`` as a list selects a path equal to a name or ending in
  ``"." + name``; as a string it is a regular expression that must match the
  whole path (``check_target_module_exists``, ``match_target_against_key``).
* ``"all-linear"`` (any case) is every ``nn.Linear`` and transformers ``Conv1D``
  but the output embedding, the module ``get_output_embeddings()`` returns
  (``_maybe_include_all_linear_layers``); the inventory records that module once,
  as :attr:`~peftaudit.inventory.Inventory.output_head`.
* ``exclude_modules`` and ``modules_to_save`` win over the targets: an excluded
  path (a string is a regular expression over the whole path, a list matches as
  ``target_modules`` does) or a path inside a module to save is never adapted.
* ``layers_to_transform`` keeps only paths whose first numbered segment (after
  ``layers_pattern``, when given) is one of the layers; as in peft, it filters
  list targets matched by their end only (not a regular expression, not a
  path given in full).
* ``target_parameters`` select a parameter by its full name or its end after a
  dot (``_inject_parameters``).
* ``modules_to_save`` names select every module whose path ends with the name,
  with no dot required (``peft.utils.other._set_trainable``).
* ``rank_pattern``/``alpha_pattern`` keys are regular expressions matched against
  the end of a path, first key wins (``peft.utils.other.get_pattern_key``).

What peft then creates for a whole config (adapter shapes, MoE re-targeting,
per-method defaults) is :mod:`peftaudit.memory.targets`, built on these rules.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence, Set
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory

#: peft's shorthand for every linear layer but the output embedding (``INCLUDE_LINEAR_LAYERS_SHORTHAND``).
ALL_LINEAR = "all-linear"

Targets = str | Collection[str]
"""``target_modules`` as peft takes it: a regular expression, or names."""


def is_all_linear(targets: Targets | None) -> bool:
    """Whether ``targets`` is peft's ``"all-linear"`` shorthand (compared without case, as peft does)."""
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def all_linear(inventory: Inventory) -> tuple[str, ...]:
    """The module paths peft's ``"all-linear"`` expands to on this model, in model order."""
    head = inventory.output_head
    return tuple(m.path for m in inventory.modules if m.path and m.is_linear and m.path != head)


def name_matches(name: str, key: str) -> bool:
    """peft's list matching: ``key`` is ``name`` or ends in ``"." + name``."""
    return key == name or key.endswith("." + name)


def targets_match(targets: Targets, key: str) -> bool:
    """Whether ``target_modules`` (already expanded from ``"all-linear"``) names ``key``.

    A string is a regular expression over the whole path; anything else is a
    collection of names matched by :func:`name_matches`.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if isinstance(targets, Set):
        # The same test as below, as lookups: ``key`` ends in "." + name exactly when the part after
        # one of its dots is a name. All-linear expands to a set of every linear path, and testing every
        # module against every path one by one is quadratic (a 405B model: 3,288 x 882 comparisons).
        dot = key.find(".")
        while dot != -1:
            if key[dot + 1 :] in targets:
                return True
            dot = key.find(".", dot + 1)
        return False
    return any(key.endswith("." + name) for name in targets)


def excluded(key: str, *, exclude: Targets = (), modules_to_save: Iterable[str] = ()) -> bool:
    """Whether peft never adapts ``key``: excluded, or inside a module it trains in full.

    ``modules_to_save`` names are taken literally here (peft puts them into a
    regular expression unescaped; a name with ``(`` would make peft raise instead).
    """
    if exclude and targets_match(exclude, key):
        return True
    return any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", key) for name in modules_to_save)


def layer_index(key: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer a path sits in as ``layers_to_transform`` reads it: the first numbered segment.

    With ``layers_pattern`` (``"layers"``, ``"h"``), the number right after that
    segment; without, the first number after the second segment.
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def module_targeted(
    key: str,
    targets: Targets,
    *,
    exclude: Targets = (),
    modules_to_save: Iterable[str] = (),
    layers_to_transform: int | Collection[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Whether peft adapts the module at ``key`` (``check_target_module_exists``), ``targets`` expanded."""
    if excluded(key, exclude=exclude, modules_to_save=modules_to_save):
        return False
    if not targets_match(targets, key):
        return False
    using_layers = layers_to_transform is not None and (
        isinstance(layers_to_transform, int) or len(layers_to_transform) > 0
    )
    # peft filters by layer only for list targets, and not for a path given in full.
    if isinstance(targets, str) or key in targets or not using_layers:
        return True
    index = layer_index(key, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in set(layers_to_transform or ())


def expand_targets(inventory: Inventory, targets: Targets) -> Targets:
    """``targets`` with ``"all-linear"`` replaced by the paths it stands for (a set, as peft makes it)."""
    return set(all_linear(inventory)) if is_all_linear(targets) else targets


def targeted_modules(
    inventory: Inventory,
    targets: Targets,
    *,
    exclude: Targets = (),
    modules_to_save: Iterable[str] = (),
    layers_to_transform: int | Collection[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> tuple[str, ...]:
    """Every module path peft's ``target_modules`` selects on this model, in model order.

    Before any per-model rewriting (the MoE re-targeting of
    :func:`peftaudit.memory.targets.lora_adapters`) and whatever the module's
    type: whether LoRA can wrap what was selected is the caller's question.
    """
    expanded = expand_targets(inventory, targets)
    saved = tuple(modules_to_save)
    return tuple(
        m.path
        for m in inventory.modules
        if m.path
        and module_targeted(
            m.path,
            expanded,
            exclude=exclude,
            modules_to_save=saved,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        )
    )


def parameter_targeted(key: str, target_parameters: Iterable[str]) -> bool:
    """Whether ``target_parameters`` names the parameter ``key`` (full name, or its end after a dot)."""
    return any(name_matches(name, key) for name in target_parameters)


def saved(key: str, modules_to_save: Iterable[str]) -> bool:
    """Whether a ``modules_to_save`` name selects the module ``key``: its path ends with the name."""
    return any(key.endswith(name) for name in modules_to_save)


def pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key whose regular expression ends ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def pattern_value(patterns: Mapping[str, int], key: str, default: int) -> int:
    """The value of the first pattern matching ``key`` (:func:`pattern_key`), else ``default``."""
    found = pattern_key(patterns, key)
    return default if found is None else patterns[found]
