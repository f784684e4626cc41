"""Every hook a peftaudit plugin can implement.

Plugins implement hooks with ``hookimpl`` and import everything they need from
:mod:`peftaudit.plugin_api`. Hooks that add things to peftaudit receive a
``register`` callable and call it once per item, so a plugin reads as a list
of what it contributes::

    from peftaudit.plugin_api import ArchitectureRule, ModuleRole, hookimpl

    @hookimpl
    def peftaudit_register_architecture_rules(register):
        register(ArchitectureRule(r"\\.wq$", ModuleRole.ATTENTION_Q, model_types=("mymodel",)))

Built-in behaviour is registered through these same hooks (see
``peftaudit.builtin``). Third-party plugins are found through the
``peftaudit`` entry-point group; ``PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD=1`` turns
that off. An implementation of a hook not declared here is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from peftaudit.architecture import ArchitectureRule
    from peftaudit.gpus.catalog import GPU
    from peftaudit.memory.methods import Method
    from peftaudit.recommend.checks import Check
    from peftaudit.recommend.exports import Exporter
    from peftaudit.report.render import Renderer
    from peftaudit.sources.base import ModelSource

hookspec = pluggy.HookspecMarker("peftaudit")


@hookspec
def peftaudit_register_sources(register: Callable[[ModelSource], None]) -> None:
    """Register model sources: objects that turn a user's model argument into a skeleton.

    A source has a ``name``, a ``priority`` (lower is tried first; built-ins use
    100 for local paths, 200 for the bundled catalog, 300 for the hub),
    ``resolve(spec, options)`` returning a :class:`~peftaudit.sources.base.ResolvedModel`
    or ``None`` when the spec is not its kind, and ``build(resolved)`` returning a
    ``torch.nn.Module`` on the meta device. ``resolve`` must not import torch.
    """


@hookspec
def peftaudit_register_architecture_rules(register: Callable[[ArchitectureRule], None]) -> None:
    """Register :class:`~peftaudit.architecture.ArchitectureRule` objects.

    Rules name the role of modules (attention q/k/v/o, MLP gate/up/down,
    experts, router, embeddings, output head, norms, classifier) by a regular
    expression over the module path, optionally limited to some ``model_type``
    values. Rules for a specific model type win over generic rules.
    """


@hookspec
def peftaudit_register_renderers(register: Callable[[Renderer], None]) -> None:
    """Register output formats for ``--format``: objects with a ``name`` and
    ``render(report, options) -> str``. Renderers read a finished report and
    never compute."""


@hookspec
def peftaudit_register_methods(register: Callable[[Method], None]) -> None:
    """Register fine-tuning methods for the memory estimator (``--method NAME``).

    A method has a ``name``, a one-line ``description`` and
    ``adapt(inventory, plan)`` returning a
    :class:`~peftaudit.memory.methods.Adaptation`: which base parameters train,
    which adapters are added (with their shapes), and how frozen weights are
    stored. A plugin's method overrides a built-in method of the same name.
    """


@hookspec
def peftaudit_register_checks(register: Callable[[Check], None]) -> None:
    """Register readiness checks (``peftaudit report --checks``, ``peftaudit recommend``).

    A check has a ``name``, a one-line ``description`` and ``run(ctx)`` yielding
    :class:`~peftaudit.recommend.findings.Finding` objects (stable ``id``,
    ``severity`` info/warning/error, affected modules, a concrete ``fix``) for a
    :class:`~peftaudit.recommend.checks.CheckContext`. ``--fail-on`` gates CI on them.
    """


@hookspec
def peftaudit_register_exporters(register: Callable[[Exporter], None]) -> None:
    """Register config formats for ``peftaudit recommend --export NAME``.

    An exporter has a ``name``, a ``description`` and ``export(recommendation)``
    returning a :class:`~peftaudit.recommend.exports.Export`: the file text,
    the LoRA plan the consumer will actually build from it, and warnings for
    what the format cannot say. A plugin's exporter replaces a built-in of the same name.
    """


@hookspec
def peftaudit_register_gpus(register: Callable[[GPU], None]) -> None:
    """Register accelerators for sizing: :class:`~peftaudit.gpus.catalog.GPU` objects.

    A plugin's GPU replaces a bundled GPU of the same name; the user's GPU file
    (``$PEFTAUDIT_GPUS_FILE``) still overrides both. Set ``origin`` to the
    plugin's name so ``peftaudit gpus`` says where each entry came from.
    """


@hookspec
def peftaudit_register_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add subcommands to the ``peftaudit`` command line (the argparse counterpart of llm's ``register_commands``).

    ``subparsers`` is the CLI's ``add_subparsers()`` object: call
    ``subparsers.add_parser(NAME, help=..., description=...)``, add options,
    and ``parser.set_defaults(run=RUN)`` where ``RUN(args) -> int`` returns the
    exit code (0 ok, 1 findings, 2 bad input). Raise
    :class:`~peftaudit.errors.PeftauditError` for bad input: the CLI prints it
    as one line and exits 2. Built-in commands come first; a name they already
    use is refused. This hook runs for every command line, ``--help`` included,
    so import heavy modules (torch, your model code) inside ``RUN``, not at the
    top of the module that implements the hook.
    """
