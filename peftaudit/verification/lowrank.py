"""Merged models: each changed target must differ from the base by a delta of rank at most r.

The check is numerical and bounded. It reads an evenly spaced subset of rows
of the base and merged weight (at most ``budget`` elements per matrix): a
submatrix of a rank-r matrix has rank at most r, so a sampled violation is a
real one. Rounding makes the merged delta full-rank in the last bits, so the
(r+1)-th singular value is compared with a bound on the rounding noise: each
element is off by at most ``eps * (|merged| + |delta|)``, and by Weyl's
inequality the noise moves any singular value by at most its Frobenius norm.

The sampled delta is also compared elementwise with ``scale * B @ A`` (same
noise bound, plus the adapter's own rounding), the scale being peft's for
that module (:mod:`lora_config`, never skipped): a merge with the wrong scale
or the wrong adapter fails even though its rank is fine, and the finding says
which multiple of ``B @ A`` the delta actually is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from peftaudit.severity import Severity
from peftaudit.verification.adapter import LoraPair, MergePlan, rank_mismatch
from peftaudit.verification.causes import Cause
from peftaudit.verification.dtypes import can_decode, decode, lookup
from peftaudit.verification.fingerprint import TensorFingerprint
from peftaudit.verification.lora_config import LoraSettings
from peftaudit.verification.snapshots import Snapshot
from peftaudit.verification.values import ValueSource
from peftaudit.verification.verdict import Finding, MergeScale, Problem, Verdict

#: Elements read per matrix by default (base and merged each): 4M, about 32 MB of float64.
DEFAULT_BUDGET = 1 << 22


@dataclass(frozen=True)
class _Factors:
    a: np.ndarray  # (rank, fan_in)
    b: np.ndarray  # (fan_out, rank)
    eps: float


def _decode_tensor(fp: TensorFingerprint, values: ValueSource) -> np.ndarray | None:
    if not can_decode(fp.dtype):
        return None
    array = decode(fp.dtype, values.read(fp.name, 0, fp.numel))
    return None if array is None else array.reshape(fp.shape)


def _rows(count: int, wanted: int) -> np.ndarray:
    wanted = max(1, min(count, wanted))
    return (np.arange(wanted, dtype=np.int64) * count) // wanted


def _read_rows(fp: TensorFingerprint, values: ValueSource, offset: int, rows: np.ndarray, width: int) -> np.ndarray:
    out = np.empty((rows.size, width), dtype=np.float64)
    for i, row in enumerate(rows):
        start = offset + int(row) * width
        decoded = decode(fp.dtype, values.read(fp.name, start, start + width))
        assert decoded is not None
        out[i] = decoded
    return out


def _sigma_after(delta: np.ndarray, merged: np.ndarray, rank: int, eps: float) -> tuple[float, float]:
    """(the (rank+1)-th singular value of ``delta``, the rounding-noise bound it must stay under)."""
    bound = eps * (np.abs(merged) + np.abs(delta)) + np.finfo(np.float64).tiny
    noise = float(np.sqrt(np.sum(bound * bound)))
    if min(delta.shape) <= rank:
        return 0.0, noise
    singular = np.linalg.svd(delta, compute_uv=False)
    return float(singular[rank]), noise


def check_merge(
    verdict: Verdict,
    base: Snapshot,
    merged: Snapshot,
    adapter: Snapshot,
    plan: MergePlan,
    *,
    budget: int = DEFAULT_BUDGET,
) -> Verdict:
    """The diff's verdict, completed with the merge checks.

    Adds rank and scale findings for each changed target, names the cause of
    targets the merge left unchanged, and reports targets the base does not name.
    """
    findings: list[Finding] = []
    unchanged: dict[str, Cause] = {}
    lora = plan.lora
    for name, pair in plan.targets.items():
        mismatch = rank_mismatch(pair, adapter, name, base, lora)
        if mismatch:
            findings.append(Finding(Problem.RESHAPED, pair.a, Severity.ERROR, mismatch))
        if name not in base or name not in merged:
            continue
        b_fp, m_fp = base[name], merged[name]
        if b_fp.same_bytes(m_fp):
            unchanged[name] = Cause.LORA_B_ZERO if adapter[pair.b].is_zero else Cause.NOT_MERGED
            continue
        if b_fp.shape != m_fp.shape or b_fp.dtype != m_fp.dtype or lora.use_dora:
            continue  # reported by the diff; DoRA merges are not low-rank
        if base.values is None or merged.values is None or adapter.values is None or not can_decode(b_fp.dtype):
            continue
        dtype = lookup(b_fp.dtype)
        eps = dtype.eps if dtype else 0.0
        findings.extend(_check_one(name, pair, b_fp, m_fp, base, merged, adapter, lora, eps, budget))
    for name, key in plan.copies.items():
        saved, result = adapter[key], merged.by_name.get(name)
        # A dtype change of the copy is the diff's to report; equal types must be equal bytes.
        if result is not None and result.dtype == saved.dtype and not result.same_bytes(saved):
            message = f"differs from the adapter's saved copy {key}"
            findings.append(Finding(Problem.MERGE_MISMATCH, name, Severity.ERROR, message))
    findings.extend(
        Finding(
            Problem.ADDED,
            pair.b,
            Severity.ERROR,
            f"targets {pair.module}, which {base.source} does not name (saved in another layout?): "
            "its merged weights cannot be checked",
        )
        for pair in plan.unresolved
    )
    explained = tuple(
        dataclasses.replace(f, cause=unchanged[f.name]) if f.problem is Problem.UNCHANGED and f.name in unchanged else f
        for f in verdict.findings
    )
    return dataclasses.replace(verdict, findings=explained + tuple(findings))


def _check_one(
    name: str,
    pair: LoraPair,
    b_fp: TensorFingerprint,
    m_fp: TensorFingerprint,
    base: Snapshot,
    merged: Snapshot,
    adapter: Snapshot,
    lora: LoraSettings,
    eps: float,
    budget: int,
) -> list[Finding]:
    assert base.values is not None and merged.values is not None and adapter.values is not None
    a_raw = _decode_tensor(adapter[pair.a], adapter.values)
    b_raw = _decode_tensor(adapter[pair.b], adapter.values)
    if a_raw is None or b_raw is None:
        return []
    a = a_raw.reshape(a_raw.shape[0], -1)
    b = b_raw.reshape(b_raw.shape[0], -1)
    rank = a.shape[0]
    shape = b_fp.shape
    out: list[Finding] = []

    def fail(problem: Problem, message: str, scale: MergeScale | None = None) -> None:
        out.append(Finding(problem, name, Severity.ERROR, message, scale=scale))

    if len(shape) == 3 and a_raw.ndim == 2:
        # Fused MoE experts: each expert's slice has its own rank-(rank / experts) delta.
        experts, rows_n, width = shape
        per_expert = rank // experts
        wanted = max(2 * per_expert + 8, budget // max(1, width * experts))
        worst: tuple[float, float, int] = (0.0, 0.0, -1)
        for e in range(experts):
            rows = _rows(rows_n, wanted)
            base_rows = _read_rows(b_fp, base.values, e * rows_n * width, rows, width)
            merged_rows = _read_rows(m_fp, merged.values, e * rows_n * width, rows, width)
            sigma, noise = _sigma_after(merged_rows - base_rows, merged_rows, per_expert, eps)
            if sigma > noise and sigma / noise > (worst[0] / worst[1] if worst[1] else 0.0):
                worst = (sigma, noise, e)
        if worst[2] >= 0:
            fail(
                Problem.RANK_EXCEEDED,
                f"expert {worst[2]}: delta has rank > {per_expert}: "
                f"singular value {per_expert + 1} is {worst[0]:.3g}, rounding allows {worst[1]:.3g}",
            )
        return out

    height = shape[0]
    width = math.prod(shape[1:])
    rows = _rows(height, max(2 * rank + 8, budget // max(1, width)))
    base_rows = _read_rows(b_fp, base.values, 0, rows, width)
    merged_rows = _read_rows(m_fp, merged.values, 0, rows, width)
    delta = merged_rows - base_rows
    sigma, noise = _sigma_after(delta, merged_rows, rank, eps)
    if sigma > noise:
        fail(
            Problem.RANK_EXCEEDED,
            f"delta has rank > {rank}: singular value {rank + 1} of "
            f"{rows.size} sampled rows is {sigma:.3g}, rounding allows {noise:.3g}",
        )
    if len(shape) != 2:
        return out
    rule = lora.scale_for(pair.module)
    scale = rule.value
    transposed = pair.embedding or (
        shape == (a.shape[1], b.shape[0]) and (shape != (b.shape[0], a.shape[1]) or lora.fan_in_fan_out)
    )
    if transposed:
        product = a[:, rows].T @ b.T
        magnitude = abs(scale) * (np.abs(a[:, rows]).T @ np.abs(b).T)
    else:
        product = b[rows] @ a
        magnitude = abs(scale) * (np.abs(b[rows]) @ np.abs(a))
    expected = scale * product
    factor_dtype = lookup(adapter[pair.a].dtype)
    factor_eps = factor_dtype.eps if factor_dtype else 0.0
    tolerance = (
        eps * (np.abs(merged_rows) + np.abs(delta))
        + 2 * (factor_eps + rank * 2.0**-23) * magnitude
        + np.finfo(np.float64).tiny
    )
    excess = np.abs(delta - expected) / tolerance
    bad = int(np.count_nonzero(excess > 1.0))
    if bad:
        found = _fitted_scale(delta, product)
        if found is None:
            shown = "it is no multiple of B@A"
        else:
            ratio = f", {found / scale:.3g}x the expected scale" if scale else ""
            shown = f"found scale {found:.4g}{ratio}"
        fail(
            Problem.MERGE_MISMATCH,
            f"merged delta differs from scale*B@A (scale {scale:.4g} = {rule.rule}) beyond "
            f"rounding in {bad} of {excess.size} sampled elements (worst {float(excess.max()):.3g}x "
            f"the tolerance); {shown}",
            MergeScale(expected=scale, found=found, rule=rule.rule),
        )
    return out


def _fitted_scale(delta: np.ndarray, product: np.ndarray) -> float | None:
    """The scale ``s`` for which ``s * B@A`` is closest to the delta (least squares), if it explains it.

    None when B@A is zero or the fit leaves most of the delta unexplained
    (another adapter was merged, or something else changed the weight).
    """
    norm = float(np.sum(product * product))
    if norm == 0.0 or not math.isfinite(norm):
        return None
    found = float(np.sum(delta * product)) / norm
    residual = float(np.linalg.norm(delta - found * product))
    if not math.isfinite(found) or residual > 0.5 * float(np.linalg.norm(delta)):
        return None
    return found
