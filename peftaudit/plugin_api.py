"""Everything a peftaudit plugin needs, in one place (as ``llm`` re-exports its plugin surface).

A plugin imports from here and from peftaudit's top-level API, nothing else::

    from peftaudit.plugin_api import ArchitectureRule, ModuleRole, hookimpl

    @hookimpl
    def peftaudit_register_architecture_rules(register):
        register(ArchitectureRule(r"\\.wq$", ModuleRole.ATTENTION_Q, model_types=("mymodel",)))

What lives here is the plugin contract: these names keep their meaning across
releases, while the modules that define them may move. Grouped by hook (see
:mod:`peftaudit.hookspecs` and ``docs/plugins.md``):

* every hook: :data:`hookimpl`, the errors (:class:`PeftauditError` and its kinds:
  the CLI prints them as one line and exits 2);
* ``peftaudit_register_sources``: :class:`ModelSource`, :class:`ResolvedModel`,
  :class:`SourceOptions`, and the config helpers :func:`read_config_file`,
  :func:`validate_sizes`, :func:`build_from_config`;
* ``peftaudit_register_architecture_rules``: :class:`ArchitectureRule`, :class:`ModuleRole`;
* ``peftaudit_register_renderers``: :class:`Renderer`, :class:`RenderOptions`, :class:`Report`;
* ``peftaudit_register_methods``: :class:`Method`, :class:`Adaptation`,
  :class:`ModuleAdapter`, :class:`TrainingPlan`, :class:`PlanError`, :class:`Inventory`;
* ``peftaudit_register_checks``: :class:`Check`, :class:`CheckContext`, :func:`check`,
  :class:`Finding`, :class:`Severity`;
* ``peftaudit_register_exporters``: :class:`Exporter`, :class:`Export`,
  :class:`ExportError`, :class:`LoraRecipe`;
* ``peftaudit_register_gpus``: :class:`GPU`, :data:`GIB`;
* ``peftaudit_register_commands``: :class:`ExitCode` (and the errors above);
* a plugin's own memory model, built on the core estimator's rules:
  :func:`memory_methods` (the registered methods by name), :class:`TrainableTensor`
  and :func:`optimizer_memory` (optimizer states and step scratch), :func:`dtype_bytes`
  and :func:`short_dtype`, :func:`take_inventory`, and the fake-tensor trace
  :func:`run_trace` returning a :class:`TraceResult`;
* a plugin's tests (the repository's own test run turns autoload off):
  :func:`register_plugin`, :func:`unregister_plugin`.

Names are imported on first use, so importing this module, which every plugin
does when peftaudit loads it (for ``--help`` too), imports neither torch nor
the subsystems a plugin does not touch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftaudit import hookimpl
from peftaudit._lazy import lazy_attributes

# public name -> (module that defines it, its name there)
_LAZY: dict[str, tuple[str, str]] = {
    # errors
    "PeftauditError": ("peftaudit.errors", "PeftauditError"),
    "ConfigError": ("peftaudit.errors", "ConfigError"),
    "SourceNotFound": ("peftaudit.errors", "SourceNotFound"),
    "PluginError": ("peftaudit.errors", "PluginError"),
    "ExitCode": ("peftaudit.exit_codes", "ExitCode"),
    # model sources
    "ModelSource": ("peftaudit.sources.base", "ModelSource"),
    "ResolvedModel": ("peftaudit.sources.base", "ResolvedModel"),
    "SourceOptions": ("peftaudit.sources.base", "SourceOptions"),
    "build_from_config": ("peftaudit.sources.build", "build_from_config"),
    "read_config_file": ("peftaudit.sources.build", "read_config_file"),
    "validate_sizes": ("peftaudit.sources.build", "validate_sizes"),
    # architecture rules
    "ArchitectureRule": ("peftaudit.architecture", "ArchitectureRule"),
    "ModuleRole": ("peftaudit.architecture", "ModuleRole"),
    # renderers
    "Renderer": ("peftaudit.report.render", "Renderer"),
    "RenderOptions": ("peftaudit.report.render", "RenderOptions"),
    "Report": ("peftaudit.report", "Report"),
    # methods and the memory model
    "Method": ("peftaudit.memory.methods", "Method"),
    "Adaptation": ("peftaudit.memory.methods", "Adaptation"),
    "ModuleAdapter": ("peftaudit.memory.targets", "ModuleAdapter"),
    "TrainingPlan": ("peftaudit.memory.plan", "TrainingPlan"),
    "PlanError": ("peftaudit.memory.plan", "PlanError"),
    "Inventory": ("peftaudit.inventory", "Inventory"),
    "take_inventory": ("peftaudit.inventory", "take_inventory"),
    "memory_methods": ("peftaudit.plugins", "memory_methods"),
    "TrainableTensor": ("peftaudit.memory.optimizers", "TrainableTensor"),
    "optimizer_memory": ("peftaudit.memory.optimizers", "optimizer_memory"),
    "dtype_bytes": ("peftaudit.memory.dtypes", "nbytes"),
    "short_dtype": ("peftaudit.memory.dtypes", "short"),
    "run_trace": ("peftaudit.memory.tracing.run", "run_trace"),
    "TraceResult": ("peftaudit.memory.tracing.run", "TraceResult"),
    # readiness checks
    "Check": ("peftaudit.recommend.checks", "Check"),
    "CheckContext": ("peftaudit.recommend.checks", "CheckContext"),
    "check": ("peftaudit.recommend.checks", "check"),
    "Finding": ("peftaudit.recommend.findings", "Finding"),
    "Severity": ("peftaudit.severity", "Severity"),
    # exporters
    "Exporter": ("peftaudit.recommend.exports", "Exporter"),
    "Export": ("peftaudit.recommend.exports", "Export"),
    "ExportError": ("peftaudit.recommend.exports", "ExportError"),
    "LoraRecipe": ("peftaudit.recommend.recipe", "LoraRecipe"),
    # GPUs
    "GPU": ("peftaudit.gpus.catalog", "GPU"),
    "GIB": ("peftaudit.units", "GIB"),
    # a plugin's tests
    "register_plugin": ("peftaudit.plugins", "register_plugin"),
    "unregister_plugin": ("peftaudit.plugins", "unregister_plugin"),
}

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.architecture import ArchitectureRule, ModuleRole
    from peftaudit.errors import ConfigError, PeftauditError, PluginError, SourceNotFound
    from peftaudit.exit_codes import ExitCode
    from peftaudit.gpus.catalog import GPU
    from peftaudit.inventory import Inventory, take_inventory
    from peftaudit.memory.dtypes import nbytes as dtype_bytes
    from peftaudit.memory.dtypes import short as short_dtype
    from peftaudit.memory.methods import Adaptation, Method
    from peftaudit.memory.optimizers import TrainableTensor, optimizer_memory
    from peftaudit.memory.plan import PlanError, TrainingPlan
    from peftaudit.memory.targets import ModuleAdapter
    from peftaudit.memory.tracing.run import TraceResult, run_trace
    from peftaudit.plugins import memory_methods, register_plugin, unregister_plugin
    from peftaudit.recommend.checks import Check, CheckContext, check
    from peftaudit.recommend.exports import Export, Exporter, ExportError
    from peftaudit.recommend.findings import Finding
    from peftaudit.recommend.recipe import LoraRecipe
    from peftaudit.report import Report
    from peftaudit.report.render import Renderer, RenderOptions
    from peftaudit.severity import Severity
    from peftaudit.sources.base import ModelSource, ResolvedModel, SourceOptions
    from peftaudit.sources.build import build_from_config, read_config_file, validate_sizes
    from peftaudit.units import GIB

__all__ = [
    "GIB",
    "GPU",
    "Adaptation",
    "ArchitectureRule",
    "Check",
    "CheckContext",
    "ConfigError",
    "ExitCode",
    "Export",
    "ExportError",
    "Exporter",
    "Finding",
    "Inventory",
    "LoraRecipe",
    "Method",
    "ModelSource",
    "ModuleAdapter",
    "ModuleRole",
    "PeftauditError",
    "PlanError",
    "PluginError",
    "RenderOptions",
    "Renderer",
    "Report",
    "ResolvedModel",
    "Severity",
    "SourceNotFound",
    "SourceOptions",
    "TraceResult",
    "TrainableTensor",
    "TrainingPlan",
    "build_from_config",
    "check",
    "dtype_bytes",
    "hookimpl",
    "memory_methods",
    "optimizer_memory",
    "read_config_file",
    "register_plugin",
    "run_trace",
    "short_dtype",
    "take_inventory",
    "unregister_plugin",
    "validate_sizes",
]


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)
