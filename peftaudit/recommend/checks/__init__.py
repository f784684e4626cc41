"""Readiness checks: plugins that read a :class:`CheckContext` and yield findings.

A check is any object with a ``name``, a ``description`` and
``run(ctx) -> Iterable[Finding]``, registered through the
``peftaudit_register_checks`` hook. This package holds the protocol and the
built-in checks, one module per concern (:mod:`.target_names`, :mod:`.lora`,
:mod:`.experts`, :mod:`.tokens`, :mod:`.model_class`, :mod:`.vocabulary`);
:mod:`peftaudit.builtin.checks` registers them the way a third-party plugin
registers its own. Every finding id is stable: CI configs (``--fail-on``) and
``--skip`` lists name them. Each check says what breaks or wastes memory,
which modules, and the change that fixes it.

Checks run in one of two modes:

* **model mode** (``ctx.targets is None``, ``peftaudit report --checks``): what
  will bite whatever the targets, and what the configs people usually write
  (``target_modules="all-linear"``) would do to this model;
* **plan mode** (``ctx.targets`` set, ``peftaudit recommend``): what will bite
  this exact set of targets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from peftaudit.recommend.findings import Finding, sort_findings

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.recommend.facts import ModelFacts
    from peftaudit.recommend.targets import AdapterCount, TargetSpec


@dataclass(frozen=True)
class CheckContext:
    """Everything a check may read: the model, its facts, and the planned training (if any)."""

    inventory: Inventory
    facts: ModelFacts
    targets: TargetSpec | None = None
    """The planned targets; ``None`` checks the model alone (model mode)."""
    task: str = "instruct"
    added_tokens: int = 0
    """Tokens the user adds to the tokenizer (new rows in the embedding and head)."""
    dropout: float = 0.0
    seq_len: int = 2048
    rank: int = 16

    @functools.cached_property
    def planned(self) -> TargetSpec:
        """The targets to check: the plan's, or peft's literal ``"all-linear"`` in model mode."""
        from peftaudit.recommend.targets import TargetSpec

        return self.targets if self.targets is not None else TargetSpec(pattern="all-linear")

    @functools.cached_property
    def peft_result(self) -> AdapterCount | str:
        """What peft creates for :attr:`planned`, or the error message peft would raise."""
        from peftaudit.recommend.targets import TargetError, count_adapters

        try:
            return count_adapters(self.inventory, self.planned, self.rank, dropout=self.dropout)
        except TargetError as exc:
            return str(exc)

    @property
    def adapted(self) -> AdapterCount | None:
        """What peft creates for :attr:`planned`, or ``None`` where peft would raise."""
        result = self.peft_result
        return None if isinstance(result, str) else result


@runtime_checkable
class Check(Protocol):
    """A readiness check, registered through ``peftaudit_register_checks``.

    ``name`` and ``description`` are read-only here, so a frozen dataclass or
    plain class attributes satisfy the protocol.
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        """Yield findings for this context (none when all is well)."""
        ...


@dataclass(frozen=True)
class FunctionCheck:
    """A check made from a function; see :func:`check`."""

    name: str
    description: str
    func: Callable[[CheckContext], Iterable[Finding]]

    def run(self, ctx: CheckContext) -> Iterable[Finding]:
        return self.func(ctx)


def check(name: str, description: str) -> Callable[[Callable[[CheckContext], Iterable[Finding]]], FunctionCheck]:
    """Decorator turning ``def f(ctx) -> Iterable[Finding]`` into a registrable check."""

    def wrap(func: Callable[[CheckContext], Iterable[Finding]]) -> FunctionCheck:
        return FunctionCheck(name=name, description=description, func=func)

    return wrap


def run_checks(
    ctx: CheckContext,
    checks: Sequence[Any] | None = None,
    *,
    skip: Sequence[str] = (),
) -> tuple[Finding, ...]:
    """Run ``checks`` (default: every registered check) and return their findings, most severe first.

    ``skip`` drops findings whose id equals or starts with one of its entries
    (``moe`` skips every ``moe.*`` finding). A check that raises becomes a
    ``check.failed`` warning naming it, so one broken plugin cannot hide the rest.
    """
    if checks is None:
        from peftaudit.plugins import checks as registered

        checks = registered()
    findings: list[Finding] = []
    for item in checks:
        try:
            findings.extend(item.run(ctx))
        except Exception as exc:  # a plugin's bug must not take the other checks down
            findings.append(
                Finding(
                    id="check.failed",
                    severity="warning",
                    title=f"check '{getattr(item, 'name', item)}' failed: {type(exc).__name__}: {exc}",
                    fix="report it to the check's author; the other checks ran",
                )
            )
    kept = [f for f in findings if not any(f.id == s or f.id.startswith(s + ".") for s in skip)]
    return sort_findings(kept)
