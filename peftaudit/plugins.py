"""The plugin manager: built-in plugins first, then the ``peftaudit`` entry points.

What plugins register (sources, rules, renderers, methods, checks, exporters,
GPUs) is collected once per process; :func:`register_plugin` and :func:`reset`
clear the collections.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from peftaudit import hookspecs
from peftaudit.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.architecture import ArchitectureRules
    from peftaudit.gpus.catalog import GPU
    from peftaudit.memory.methods import Method
    from peftaudit.recommend.checks import Check
    from peftaudit.recommend.exports import Exporter
    from peftaudit.render import Renderer
    from peftaudit.sources.base import ModelSource

#: Modules under ``peftaudit.builtin`` registered like any plugin, in this order.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "peftaudit.builtin.sources",
    "peftaudit.builtin.architectures",
    "peftaudit.builtin.renderers",
    "peftaudit.builtin.methods",
    "peftaudit.builtin.checks",
    "peftaudit.builtin.exporters",
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


def _collect(hook_name: str) -> list[Any]:
    """Call a ``register``-style hook and return what the plugins registered.

    pluggy calls the most recently registered plugin first, so third-party
    registrations come before the built-ins they may override.
    """
    items: list[Any] = []
    hook: Callable[..., Any] = getattr(get_plugin_manager().hook, hook_name)
    hook(register=items.append)
    return items


@functools.cache
def sources() -> tuple[ModelSource, ...]:
    """Registered model sources, lowest ``priority`` first (stable for equal priorities)."""
    found = _collect("peftaudit_register_sources")
    return tuple(sorted(found, key=lambda s: getattr(s, "priority", 500)))


@functools.cache
def architecture_rules() -> ArchitectureRules:
    """All registered architecture rules."""
    from peftaudit.architecture import ArchitectureRules

    return ArchitectureRules.from_rules(_collect("peftaudit_register_architecture_rules"))


@functools.cache
def renderers() -> dict[str, Renderer]:
    """Registered renderers by name; a plugin's renderer overrides a built-in of the same name."""
    return {r.name: r for r in reversed(_collect("peftaudit_register_renderers"))}


@functools.cache
def memory_methods() -> dict[str, Method]:
    """Registered fine-tuning methods by name; a plugin's method overrides a built-in of the same name."""
    return {m.name: m for m in reversed(_collect("peftaudit_register_methods"))}


@functools.cache
def checks() -> tuple[Check, ...]:
    """Registered readiness checks: built-ins first, then plugins' in registration order."""
    return tuple(reversed(_collect("peftaudit_register_checks")))


@functools.cache
def exporters() -> dict[str, Exporter]:
    """Registered config exporters by name; a plugin's exporter overrides a built-in of the same name."""
    return {e.name: e for e in reversed(_collect("peftaudit_register_exporters"))}


@functools.cache
def gpus_from_plugins() -> tuple[GPU, ...]:
    """GPUs registered by plugins, in registration order (a later one of the same name wins in the catalog)."""
    return tuple(reversed(_collect("peftaudit_register_gpus")))


def _clear_collections() -> None:
    sources.cache_clear()
    gpus_from_plugins.cache_clear()
    catalog = sys.modules.get("peftaudit.gpus.catalog")  # only if loaded: importing it here would be wasted work
    if catalog is not None:
        catalog.reset()  # the GPU catalog caches what gpus_from_plugins() returned
    architecture_rules.cache_clear()
    renderers.cache_clear()
    memory_methods.cache_clear()
    checks.cache_clear()
    exporters.cache_clear()


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
