"""The report's data: what ``peftaudit report`` prints, ``--format json`` writes and ``audit()`` returns.

A :class:`Report` is plain data computed once from an
:class:`~peftaudit.inventory.Inventory` (:mod:`peftaudit.report.build`);
renderers only read it. ``to_dict()`` is exactly the JSON the CLI prints and
:meth:`Report.from_dict` reads it back, which is how a cached report is
answered without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from peftaudit._version import __version__
from peftaudit.towers import Tower

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.memory.result import MemoryEstimate
    from peftaudit.recommend.findings import Finding
    from peftaudit.report.glance import Glance

#: Bumped only for incompatible changes to the JSON; new fields may appear in any version.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """Which model this is and where its config came from."""

    id: str
    architecture: str
    model_type: str | None
    source: str
    """``catalog``, ``hub``, ``local``, ``module`` (a live model) or a plugin source's name."""
    origin: str
    revision: str | None = None
    dtype: str | None = None
    """The dtype most parameters have (what the config asks for on the meta device)."""
    published_params: dict[str, Any] | None = None


@dataclass(frozen=True)
class ParamTotals:
    """Parameter counts; tied parameters once, buffers apart from ``total``."""

    total: int
    weights: int
    biases: int
    buffers: int
    trainable: int
    frozen: int
    tied: int
    """Elements reachable under more than one name (counted once in ``total``)."""
    quantized: int
    """Elements held by bitsandbytes quantized parameters (true count)."""
    active: int | None = None
    """MoE models: parameters one token uses."""
    bytes: int = 0
    """Bytes the parameters take at their dtypes (quantized ones at their packed size)."""


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table: a module, or a run of identical repeated blocks.

    ``weights`` and ``biases`` are totals for the row (all ``repeat`` blocks), so
    rows sum to the report's totals; per-block counts divide by ``repeat``.
    """

    name: str
    type: str
    weights: int
    biases: int
    trainable: int
    repeat: int = 1
    tied_to: str | None = None
    """For a module whose tensor is another's (``lm_head`` -> ``embed_tokens``)."""

    @property
    def params(self) -> int:
        return self.weights + self.biases

    @property
    def per_block(self) -> int:
        return self.params // self.repeat


@dataclass(frozen=True)
class TiedInfo:
    names: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class MoeSummary:
    num_experts: int
    experts_per_token: int
    expert_params: int
    active_params: int


@dataclass(frozen=True)
class PublishedCheck:
    """The published total for this model next to ours."""

    value: int | str
    """An exact count, or the rounded figure as the source prints it (``"7.61B"``)."""
    source: str
    matches: bool
    """Exact equality for counts; agreement to the printed digits for rounded figures."""


@dataclass(frozen=True)
class TreeNode:
    """A module in the tree; identical repeated children are collapsed into one node."""

    name: str
    type: str
    params: int
    """Parameters in this subtree, per copy."""
    repeat: int = 1
    children: tuple[TreeNode, ...] = ()


@dataclass(frozen=True)
class Report:
    """Everything ``peftaudit report`` knows about one model."""

    model: ModelInfo
    params: ParamTotals
    by_kind: dict[str, int]
    by_module_type: dict[str, int]
    layers: tuple[LayerRow, ...]
    tied: tuple[TiedInfo, ...]
    moe: MoeSummary | None
    dims: dict[str, Any]
    tree: TreeNode | None
    published: PublishedCheck | None = None
    notes: tuple[str, ...] = field(default=())
    estimates: tuple[MemoryEstimate, ...] = ()
    """Memory estimates for the training plans asked for (``--method``, ``--compare``), if any."""
    findings: tuple[Finding, ...] = ()
    """Readiness findings (``--checks``), if asked for."""
    towers: tuple[Tower, ...] = ()
    """Vision-language models: parameters per tower, adding up to the total; empty for other models
    (and then absent from the JSON, so text-only reports read as before)."""
    glance: Glance | None = None
    """The default report's memory table and recommendation (:mod:`peftaudit.report.glance`); ``None`` with
    ``--params-only``, with ``--method``/``--compare``, and from :func:`~peftaudit.report.audit`."""
    schema_version: int = SCHEMA_VERSION
    peftaudit_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; exactly what ``--format json`` prints."""
        data = asdict(replace(self, estimates=(), findings=(), glance=None))
        data["estimates"] = [e.to_dict() for e in self.estimates]
        data["findings"] = [f.to_dict() for f in self.findings]
        del data["glance"]  # written as three top-level fields, null when not computed
        glance = self.glance
        data["memory_at_a_glance"] = glance.memory.to_dict() if glance else None
        data["recommendation"] = glance.recommendation.to_dict() if glance else None
        data["serving_at_a_glance"] = glance.serving.to_dict() if glance and glance.serving else None
        ordered = {"schema_version": data.pop("schema_version"), "peftaudit_version": data.pop("peftaudit_version")}
        ordered.update(data)
        if not self.towers:
            del ordered["towers"]
        for row, obj in zip(ordered["layers"], self.layers, strict=True):
            row["params"] = obj.params
            row["per_block"] = obj.per_block
        result: dict[str, Any] = _jsonable(ordered)
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Read back what :meth:`to_dict` wrote (derived fields are recomputed)."""
        layers = tuple(
            LayerRow(**{k: v for k, v in row.items() if k not in ("params", "per_block")}) for row in data["layers"]
        )
        return cls(
            model=ModelInfo(**data["model"]),
            params=ParamTotals(**data["params"]),
            by_kind=dict(data["by_kind"]),
            by_module_type=dict(data["by_module_type"]),
            layers=layers,
            tied=tuple(TiedInfo(names=tuple(t["names"]), numel=t["numel"]) for t in data["tied"]),
            moe=MoeSummary(**data["moe"]) if data.get("moe") else None,
            dims=dict(data["dims"]),
            tree=_tree_from_dict(data["tree"]) if data.get("tree") else None,
            published=PublishedCheck(**data["published"]) if data.get("published") else None,
            notes=tuple(data.get("notes", ())),
            estimates=_estimates_from(data.get("estimates", ())),
            findings=_findings_from(data.get("findings", ())),
            towers=tuple(
                Tower(name=t["name"], params=t["params"], trainable=t["trainable"], modules=tuple(t["modules"]))
                for t in data.get("towers", ())
            ),
            glance=_glance_from(
                data.get("memory_at_a_glance"), data.get("recommendation"), data.get("serving_at_a_glance")
            ),
            schema_version=int(data["schema_version"]),
            peftaudit_version=str(data["peftaudit_version"]),
        )


def _glance_from(
    memory: Mapping[str, Any] | None, recommendation: Mapping[str, Any] | None, serving: Mapping[str, Any] | None
) -> Glance | None:
    if memory is None or recommendation is None:  # written together; a report without them has neither
        return None
    from peftaudit.report.glance import Glance, MemoryGlance, RecommendationSummary
    from peftaudit.report.serving_glance import ServingGlance

    return Glance(
        MemoryGlance.from_dict(memory),
        RecommendationSummary.from_dict(recommendation),
        ServingGlance.from_dict(serving) if serving is not None else None,
    )


def _estimates_from(rows: Sequence[Mapping[str, Any]]) -> tuple[MemoryEstimate, ...]:
    if not rows:
        return ()
    from peftaudit.memory.result import MemoryEstimate

    return tuple(MemoryEstimate.from_dict(r) for r in rows)


def _findings_from(rows: Sequence[Mapping[str, Any]]) -> tuple[Finding, ...]:
    if not rows:
        return ()
    from peftaudit.recommend.findings import Finding

    return tuple(Finding.from_dict(r) for r in rows)


def _jsonable(value: Any) -> Any:
    """Tuples become lists, so ``to_dict()`` equals its own JSON round trip."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _tree_from_dict(data: Mapping[str, Any]) -> TreeNode:
    return TreeNode(
        name=data["name"],
        type=data["type"],
        params=data["params"],
        repeat=data.get("repeat", 1),
        children=tuple(_tree_from_dict(c) for c in data.get("children", ())),
    )
