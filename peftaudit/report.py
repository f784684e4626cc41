"""The report: what ``peftaudit report`` prints, ``--format json`` writes and ``audit()`` returns.

A :class:`Report` is plain data computed once from an
:class:`~peftaudit.inventory.Inventory`; renderers only read it. ``to_dict()``
is exactly the JSON the CLI prints and :meth:`Report.from_dict` reads it back,
which is how a cached report is answered without importing torch.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from peftaudit._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftaudit.inventory import Inventory, ParameterRecord
    from peftaudit.memory.result import MemoryEstimate
    from peftaudit.recommend.findings import Finding
    from peftaudit.sources.base import ResolvedModel, SourceOptions

#: Bumped only for incompatible changes to the JSON; new fields may appear in any version.
SCHEMA_VERSION = 1

_BYTES_PER_DTYPE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


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


_SCALES = {
    "K": 10**3,
    "THOUSAND": 10**3,
    "M": 10**6,
    "MILLION": 10**6,
    "B": 10**9,
    "BILLION": 10**9,
    "T": 10**12,
    "TRILLION": 10**12,
}
_FIGURE = re.compile(r"^\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def matches_published(total: int, published: int | str) -> bool:
    """Whether ``total`` is the published figure (exactly, or to its printed precision).

    Rounded figures are read as printed: ``"7.61B"``, ``"124M"``, ``"60 million"``.
    """
    if isinstance(published, int):
        return total == published
    match = _FIGURE.match(published)
    if match is None:
        return False
    digits, unit = match.group(1).replace(",", ""), match.group(2).upper()
    if unit and unit not in _SCALES:
        return False
    scale = _SCALES.get(unit, 1)
    value = float(digits)
    decimals = len(digits.partition(".")[2])
    exact = total / scale
    # Model cards round (Hugging Face prints 7.62B) or truncate (Qwen prints 7.61B): accept both.
    truncated = math.floor(exact * 10**decimals) / 10**decimals
    return round(value, decimals) in (round(exact, decimals), round(truncated, decimals))


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
    schema_version: int = SCHEMA_VERSION
    peftaudit_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data; exactly what ``--format json`` prints."""
        data = asdict(replace(self, estimates=(), findings=()))
        data["estimates"] = [e.to_dict() for e in self.estimates]
        data["findings"] = [f.to_dict() for f in self.findings]
        ordered = {"schema_version": data.pop("schema_version"), "peftaudit_version": data.pop("peftaudit_version")}
        ordered.update(data)
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
            schema_version=int(data["schema_version"]),
            peftaudit_version=str(data["peftaudit_version"]),
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


# --- building a report ------------------------------------------------------------


def build_report(model: ModelInfo, inventory: Inventory, notes: Sequence[str] = ()) -> Report:
    """Summarise an inventory as a report (pure: no I/O, no torch calls)."""
    params = inventory.parameters
    weighted: Counter[str] = Counter()
    for p in params:
        weighted[p.dtype] += p.numel
    dominant = weighted.most_common(1)[0][0] if weighted else None
    info = ModelInfo(**{**asdict(model), "architecture": inventory.architecture, "dtype": dominant})
    totals = ParamTotals(
        total=inventory.total,
        weights=inventory.weights,
        biases=inventory.biases,
        buffers=inventory.buffers_total,
        trainable=inventory.trainable,
        frozen=inventory.frozen,
        tied=sum(g.numel for g in inventory.tied_groups),
        quantized=sum(p.numel for p in params if p.quantization),
        active=inventory.moe.active_params if inventory.moe else None,
        bytes=sum(_param_bytes(p) for p in params),
    )
    moe = MoeSummary(**asdict(inventory.moe)) if inventory.moe else None
    return Report(
        model=info,
        params=totals,
        by_kind=inventory.by_kind(),
        by_module_type=inventory.by_module_type(),
        layers=tuple(layer_rows(inventory)),
        tied=tuple(TiedInfo(names=g.names, numel=g.numel) for g in inventory.tied_groups),
        moe=moe,
        dims={k: v for k, v in asdict(inventory.dims).items() if v is not None},
        tree=module_tree(inventory),
        published=_published(model.published_params, totals.total),
        notes=tuple(notes),
    )


def _published(published: Mapping[str, Any] | None, total: int) -> PublishedCheck | None:
    value = (published or {}).get("total")
    if not isinstance(value, int | str) or isinstance(value, bool):
        return None
    source = str((published or {}).get("source", ""))
    return PublishedCheck(value=value, source=source, matches=matches_published(total, value))


def _param_bytes(p: ParameterRecord) -> int:
    if p.quantization == "4bit":
        return (p.numel + 1) // 2
    if p.quantization == "8bit":
        return p.numel
    return p.numel * _BYTES_PER_DTYPE.get(p.dtype, 4)


def layer_rows(inventory: Inventory) -> list[LayerRow]:
    """Per-layer rows: one per non-repeated module, one per run of identical blocks."""
    order = {m.path: i for i, m in enumerate(inventory.modules)}
    types = {m.path: m.type for m in inventory.modules}

    # Group parameters: by (container, layer) inside repeated blocks, else by owning module.
    groups: dict[tuple[str, int | None], list[ParameterRecord]] = {}
    for p in inventory.parameters:
        key = (p.block, p.layer) if p.block is not None and p.layer is not None else (p.module, None)
        groups.setdefault(key, []).append(p)

    rows: list[tuple[int, LayerRow]] = []
    run: list[tuple[str, int, list[ParameterRecord]]] = []

    def flush() -> None:
        if not run:
            return
        container, first, _ = run[0]
        last = run[-1][1]
        block_path = f"{container}.{first}" if container else str(first)
        name = f"{container}.{first}-{last}" if last != first else block_path
        all_params = [p for _, _, ps in run for p in ps]
        rows.append((order.get(block_path, 0), _row(name, types.get(block_path, "?"), all_params, len(run))))
        run.clear()

    for (path, layer), members in groups.items():
        if layer is None:
            flush()
            rows.append((order.get(path, 0), _row(path or "(root)", types.get(path, "?"), members, 1)))
            continue
        current = (path, layer, members)
        if run and (run[0][0] != path or run[-1][1] != layer - 1 or _signature(run[0]) != _signature(current)):
            flush()
        run.append(current)
    flush()

    # Modules whose only tensor is tied to another's: a zero row that says so.
    owned = {p.module for p in inventory.parameters}
    blocks = {p.block for p in inventory.parameters if p.block}
    for group in inventory.tied_groups:
        for alias in group.names[1:]:
            module = alias.rpartition(".")[0]
            if module in owned or any(module.startswith(b + ".") for b in blocks):
                continue
            rows.append(
                (
                    order.get(module, len(order)),
                    LayerRow(
                        name=module,
                        type=types.get(module, "?"),
                        weights=0,
                        biases=0,
                        trainable=0,
                        tied_to=group.names[0],
                    ),
                )
            )
            owned.add(module)
    rows.sort(key=lambda item: item[0])
    return [row for _, row in rows]


def _signature(member: tuple[str, int, list[ParameterRecord]]) -> tuple[Any, ...]:
    """What makes two blocks identical: relative names, shapes, dtypes, trainability, kinds."""
    path, layer, params = member
    prefix = f"{path}.{layer}."
    return tuple((p.name.removeprefix(prefix), p.shape, p.dtype, p.trainable, p.kind) for p in params)


def _row(name: str, type_: str, params: Sequence[ParameterRecord], repeat: int) -> LayerRow:
    return LayerRow(
        name=name,
        type=type_,
        weights=sum(p.numel for p in params if not p.is_bias),
        biases=sum(p.numel for p in params if p.is_bias),
        trainable=sum(p.numel for p in params if p.trainable),
        repeat=repeat,
    )


def module_tree(inventory: Inventory) -> TreeNode:
    """The module tree with subtree parameter counts, identical siblings collapsed."""
    children: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    own: dict[str, int] = {}
    for m in inventory.modules:
        types[m.path] = m.type
        own[m.path] = m.own_params
        if m.path:
            parent = m.path.rpartition(".")[0]
            children.setdefault(parent, []).append(m.path)

    def build(path: str) -> TreeNode:
        kids = [build(c) for c in children.get(path, [])]
        total = own.get(path, 0) + sum(k.params * k.repeat for k in kids)
        return TreeNode(
            name=path.rpartition(".")[2] or "(root)",
            type=types.get(path, "?"),
            params=total,
            children=tuple(_collapse(kids)),
        )

    return build("")


def _collapse(nodes: list[TreeNode]) -> list[TreeNode]:
    """Merge runs of numbered siblings with identical subtrees: ``0-31 (x32)``."""
    out: list[TreeNode] = []
    run: list[TreeNode] = []

    def shape(n: TreeNode) -> tuple[Any, ...]:
        return (n.type, n.params, tuple((*shape(c), c.name, c.repeat) for c in n.children))

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            out.append(run[0])
        else:
            first = run[0]
            out.append(
                TreeNode(
                    name=f"{first.name}-{run[-1].name}",
                    type=first.type,
                    params=first.params,
                    repeat=len(run),
                    children=first.children,
                )
            )
        run.clear()

    for node in nodes:
        if node.name.isdigit() and run and int(node.name) == int(run[-1].name) + 1 and shape(node) == shape(run[0]):
            run.append(node)
            continue
        flush()
        if node.name.isdigit():
            run.append(node)
        else:
            out.append(node)
    flush()
    return out


# --- the public entry point -------------------------------------------------------


def audit(
    source: str | os.PathLike[str] | torch.nn.Module,
    *,
    options: SourceOptions | None = None,
    use_cache: bool = True,
) -> Report:
    """Audit a model: a hub id, a catalog name, a local path, or a live ``nn.Module``.

    Strings and paths are resolved through the registered model sources and
    built on the meta device (no weights). A live module (including a
    ``PeftModel``) is walked as it is, with its own ``requires_grad`` flags.
    """
    from peftaudit.sources.base import SourceOptions, resolve

    if isinstance(source, str | os.PathLike):
        options = options or SourceOptions()
        resolved, model_source = resolve(os.fspath(source), options)
        return report_for(resolved, model_source, options, use_cache=use_cache)
    return report_for_module(source)


def report_for(resolved: ResolvedModel, model_source: Any, options: SourceOptions, *, use_cache: bool = True) -> Report:
    """The report for a resolved model, from the cache when this exact config was seen."""
    from peftaudit import cache

    key = cache.key_for(resolved, options) if use_cache else None
    if key is not None:
        cached = cache.load(key)
        if cached is not None:
            return cached
    from peftaudit.inventory import take_inventory

    module = model_source.build(resolved, options)
    inventory = take_inventory(module)
    info = ModelInfo(
        id=resolved.id,
        architecture=inventory.architecture,
        model_type=inventory.model_type,
        source=resolved.source,
        origin=resolved.origin,
        revision=resolved.revision,
        published_params=resolved.published_params,
    )
    report = build_report(info, inventory, notes=resolved.notes)
    if key is not None:
        cache.store(key, report)
    return report


def report_for_module(module: torch.nn.Module) -> Report:
    """The report for a live module (a model in memory, possibly a PeftModel)."""
    from peftaudit.inventory import take_inventory

    inventory = take_inventory(module)
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", "") or type(module).__name__
    info = ModelInfo(
        id=str(name),
        architecture=inventory.architecture,
        model_type=inventory.model_type,
        source="module",
        origin=f"live {type(module).__name__}",
    )
    return build_report(info, inventory)
