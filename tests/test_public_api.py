"""The top-level public API: names exported from ``peftaudit``, exit codes, and the one severity scale."""

from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest

import peftaudit
from peftaudit.exit_codes import ExitCode
from peftaudit.severity import Severity


def test_every_public_name_resolves() -> None:
    for name in peftaudit.__all__:
        assert getattr(peftaudit, name) is not None, name


def test_verify_and_snapshot_are_plain_functions_with_signatures() -> None:
    import peftaudit.verification

    # The package is a noun and not callable; the verbs are functions (no module-class trick).
    assert isinstance(peftaudit.verification, types.ModuleType) and not callable(peftaudit.verification)
    assert inspect.isfunction(peftaudit.verify) and inspect.isfunction(peftaudit.snapshot)
    assert list(inspect.signature(peftaudit.verify).parameters)[:2] == ["before", "after"]
    assert "model_or_path" in inspect.signature(peftaudit.snapshot).parameters
    assert peftaudit.verify is peftaudit.verification.verify
    assert peftaudit.Verdict is peftaudit.verification.Verdict and peftaudit.Snapshot is peftaudit.verification.Snapshot
    assert issubclass(peftaudit.VerificationFailed, AssertionError)


def test_exit_codes_are_the_documented_numbers() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130]
    assert ExitCode.FINDINGS == 1 and peftaudit.ExitCode is ExitCode


def test_exit_codes_and_severity_import_nothing_heavy() -> None:
    code = (
        "import sys\nimport peftaudit.exit_codes, peftaudit.severity\n"
        "print(sorted(m for m in ('torch', 'transformers', 'rich') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_one_severity_scale_for_readiness_and_verification() -> None:
    from peftaudit.recommend import Finding
    from peftaudit.verification import Finding as TensorFinding
    from peftaudit.verification import Problem
    from peftaudit.verification.verdict import severity_for

    assert [s.value for s in Severity] == ["info", "warning", "error"]
    assert [s.rank for s in Severity] == [0, 1, 2]
    finding = Finding("x", "warning", "t", fix="f")  # plugins may pass the word
    assert finding.severity is Severity.WARNING and finding.to_dict()["severity"] == "warning"
    assert severity_for(None) is Severity.ERROR
    # The verifier calls an error a failure and info a note, in its JSON as before.
    tensor = TensorFinding(Problem.UNCHANGED, "w", Severity.ERROR, "did not change")
    assert tensor.to_dict()["severity"] == "failure"


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
def test_verify_refuses_other_formats_like_every_table_or_json_command(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftaudit.cli import main

    assert main(["verify", "a", "b", "--format", fmt]) == ExitCode.USAGE
    assert capsys.readouterr().err == f"peftaudit: error: verify supports --format table or json, not '{fmt}'\n"
