"""Caches of finished reports and of built models, so a repeat answer skips torch.

Two kinds of entry, both keyed by the exact config, the source, the versions of
peftaudit and of the libraries its figures depend on (transformers, torch, and
peft and bitsandbytes, which the memory estimates model; read from package
metadata, not by importing them), the build options, the registered plugins
that contribute sources, architecture rules, methods, checks or GPUs
(:func:`peftaudit.plugins.fingerprint`) and, for a model with its own code
(``auto_map``), the repository's ``*.py`` files:

* **reports** (``<dir>/<key>.json``): one entry serves the default report and
  ``--params-only``: it holds the default report's memory table and
  recommendation once one was asked for (:func:`peftaudit.report.report_for`);
* **models** (``<dir>/models/<key>.json``): the model's
  :class:`~peftaudit.inventory.Inventory` and
  :class:`~peftaudit.recommend.facts.ModelFacts`, everything the estimator, the
  recommender, the readiness checks and the sizing searches read about a model,
  so ``report --compare``, ``gpus``, ``fit``, ``plan`` and ``recommend`` on a
  model seen before never build it (:func:`peftaudit.sources.load.load_resolved`).

Entries are JSON written atomically; an entry that cannot be read back (truncated,
``null``, the wrong shape, an older format) is a miss, rebuilt and overwritten. A
model whose inventory would not read back exactly is not stored at all.
``PEFTAUDIT_CACHE_DIR`` moves the caches; ``PEFTAUDIT_NO_CACHE=1`` (or a command's
``--no-cache``) turns both off: nothing is read or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from peftaudit._version import __version__
from peftaudit.render.json import dumps

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.recommend.facts import ModelFacts
    from peftaudit.report import Report
    from peftaudit.sources.base import ResolvedModel, SourceOptions


#: Bumped whenever what a report holds changes between releases (2: the towers of vision-language
#: models), so a report cached by an earlier build is rebuilt rather than shown without them.
REPORT_FORMAT = 2
#: Bumped whenever what a model entry holds (:meth:`Inventory.to_dict`, :meth:`ModelFacts.to_dict`) or what
#: :func:`~peftaudit.inventory.take_inventory` records in it changes between releases.
MODEL_FORMAT = 1


T = TypeVar("T")


def cache_dir() -> Path:
    """Where reports are cached (``PEFTAUDIT_CACHE_DIR``)."""
    return _folder("PEFTAUDIT_CACHE_DIR", "reports")


def models_dir() -> Path:
    """Where built models are cached: a folder inside :func:`cache_dir`, so moving one moves both."""
    return cache_dir() / "models"


def profiles_dir() -> Path:
    """Where derived step profiles are stored (``PEFTAUDIT_PROFILE_DIR``, :mod:`peftaudit.memory.derived.store`)."""
    return _folder("PEFTAUDIT_PROFILE_DIR", "profiles")


def _folder(variable: str, name: str) -> Path:
    explicit = os.environ.get(variable)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftaudit" / name


def enabled() -> bool:
    return os.environ.get("PEFTAUDIT_NO_CACHE", "").strip().lower() in ("", "0", "false", "no")


def key_for(resolved: ResolvedModel, options: SourceOptions) -> str | None:
    """The cache key for this model and options, or ``None`` when caching is off."""
    if not enabled():
        return None
    from peftaudit import plugins

    return resolved.fingerprint(
        f"peftaudit={__version__}",
        f"report_format={REPORT_FORMAT}",
        f"transformers={installed_version('transformers')}",
        f"torch={installed_version('torch')}",
        # The memory table at a glance models the installed peft and bitsandbytes (memory.stack.installed).
        f"peft={installed_version('peft')}",
        f"bitsandbytes={installed_version('bitsandbytes')}",
        f"trust_remote_code={options.trust_remote_code}",
        f"id={resolved.id}",
        f"origin={resolved.origin}",
        f"notes={'|'.join(resolved.notes)}",
        f"plugins={plugins.fingerprint()}",
        f"code={_code_fingerprint(resolved)}",
    )


def model_key(resolved: ResolvedModel, options: SourceOptions) -> str | None:
    """The model cache's key for this model and options, or ``None`` when caching is off."""
    report_key = key_for(resolved, options)
    if report_key is None:
        return None
    return resolved.fingerprint(f"report_key={report_key}", f"model_format={MODEL_FORMAT}", _record_fields())


def _record_fields() -> str:
    """The fields of every record a model entry holds: a record that gains or loses one is a miss
    even where :data:`MODEL_FORMAT` was not bumped (it still must be when a field's meaning changes)."""
    from dataclasses import fields

    from peftaudit import inventory
    from peftaudit.recommend.facts import ModelFacts

    classes = (
        inventory.Inventory,
        inventory.ParameterRecord,
        inventory.BufferRecord,
        inventory.ModuleRecord,
        inventory.TiedGroup,
        inventory.ModelDims,
        inventory.MoeInfo,
        ModelFacts,
    )
    return "fields=" + ";".join(f"{c.__name__}:{','.join(f.name for f in fields(c))}" for c in classes)


def _code_fingerprint(resolved: ResolvedModel) -> str:
    """A hash of the ``*.py`` files beside a config that names its own code (``auto_map``), else ``none``.

    Remote code runs only from the config's folder (:mod:`peftaudit.sources.build`), so an edit there
    is a miss. A config without ``auto_map``, or without a folder (its code cannot run), runs none.
    """
    if not resolved.config.get("auto_map") or not resolved.local_dir:
        return "none"
    import hashlib

    digest = hashlib.sha256()
    try:
        for path in sorted(Path(resolved.local_dir).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return "unreadable"  # the build then fails or runs what it can read; nothing gets cached twice
    return digest.hexdigest()[:16]


def load(key: str) -> Report | None:
    """The cached report for ``key``, or ``None`` if absent or unreadable."""
    from peftaudit.report import SCHEMA_VERSION, Report

    return _read_entry(cache_dir() / f"{key}.json", ("schema_version", SCHEMA_VERSION), Report.from_dict)


def _read_entry(path: Path, version: tuple[str, int], read: Callable[[dict[str, Any]], T]) -> T | None:
    """What ``read`` makes of the JSON object at ``path``, or ``None`` when there is none to read back:
    absent, unreadable, not an object, or written by another format (``version``: its field and value)."""
    if not path.is_file():  # absent, or a FIFO or device that reading could block on
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get(version[0]) != version[1]:
            return None
        return read(data)
    except Exception:  # any entry we cannot read back is a miss, rebuilt and overwritten
        # A truncated file, ``null``, ``[]``, a field of the wrong type: the caches only save
        # time, so nothing in them may turn a good answer into an error.
        return None


def store(key: str, report: Report) -> None:
    """Write the report atomically; a cache that cannot be written is skipped silently."""
    from peftaudit.errors import PeftauditError
    from peftaudit.files import write_atomic

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{key}.json", dumps(report.to_dict(), compact=True))
    except (OSError, PeftauditError):
        pass  # a cache that cannot be written is skipped: the report itself is unaffected


def load_model(key: str) -> tuple[Inventory, ModelFacts] | None:
    """The cached inventory and facts for ``key``, or ``None`` if absent, unreadable or of another format."""
    return _read_entry(models_dir() / f"{key}.json", ("format", MODEL_FORMAT), _read_model)


def store_model(key: str, inventory: Inventory, facts: ModelFacts) -> bool:
    """Write the model's entry atomically; ``False`` when it was not written.

    An entry is written only when it reads back exactly: the records equal, and the config
    (with the facts) writing the same JSON text as the live one, which is also what keys the
    derived step profiles (:mod:`peftaudit.memory.derived.store`). A config holding values JSON
    cannot (an object of a custom class) is not cached. A cache that cannot be written is skipped.
    """
    from peftaudit.errors import PeftauditError
    from peftaudit.files import write_atomic

    try:
        text = _model_entry(inventory, facts)
        if not _reads_back(text, inventory, facts):
            return False
    except Exception:  # a value JSON cannot hold, keys that cannot be sorted, ...: not cached
        return False
    folder = models_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{key}.json", text)
    except (OSError, PeftauditError):
        return False  # a cache that cannot be written is skipped: the answer itself is unaffected
    return True


def _model_entry(inventory: Inventory, facts: ModelFacts) -> str:
    inventory_data = inventory.to_dict()
    for name in ("config", "quantization_config"):
        inventory_data[name] = _keyed(inventory_data[name])
    facts_data = facts.to_dict()
    if canonical_json(facts.config) == canonical_json(dict(inventory.config or {})):
        del facts_data["config"]  # read back from the inventory's
    else:
        facts_data["config"] = _keyed(facts_data["config"])
    entry = {"format": MODEL_FORMAT, "inventory": inventory_data, "facts": facts_data}
    return dumps(entry, compact=True)


def _read_model(data: dict[str, Any]) -> tuple[Inventory, ModelFacts]:
    from peftaudit.inventory import Inventory
    from peftaudit.recommend.facts import ModelFacts

    inventory_data = dict(data["inventory"])
    for name in ("config", "quantization_config"):
        inventory_data[name] = _unkeyed(inventory_data[name])
    inventory = Inventory.from_dict(inventory_data)
    facts = data["facts"]
    # The facts' config is the inventory's unless they differ: stored once.
    config = _unkeyed(facts["config"]) if "config" in facts else dict(inventory.config or {})
    return inventory, ModelFacts.from_dict({**facts, "config": config})


def _reads_back(text: str, inventory: Inventory, facts: ModelFacts) -> bool:
    """Whether ``text`` is read back as exactly this inventory and these facts."""
    import dataclasses

    back, back_facts = _read_model(json.loads(text))
    return (
        back == inventory
        and back.supports_gradient_checkpointing == inventory.supports_gradient_checkpointing
        and canonical_json(back.config) == canonical_json(inventory.config)
        and canonical_json(back.quantization_config) == canonical_json(inventory.quantization_config)
        and dataclasses.replace(back_facts, config={}) == dataclasses.replace(facts, config={})
        and canonical_json(back_facts.config) == canonical_json(facts.config)
    )


#: Marks a mapping whose keys JSON cannot keep (``id2label``'s integers) as a list of pairs.
_KEYED = "__peftaudit_pairs__"


def _keyed(value: Any) -> Any:
    """``value`` with every mapping that has a key other than a string written as key-value pairs.

    JSON turns ``{0: "cat"}`` into ``{"0": "cat"}``, and sorted, ``{"10": ...}`` then comes before
    ``{"2": ...}``: what keys a derived profile would change. The pairs keep the keys as they were.
    """
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: _keyed(v) for k, v in value.items()}
        return {_KEYED: [[k, _keyed(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_keyed(v) for v in value]
    return value


def _unkeyed(value: Any) -> Any:
    """What :func:`_keyed` wrote, read back."""
    if isinstance(value, dict):
        if set(value) == {_KEYED}:
            return {k: _unkeyed(v) for k, v in value[_KEYED]}
        return {k: _unkeyed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unkeyed(v) for v in value]
    return value


def canonical_json(value: object) -> str:
    """``value`` as one JSON text whatever the order of its keys: what a key is hashed from (never shown).

    The derived step profiles' store keys a config by it, so a model read back from this cache must
    give the same text as the live one (:func:`store_model` checks).
    """
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def installed_version(dist: str) -> str:
    """The installed version of a distribution, read from its metadata (no import), or ``absent``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"
