"""Building a report: from an inventory, from a resolved model (through the cache), from anything.

:func:`build_report` is pure (no I/O, no torch calls); :func:`report_for`
answers from the cache when this exact config was seen; :func:`audit` is the
public entry point for a hub id, catalog name, local path or live module.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from peftaudit.report.layers import layer_rows, module_tree
from peftaudit.report.model import ModelInfo, MoeSummary, ParamTotals, PublishedCheck, Report, TiedInfo
from peftaudit.towers import split_towers
from peftaudit.units import DTYPE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftaudit.inventory import Inventory, ParameterRecord
    from peftaudit.sources.base import ResolvedModel, SourceOptions
    from peftaudit.sources.load import LoadedModel

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
        towers=split_towers(inventory),
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
    return p.numel * DTYPE_BYTES.get(p.dtype, 4)


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


def report_for(
    resolved: ResolvedModel,
    model_source: Any,
    options: SourceOptions,
    *,
    use_cache: bool = True,
    loaded: LoadedModel | None = None,
    glance: bool = False,
) -> Report:
    """The report for a resolved model, from the cache when this exact config was seen.

    ``loaded``: the model already built and walked (a caller that also estimates
    or checks it), so a cache miss does not build it a second time. ``glance``:
    with the memory table and the recommendation of the default report
    (:mod:`peftaudit.report.glance`); without, the report has none.

    One cache entry serves both: it holds the glance once a report with it was
    asked for, and a report without it is answered from the same entry. An entry
    without the glance (written by ``--params-only`` or :func:`audit`), or with
    one placed on GPUs whose figures have changed since, is completed and rewritten, from the
    model cache when the model was built before. ``use_cache=False`` neither reads nor writes either cache.
    """
    from peftaudit import cache

    key = cache.key_for(resolved, options) if use_cache else None
    cached = cache.load(key) if key is not None else None
    if cached is not None:
        if not glance:
            return replace(cached, glance=None)
        if cached.glance is not None:
            from peftaudit.report.glance import is_current

            if is_current(cached.glance):
                return cached
    if loaded is None:
        from peftaudit.sources.load import load_resolved

        loaded = load_resolved(resolved, model_source, options, use_cache=use_cache)
    report = cached if cached is not None else _build(resolved, loaded)
    if glance:
        from peftaudit.report.glance import glance_for

        report = replace(report, glance=glance_for(loaded.inventory, loaded.facts, model_id=report.model.id))
    if key is not None:
        cache.store(key, report)
    return report


def _build(resolved: ResolvedModel, loaded: LoadedModel) -> Report:
    inventory = loaded.inventory
    info = ModelInfo(
        id=resolved.id,
        architecture=inventory.architecture,
        model_type=inventory.model_type,
        source=resolved.source,
        origin=resolved.origin,
        revision=resolved.revision,
        published_params=resolved.published_params,
    )
    return build_report(info, inventory, notes=resolved.notes)


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
