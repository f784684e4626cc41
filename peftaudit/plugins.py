"""The plugin manager: built-in plugins first, then the ``peftaudit`` entry points.

What plugins register (sources, rules, renderers, methods, checks, exporters,
GPUs) is collected once per process. Each collection is a function marked
:func:`collection`; :func:`register_plugin`, :func:`unregister_plugin` and
:func:`reset` clear every one of them, so a new hook's collection is one
decorated function and nothing else to edit.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from peftaudit import hookspecs
from peftaudit.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from peftaudit.architecture import ArchitectureRules
    from peftaudit.gpus.catalog import GPU
    from peftaudit.memory.methods import Method
    from peftaudit.recommend.checks import Check
    from peftaudit.recommend.exports import Exporter
    from peftaudit.report.render import Renderer
    from peftaudit.sources.base import ModelSource

T = TypeVar("T")

#: Modules under ``peftaudit.builtin`` registered like any plugin, in this order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "peftaudit.builtin.sources",
    "peftaudit.builtin.architectures",
    "peftaudit.builtin.renderers",
    "peftaudit.builtin.methods",
    "peftaudit.builtin.checks",
    "peftaudit.builtin.exporters",
    "peftaudit.builtin.gpus",
)

ENTRY_POINT_GROUP = "peftaudit"
DISABLE_AUTOLOAD_ENV = "PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD"


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager with built-ins and (unless disabled) entry points."""
    pm = pluggy.PluginManager("peftaudit")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if not _autoload_disabled():
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must not be a traceback
            raise PluginError(f"could not load a '{ENTRY_POINT_GROUP}' plugin: {exc}") from exc
    _check(pm)
    return pm


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (module or instance) at run time, e.g. in tests."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    _check(pm)
    _clear_collections()


def unregister_plugin(plugin: object) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    get_plugin_manager().unregister(plugin)
    _clear_collections()


def reset() -> None:
    """Forget the plugin manager and everything collected from it."""
    get_plugin_manager.cache_clear()
    _clear_collections()


def _check(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --- collections ------------------------------------------------------------------------------------

#: ``cache_clear`` of every :func:`collection`, called whenever the registered plugins change.
_COLLECTIONS: list[Callable[[], None]] = []


def collection(func: Callable[[], T]) -> functools._lru_cache_wrapper[T]:
    """Cache what ``func`` builds from the registered plugins until they change.

    Anything derived from the plugins (here, or the GPU catalog) is marked with
    this decorator, so registering or removing a plugin refreshes it.
    """
    cached = functools.cache(func)
    _COLLECTIONS.append(cached.cache_clear)
    return cached


def _clear_collections() -> None:
    for clear in _COLLECTIONS:
        clear()


def registered(hook_name: str, *, later_plugins_first: bool = False) -> tuple[Any, ...]:
    """What plugins registered through a ``register``-style hook.

    Plugins come in registration order (built-ins first, then entry points,
    then :func:`register_plugin`), so in a by-name table a plugin's entry
    replaces a built-in's; ``later_plugins_first`` reverses that for
    first-match-wins lists (sources, architecture rules). Each plugin's items
    keep the order it registered them in.
    """
    caller: Any = getattr(get_plugin_manager().hook, hook_name)
    groups: list[list[Any]] = []
    for impl in caller.get_hookimpls():  # registration order (pluggy calls them last-first)
        items: list[Any] = []
        impl.function(**{name: items.append for name in impl.argnames})  # argnames: ("register",) or ()
        groups.append(items)
    if later_plugins_first:
        groups.reverse()
    return tuple(item for items in groups for item in items)


@collection
def sources() -> tuple[ModelSource, ...]:
    """Registered model sources, lowest ``priority`` first (a later plugin's first among equal priorities)."""
    found = registered("peftaudit_register_sources", later_plugins_first=True)
    return tuple(sorted(found, key=lambda s: getattr(s, "priority", 500)))


@collection
def architecture_rules() -> ArchitectureRules:
    """All registered architecture rules."""
    from peftaudit.architecture import ArchitectureRules

    return ArchitectureRules.from_rules(registered("peftaudit_register_architecture_rules", later_plugins_first=True))


@collection
def renderers() -> dict[str, Renderer]:
    """Registered renderers by name; a plugin's renderer overrides a built-in of the same name."""
    return {r.name: r for r in registered("peftaudit_register_renderers")}


@collection
def memory_methods() -> dict[str, Method]:
    """Registered fine-tuning methods by name; a plugin's method overrides a built-in of the same name."""
    return {m.name: m for m in registered("peftaudit_register_methods")}


@collection
def checks() -> tuple[Check, ...]:
    """Registered readiness checks: built-ins first, then plugins' in registration order."""
    return registered("peftaudit_register_checks")


@collection
def exporters() -> dict[str, Exporter]:
    """Registered config exporters by name; a plugin's exporter overrides a built-in of the same name."""
    return {e.name: e for e in registered("peftaudit_register_exporters")}


@collection
def gpus() -> tuple[GPU, ...]:
    """Registered GPUs, bundled first, then plugins' (a later one of the same name wins in the catalog)."""
    return registered("peftaudit_register_gpus")


#: The hooks whose contributions change what is cached about a model (its inventory, through the sources
#: and rules) or its report (the memory table at a glance and the recommendation: methods, checks, GPUs).
FINGERPRINTED_HOOKS: frozenset[str] = frozenset(
    {
        "peftaudit_register_sources",
        "peftaudit_register_architecture_rules",
        "peftaudit_register_methods",
        "peftaudit_register_checks",
        "peftaudit_register_gpus",
    }
)


@collection
def fingerprint() -> str:
    """A short stable hash of what the registered plugins contribute to cached models and reports.

    The architecture rules in full (data, and in order, since the first match wins), and for every
    plugin that is not built in and registers sources, rules, methods, checks or GPUs, its name and
    version (its distribution's, else its module's ``__version__``). :mod:`peftaudit.cache` puts it
    in its keys, so installing, removing or upgrading such a plugin is a miss. A plugin registered at
    run time without a version is known by its name only: changing its methods under the same name
    is not noticed (clear the cache, or pass ``--no-cache``).
    """
    import hashlib

    pm = get_plugin_manager()
    versions = {id(p): f"{dist.project_name} {dist.version}" for p, dist in pm.list_plugin_distinfo()}
    contributors = []
    for name, plugin in pm.list_name_plugin():
        if name in DEFAULT_PLUGINS:
            continue
        hooks = {h.name for h in pm.get_hookcallers(plugin) or []}
        if hooks & FINGERPRINTED_HOOKS:
            version = versions.get(id(plugin)) or str(getattr(plugin, "__version__", ""))
            contributors.append(f"{name}={version}")
    payload = repr(architecture_rules()) + "\n" + "\n".join(sorted(contributors))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- commands ---------------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Let plugins add subcommands (``peftaudit_register_commands``) after the built-in ones.

    Called for every command line, ``--help`` included, so it stays cheap: the
    built-in plugins import their implementations only when their hooks run.
    A plugin that cannot be loaded adds no command here; the first command that
    needs plugins then says why in one line, as before there were plugin
    commands. A plugin whose hook raises loses its commands with a one-line note.
    """
    try:
        pm = get_plugin_manager()
    except PluginError:
        return
    try:
        pm.hook.peftaudit_register_commands(subparsers=subparsers)
    except Exception as exc:  # a plugin's bug must not take the built-in commands down
        if os.environ.get("PEFTAUDIT_DEBUG"):
            raise
        sys.stderr.write(f"peftaudit: note: a plugin could not add its commands: {type(exc).__name__}: {exc}\n")


# --- describing ------------------------------------------------------------------------------------


def describe() -> list[tuple[str, list[str]]]:
    """Each loaded plugin's name with the hooks it implements (for ``peftaudit plugins``)."""
    pm = get_plugin_manager()
    rows: list[tuple[str, list[str]]] = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = _distribution(pm, plugin)
        rows.append((f"{name} ({dist})" if dist else name, hooks))
    return rows


def _distribution(pm: pluggy.PluginManager, plugin: object) -> str | None:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.project_name} {dist.version}"
    return None
