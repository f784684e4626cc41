"""Command-line plumbing for recommendations and readiness checks, shared by ``recommend`` and ``report``.

``peftaudit report --checks`` / ``--fail-on`` use :func:`check_resolved`,
:func:`render_findings` and :func:`gate`; ``peftaudit recommend`` uses
:func:`load_model` and the parsers. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftaudit.recommend.findings import FAIL_ON_LEVELS, Finding, counts, reaches
from peftaudit.recommend.render import render_findings
from peftaudit.units import parse_size, parse_tokens

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.inventory import Inventory
    from peftaudit.recommend.facts import ModelFacts
    from peftaudit.sources.base import ResolvedModel, SourceOptions

__all__ = [
    "FAIL_ON_LEVELS",
    "LoadedModel",
    "add_check_arguments",
    "check_resolved",
    "findings_json",
    "gate",
    "load_model",
    "parse_size",
    "parse_tokens",
    "render_findings",
]

EXIT_FINDINGS = 1


@dataclass(frozen=True)
class LoadedModel:
    """A model built on the meta device with what the recommender and checks read from it."""

    resolved: ResolvedModel
    inventory: Inventory
    facts: ModelFacts


def load_resolved(resolved: ResolvedModel, source: Any, options: SourceOptions) -> LoadedModel:
    """Build a resolved model (meta device, no weights) and read its inventory and facts."""
    from peftaudit.inventory import take_inventory
    from peftaudit.recommend.facts import model_facts

    module = source.build(resolved, options)
    return LoadedModel(
        resolved=resolved,
        inventory=take_inventory(module),
        facts=model_facts(module, model_id=resolved.id),
    )


def load_model(spec: str, options: SourceOptions) -> LoadedModel:
    """Resolve ``spec`` (hub id, catalog name, path) and load it."""
    from peftaudit.sources.base import resolve

    resolved, source = resolve(spec, options)
    return load_resolved(resolved, source, options)


def check_resolved(
    resolved: ResolvedModel,
    source: Any,
    options: SourceOptions,
    *,
    task: str = "instruct",
    seq_len: int = 2048,
    skip: Sequence[str] = (),
) -> tuple[Finding, ...]:
    """Model-mode readiness findings for a resolved model (what ``report --checks`` shows)."""
    from peftaudit.recommend.checks import CheckContext, run_checks

    loaded = load_resolved(resolved, source, options)
    ctx = CheckContext(inventory=loaded.inventory, facts=loaded.facts, task=task, seq_len=seq_len)
    return run_checks(ctx, skip=skip)


def gate(findings: Sequence[Finding], fail_on: str) -> tuple[int, str | None]:
    """Exit code for ``--fail-on`` and a one-line reason when it trips (for stderr)."""
    hit = reaches(findings, fail_on)
    if not hit:
        return 0, None
    ids = ", ".join(sorted({f.id for f in hit}))
    return EXIT_FINDINGS, f"{len(hit)} finding(s) at or above {fail_on}: {ids}"


def findings_json(findings: Sequence[Finding]) -> dict[str, Any]:
    """The keys ``report --checks --format json`` adds to the report: counts and findings."""
    return {"finding_counts": counts(findings), "findings": [f.to_dict() for f in findings]}


def add_check_arguments(parser: argparse.ArgumentParser, *, fail_on: bool = True) -> None:
    """``--checks``, ``--skip-check`` (and ``--fail-on`` unless the command has it already)."""
    group = parser.add_argument_group("readiness checks")
    group.add_argument("--checks", action="store_true", help="also run the readiness checks and show their findings")
    group.add_argument(
        "--skip-check",
        action="append",
        default=[],
        metavar="ID",
        help="drop findings with this id or id prefix (repeatable), e.g. vocab.unaligned or tokens",
    )
    if fail_on:
        group.add_argument(
            "--fail-on",
            choices=FAIL_ON_LEVELS,
            default="never",
            help="exit 1 when a finding reaches this severity (for CI; default: never)",
        )
