"""The peftaudit pytest plugin: audits and verification as native assertions in training CI.

Installed with peftaudit through the ``pytest11`` entry point; ``-p no:peftaudit``
disables it. Importing this module imports neither torch nor transformers:
fixtures import them when a test uses them, so test runs that never touch a
model pay nothing.

What it adds:

* ``@pytest.mark.peftaudit(max_trainable_fraction=..., fits="A10G", method="qlora", seq_len=2048)``:
  checks the model the test used (the one ``torch.nn.Module`` among its fixtures,
  or the fixture named by ``model=``) after the test body passes.
* Fixtures: ``peftaudit`` (audit/snapshot/verify, recorded for the summary) and
  ``param_snapshot`` (``before = param_snapshot(model)``, then
  ``assert before.only_intended_changed(model)``).
* ``--peftaudit-report``: a terminal summary of what the tests audited and verified.
* Failure explanations: a section naming what changed, by how much and why, and
  ``pytest_assertrepr_compare`` for comparisons of peftaudit objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from peftaudit.report import Report
    from peftaudit.verification import Snapshot, Verdict

#: Arguments ``@pytest.mark.peftaudit`` accepts, with what each checks.
MARKER_ARGUMENTS: dict[str, str] = {
    "max_trainable_fraction": "trainable / total parameters must be at most this (0 < x <= 1)",
    "min_trainable_fraction": "trainable / total parameters must be at least this (0 <= x < 1)",
    "max_trainable": "at most this many trainable parameters",
    "fits": "the plan's estimated peak memory must fit this GPU (a `peftaudit gpus` name, or True for the default)",
    "method": "training method for `fits`: full, lora, qlora, ... (default: the ini value, else lora)",
    "seq_len": "sequence length for `fits` (default: the ini value, else 2048)",
    "batch_size": "micro-batch size for `fits` (default 1)",
    "gpus": "number of GPUs for `fits` (default 1)",
    "stack": "releases the run uses for `fits`, e.g. 'transformers==4.44,peft==0.12' "
    "(default: the ini value, else the installed ones)",
    "expandable_segments": "for `fits`: the run sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (default False)",
    "lengths": "for `fits`: 'fixed' batch lengths (packed or padded) or 'varied' (default 'fixed')",
    "serves": "serving the model (vLLM's accounting; a PeftModel's adapter unmerged) must fit this GPU",
    "context": "tokens per sequence for `serves` (default: the model's maximum)",
    "concurrency": "sequences served at once for `serves` (default 1)",
    "objective": "for `fits`: what the step optimises, as TRL's trainers run it: sft (default), dpo, kto, orpo, "
    "simpo, reward, grpo (batch_size then counts pairs, or grpo's prompts)",
    "generations": "for `fits` with objective='grpo': completions per prompt (default 8)",
    "completion_len": "for `fits` with objective='grpo': tokens per completion, within seq_len (default 512)",
    "generation": "for `fits` with objective='grpo': transformers (default), vllm-colocate or vllm-server",
    "vllm_memory": "for `fits` with generation='vllm-colocate': fraction of the GPU vLLM holds (default 0.3)",
    "beta": "for `fits`: the objective's beta (grpo above 0 loads a reference model)",
    "precompute_ref": "for `fits` with objective dpo or kto: reference log-probs computed before training",
    "model": "name of the fixture holding the model to check (default: the only nn.Module fixture)",
}

_USER_PROPERTY = "peftaudit"
_SECTION = "peftaudit verification"


# --- configuration ---------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("peftaudit", "peftaudit: audit and verify fine-tuning in tests")
    group.addoption(
        "--peftaudit-report",
        action="store_true",
        default=False,
        help="add a terminal summary of the models the tests audited and the verifications they ran",
    )
    group.addoption(
        "--peftaudit-gpu",
        metavar="GPU",
        default=None,
        help="GPU for `fits` checks that name none (default: ini peftaudit_gpu)",
    )
    parser.addini("peftaudit_gpu", "default GPU for @pytest.mark.peftaudit(fits=...) checks", default="")
    parser.addini("peftaudit_method", "default training method for `fits` checks", default="lora")
    parser.addini("peftaudit_seq_len", "default sequence length for `fits` checks", default="2048")
    parser.addini(
        "peftaudit_stack",
        "default software stack for `fits` checks, e.g. transformers==4.44,peft==0.12 (default: installed)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    arguments = ", ".join(f"{k}=..." for k in MARKER_ARGUMENTS)
    config.addinivalue_line(
        "markers",
        f"peftaudit({arguments}): check the model this test used after it passes: trainable share, "
        "whether the training plan fits a GPU, and whether serving it does. See `peftaudit` docs, pytest plugin.",
    )
    if config.getoption("--peftaudit-report"):
        config.pluginmanager.register(_Summary(), "peftaudit-summary")


# --- the marker ---------------------------------------------------------------------


@dataclass(frozen=True)
class MarkerChecks:
    """The validated arguments of one ``@pytest.mark.peftaudit``."""

    max_trainable_fraction: float | None = None
    min_trainable_fraction: float | None = None
    max_trainable: int | None = None
    fits: str | bool | None = None
    method: str | None = None
    seq_len: int | None = None
    batch_size: int = 1
    gpus: int = 1
    model: str | None = None
    stack: str | None = None
    expandable_segments: bool = False
    lengths: str = "fixed"
    objective: str | None = None
    generations: int | None = None
    completion_len: int | None = None
    generation: str | None = None
    vllm_memory: float | None = None
    beta: float | None = None
    precompute_ref: bool | None = None
    serves: str | None = None
    context: int | None = None
    concurrency: int | None = None

    def objective_fields(self) -> dict[str, Any]:
        """The objective's plan fields the marker gives (the rest keep the plan's defaults)."""
        return {name: getattr(self, name) for name in _OBJECTIVE_ARGUMENTS if getattr(self, name) is not None}


#: Marker arguments that are :class:`~peftaudit.memory.plan.TrainingPlan`'s objective fields, of the same names.
_OBJECTIVE_ARGUMENTS = (
    "objective",
    "generations",
    "completion_len",
    "generation",
    "vllm_memory",
    "beta",
    "precompute_ref",
)


def parse_marker(mark: pytest.Mark) -> MarkerChecks:
    """Validate the marker's arguments; raise ``ValueError`` with a readable message."""
    if mark.args:
        raise ValueError("@pytest.mark.peftaudit takes keyword arguments only")
    unknown = sorted(set(mark.kwargs) - set(MARKER_ARGUMENTS))
    if unknown:
        raise ValueError(
            f"@pytest.mark.peftaudit got unknown argument(s) {', '.join(unknown)}; known: {', '.join(MARKER_ARGUMENTS)}"
        )
    kw = dict(mark.kwargs)
    for name in ("max_trainable_fraction", "min_trainable_fraction"):
        value = kw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1):
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be a number between 0 and 1, got {value!r}")
    for name in (
        "max_trainable",
        "seq_len",
        "batch_size",
        "gpus",
        "generations",
        "completion_len",
        "context",
        "concurrency",
    ):
        value = kw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be a positive integer, got {value!r}")
    if kw.get("fits") is True:
        pass  # the default GPU, from --peftaudit-gpu or the ini file
    elif kw.get("fits") is not None and not (isinstance(kw["fits"], str) and kw["fits"].strip()):
        raise ValueError(f"@pytest.mark.peftaudit(fits=...) must be a GPU name or True, got {kw['fits']!r}")
    for name in ("method", "model", "stack", "serves"):
        value = kw.get(name)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be a non-empty string, got {value!r}")
    for name in ("expandable_segments", "precompute_ref"):
        if not isinstance(kw.get(name, False), bool):
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be True or False, got {kw[name]!r}")
    for name in ("vllm_memory", "beta"):
        value = kw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be a number, got {value!r}")
    from peftaudit.memory.plan import GENERATIONS, LENGTHS, OBJECTIVES

    for name, known in (("objective", OBJECTIVES), ("generation", GENERATIONS)):
        if kw.get(name) is not None and kw[name] not in known:
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) must be one of {', '.join(known)}, got {kw[name]!r}")

    if kw.get("lengths", "fixed") not in LENGTHS:
        raise ValueError(
            f"@pytest.mark.peftaudit(lengths=...) must be one of {', '.join(LENGTHS)}, got {kw['lengths']!r}"
        )
    if kw.get("stack") is not None:
        from peftaudit.memory.plan import PlanError
        from peftaudit.memory.stack import parse_stack

        try:
            parse_stack(kw["stack"])
        except PlanError as exc:
            raise ValueError(f"@pytest.mark.peftaudit(stack=...): {exc}") from None
    checks = ("max_trainable_fraction", "min_trainable_fraction", "max_trainable", "fits", "serves")
    if not any(kw.get(k) is not None for k in checks):
        raise ValueError(
            "@pytest.mark.peftaudit needs at least one check: max_trainable_fraction, min_trainable_fraction, "
            "max_trainable, fits or serves"
        )
    for name in ("context", "concurrency"):
        if kw.get(name) is not None and kw.get("serves") is None:
            raise ValueError(f"@pytest.mark.peftaudit({name}=...) applies to serves=..., which is not given")
    return MarkerChecks(**kw)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    mark = item.get_closest_marker("peftaudit")
    checks: MarkerChecks | None = None
    if mark is not None:
        try:
            checks = parse_marker(mark)
        except ValueError as exc:
            pytest.fail(str(exc), pytrace=False)
    result = yield  # a failing test body raises here, and its failure stands
    if checks is not None:
        model = _model_under_test(item, checks.model)
        problems = _check_model(item.config, model, checks, item)
        if problems:
            pytest.fail("peftaudit marker checks failed:\n" + "\n".join(problems), pytrace=False)
    return result


def _model_under_test(item: pytest.Item, name: str | None) -> Any:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    if name is not None:
        if name not in funcargs:
            pytest.fail(f"@pytest.mark.peftaudit(model={name!r}): the test uses no fixture of that name", pytrace=False)
        return funcargs[name]
    modules = {k: v for k, v in funcargs.items() if _is_module(v)}
    if len(modules) != 1:
        found = ", ".join(sorted(modules)) or "none"
        pytest.fail(
            "@pytest.mark.peftaudit checks the model the test uses: it needs exactly one torch.nn.Module "
            f"fixture or model='fixture_name' (found: {found})",
            pytrace=False,
        )
    return next(iter(modules.values()))


def _is_module(value: Any) -> bool:
    return hasattr(value, "named_parameters") and hasattr(value, "state_dict")


def _check_model(config: pytest.Config, model: Any, checks: MarkerChecks, item: pytest.Item) -> list[str]:
    from peftaudit.report import audit

    report = audit(model)
    _record(item, "audit", _audit_record(report))
    p = report.params
    fraction = p.trainable / p.total if p.total else 0.0
    problems: list[str] = []
    share = f"{p.trainable:,} of {p.total:,} parameters trainable ({fraction:.4%})"
    if checks.max_trainable_fraction is not None and fraction > checks.max_trainable_fraction:
        problems.append(
            f"  trainable fraction {fraction:.4%} > max_trainable_fraction {checks.max_trainable_fraction:.4%}: {share}"
        )
    if checks.min_trainable_fraction is not None and fraction < checks.min_trainable_fraction:
        problems.append(
            f"  trainable fraction {fraction:.4%} < min_trainable_fraction {checks.min_trainable_fraction:.4%}: {share}"
        )
    if checks.max_trainable is not None and p.trainable > checks.max_trainable:
        problems.append(f"  {p.trainable:,} trainable parameters > max_trainable {checks.max_trainable:,}")
    if checks.fits is not None:
        problems += _check_fit(config, model, checks, item)
    if checks.serves is not None:
        problems += _check_serve(model, checks, item)
    return problems


def _check_serve(model: Any, checks: MarkerChecks, item: pytest.Item) -> list[str]:
    from peftaudit.errors import PeftauditError
    from peftaudit.serving.live import serve_live_model

    assert checks.serves is not None
    plan: dict[str, Any] = {"tensor_parallel_size": 1}
    if checks.context is not None:
        plan["max_model_len"] = checks.context
    if checks.concurrency is not None:
        plan["concurrency"] = checks.concurrency
    try:
        result = serve_live_model(model, gpu=checks.serves, **plan)
    except PeftauditError as exc:
        pytest.fail(f"@pytest.mark.peftaudit(serves=...): {exc}", pytrace=False)
    _record(item, "serve", result.to_dict())
    if result.fits:
        return []
    wanted = checks.concurrency or 1
    return [
        f"  does not serve {wanted:,} sequences of {result.max_model_len:,} tokens on one {result.gpu}: the KV cache "
        f"holds {result.max_concurrency:.2f} ({result.kv_cache_tokens:,} tokens, {result.kv_cache_bytes / 2**30:.2f} "
        f"GiB after {result.weights_bytes / 2**30:.2f} GiB of weights)"
    ]


def _check_fit(config: pytest.Config, model: Any, checks: MarkerChecks, item: pytest.Item) -> list[str]:
    from peftaudit.gpus.live import fit_live_model

    named = checks.fits if isinstance(checks.fits, str) else None
    gpu_name = named or config.getoption("--peftaudit-gpu") or str(config.getini("peftaudit_gpu"))
    if not gpu_name:
        pytest.fail(
            "@pytest.mark.peftaudit(fits=True) needs --peftaudit-gpu or the peftaudit_gpu ini key", pytrace=False
        )
    method = checks.method or str(config.getini("peftaudit_method")) or "lora"
    seq_len = checks.seq_len or int(str(config.getini("peftaudit_seq_len")) or 2048)
    stack = checks.stack or str(config.getini("peftaudit_stack")).strip()
    if stack and not checks.stack:
        from peftaudit.memory.plan import PlanError
        from peftaudit.memory.stack import parse_stack

        try:
            parse_stack(stack)
        except PlanError as exc:
            pytest.fail(f"the peftaudit_stack ini key: {exc}", pytrace=False)
    from peftaudit.errors import PeftauditError

    try:
        result = fit_live_model(
            model,
            gpu=gpu_name,
            method=method,
            seq_len=seq_len,
            batch_size=checks.batch_size,
            gpus=checks.gpus,
            stack=stack,
            expandable_segments=checks.expandable_segments,
            lengths=checks.lengths,
            objective=checks.objective_fields(),
        )
    except PeftauditError as exc:
        pytest.fail(f"@pytest.mark.peftaudit(fits=...): {exc}", pytrace=False)
    _record(item, "fit", result.to_dict())
    if result.fits:
        return []
    return [f"  does not fit: {result.explain()}"]


# --- fixtures --------------------------------------------------------------------------


@dataclass
class Auditor:
    """What the ``peftaudit`` fixture gives a test: the library, recorded for ``--peftaudit-report``."""

    item: pytest.Item
    reports: list[Any] = field(default_factory=list)

    def audit(self, source: Any, **kwargs: Any) -> Report:
        """``peftaudit.audit``: a hub id, catalog name, path, or live model."""
        from peftaudit.report import audit

        report = audit(source, **kwargs)
        _record(self.item, "audit", _audit_record(report))
        return report

    def snapshot(self, model_or_path: Any, **kwargs: Any) -> Snapshot:
        """``peftaudit.snapshot``: per-tensor fingerprints, not a copy."""
        from peftaudit.verification import snapshot

        return snapshot(model_or_path, **kwargs)

    def verify(self, before: Any, after: Any = None, **kwargs: Any) -> Verdict:
        """``peftaudit.verify``; failing verdicts are explained in the test report."""
        from peftaudit.verification import verify

        verdict = verify(before, after, **kwargs)
        _remember_verdict(self.item, verdict)
        return verdict


@pytest.fixture
def peftaudit(request: pytest.FixtureRequest) -> Auditor:
    """The peftaudit API for a test: ``peftaudit.audit(source)``, ``.snapshot(model)``, ``.verify(before, after)``.

    Audits and verdicts are listed in the ``--peftaudit-report`` terminal summary,
    and a failing verdict's findings are shown in the test's failure report.
    """
    return Auditor(request.node)


class ParamSnapshot:
    """Fingerprints of a model's tensors taken before training (see the ``param_snapshot`` fixture)."""

    def __init__(self, snapshot: Snapshot, item: pytest.Item) -> None:
        self.snapshot = snapshot
        self._item = item

    def only_intended_changed(self, model: Any, **kwargs: Any) -> ChangeCheck:
        """Verify ``model`` against this snapshot: truthy when only adapters (and
        ``modules_to_save``) changed and every one of them did.

        Keyword arguments go to :func:`peftaudit.verify` (``expect=``,
        ``allow=``, ``tolerate=``). On failure the test report gets a section
        listing what changed, by how much and the likely cause.
        """
        from peftaudit.verification import verify

        verdict = verify(self.snapshot, model, **kwargs)
        _remember_verdict(self._item, verdict)
        return ChangeCheck(verdict)

    def __repr__(self) -> str:
        return f"<param_snapshot of {len(self.snapshot.tensors)} tensors>"


@dataclass(frozen=True, eq=False)
class ChangeCheck:
    """A verdict in a form ``assert`` reads: truthy when verification passed.

    Its repr is one line (pytest shortens long reprs); the full explanation is
    added to the failing test's report.
    """

    verdict: Verdict

    def __bool__(self) -> bool:
        return self.verdict.ok

    def __eq__(self, other: object) -> bool:
        if isinstance(other, bool):
            return bool(self) is other
        if isinstance(other, ChangeCheck):
            return bool(self) is bool(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        first = self.verdict.failures[:1]
        detail = f"; first: {first[0].problem.value} {first[0].name}" if first else ""
        return f"<peftaudit {self.verdict.summary()}{detail}>"


@pytest.fixture
def param_snapshot(request: pytest.FixtureRequest) -> Callable[..., ParamSnapshot]:
    """Take a snapshot of a model's parameters: ``before = param_snapshot(model)``.

    After training, ``assert before.only_intended_changed(model)`` passes when the
    frozen base is bit-for-bit unchanged and every adapter tensor moved;
    expectations are read from the PeftModel itself.
    """

    def take(model: Any, **kwargs: Any) -> ParamSnapshot:
        from peftaudit.verification import snapshot

        return ParamSnapshot(snapshot(model, **kwargs), request.node)

    return take


# --- explanations ------------------------------------------------------------------


_VERDICTS = pytest.StashKey[list[Any]]()


def _remember_verdict(item: pytest.Item, verdict: Verdict) -> None:
    item.stash.setdefault(_VERDICTS, []).append(verdict)
    _record(item, "verify", {"ok": verdict.ok, "summary": verdict.summary()})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        failing = [v for v in item.stash.get(_VERDICTS, []) if not v.ok]
        if failing:
            verbose = item.config.get_verbosity() > 0
            text = "\n\n".join(v.explain(limit=1000 if verbose else 10) for v in failing)
            report.sections.append((_SECTION, text))
    return report


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    """Explain ``==`` comparisons involving a peftaudit verdict; ``None`` for everything else.

    pytest keeps about 640 characters of an explanation unless ``-vv`` is given,
    so the default lines are short (problem and tensor); ``-v`` gives each
    finding's full line, and the failure report's section has them all.
    """
    from peftaudit.verification import Verdict

    ours = [x for x in (left, right) if isinstance(x, ChangeCheck | Verdict)]
    if op not in ("==", "!=") or not ours:
        return None
    verdict = ours[0].verdict if isinstance(ours[0], ChangeCheck) else ours[0]
    ranked = [*verdict.failures, *verdict.warnings]
    lines = [f"peftaudit verification {'passed' if verdict.ok else 'failed'}: {verdict.summary()}"]
    if config.get_verbosity() > 0:
        lines += [f"  {f.line()}" for f in ranked]
    else:
        lines += [f"  {f.problem.value}: {f.name}" for f in ranked[:4]]
        if len(ranked) > 4:
            lines.append(f"  ... and {len(ranked) - 4} more (see the peftaudit verification section)")
    return lines


# --- the terminal summary --------------------------------------------------------------


def _audit_record(report: Report) -> dict[str, Any]:
    p = report.params
    return {
        "model": report.model.id,
        "architecture": report.model.architecture,
        "total": p.total,
        "trainable": p.trainable,
    }


def _record(item: pytest.Item, kind: str, data: dict[str, Any]) -> None:
    # user_properties travel from xdist workers to the controller with each report.
    item.user_properties.append((_USER_PROPERTY, json.dumps({"kind": kind, "test": item.nodeid, **data})))


class _Summary:
    """Collects what tests audited (from every xdist worker) and prints ``--peftaudit-report``."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == _USER_PROPERTY:
                self.records.append(json.loads(str(value)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("peftaudit")
        if not self.records:
            terminalreporter.line("no models were audited or verified")
            return
        for record in self.records:
            terminalreporter.line(_summary_line(record))


def _summary_line(record: dict[str, Any]) -> str:
    kind, test = record["kind"], record["test"]
    if kind == "audit":
        share = record["trainable"] / record["total"] if record["total"] else 0.0
        return (
            f"audit   {record['model']} ({record['architecture']}): {record['total']:,} parameters, "
            f"{record['trainable']:,} trainable ({share:.4%})  [{test}]"
        )
    if kind == "verify":
        return f"verify  {record['summary']}  [{test}]"
    if kind == "serve":
        state = "fits" if record.get("fits") else "does NOT fit"
        return (
            f"serve   {record['model']} on {record['tensor_parallel']} x {record['gpu']}, "
            f"{record['max_concurrency']:.2f} x {record['max_model_len']:,} tokens: {state}  [{test}]"
        )
    state = "fits" if record.get("fits") else "does NOT fit"
    return f"fit     {record.get('summary', '')}: {state}  [{test}]"
