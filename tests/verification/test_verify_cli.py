"""``peftaudit snapshot`` and ``peftaudit verify`` from the outside: exit codes, output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import save_file

from peftaudit.cli import main


def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    state = {"encoder.norm.weight": torch.ones(16), "encoder.dense.weight": torch.randn(16, 16, generator=g)}
    base, after = tmp_path / "base", tmp_path / "after"
    base.mkdir()
    after.mkdir()
    save_file(state, base / "model.safetensors")
    changed = {k: v.clone() for k, v in state.items()}
    changed["encoder.norm.weight"][3] = 1.5
    save_file(changed, after / "model.safetensors")
    return base, after


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_checkpoints_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = checkpoints(tmp_path)
    code, out, err = cli(capsys, "verify", base, base / "model.safetensors")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "PASS: 2 tensors compared, 0 changed, 0/0 intended changed"


def test_unexpected_change_fails_with_exit_1_and_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, after = checkpoints(tmp_path)
    code, out, _ = cli(capsys, "verify", base, after, "--width", "160")
    assert code == 1
    assert out.startswith("FAIL: 2 tensors compared, 1 changed, 0/0 intended changed, 1 failure")
    assert "encoder.norm.weight" in out and "left-trainable" in out
    assert "max |Δ| 0.5, rel 0.5, 6.2% of elements changed" in out


def test_json_output_is_the_verdict_and_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, after = checkpoints(tmp_path)
    code, out, _ = cli(capsys, "verify", base, after, "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    [finding] = data["findings"]
    assert finding["name"] == "encoder.norm.weight" and finding["problem"] == "unexpected-change"
    assert finding["size"] == {
        "max_abs": 0.5,
        "max_rel": 0.5,
        "fraction_changed": 1 / 16,
        "elements_compared": 16,
        "exact": True,
    }
    code, out, _ = cli(capsys, "verify", base, after, "--json", "--allow", "re:norm")
    assert code == 0 and json.loads(out)["ok"] is True


def test_snapshot_then_verify_against_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, after = checkpoints(tmp_path)
    target = tmp_path / "before.json"
    code, out, err = cli(capsys, "snapshot", base, "-o", target)
    assert code == 0 and out == ""
    assert err.startswith("peftaudit: 2 tensors, 0.00 GB fingerprinted in ") and err.endswith(f"-> {target}\n")
    assert json.loads(target.read_text())["format"] == "peftaudit-snapshot"
    code, out, _ = cli(capsys, "snapshot", base)
    assert code == 0 and json.loads(out)["tensors"][0]["digest"]
    code, out, _ = cli(capsys, "verify", target, after, "--json")
    assert code == 1 and json.loads(out)["findings"][0]["size"]["exact"] is True
    code, _, _ = cli(capsys, "verify", target, base)
    assert code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "{tmp}/nope", "{base}"], "no such file or directory"),
        (["verify", "{base}"], "give AFTER"),
        (["verify", "{base}", "{base}", "--format", "xml"], "verify supports --format table or json, not 'xml'"),
        (["verify", "{base}", "{base}", "--tolerate", "gremlins"], "unknown cause 'gremlins'"),
        (["verify", "{base}", "{base}", "--expect", "re:("], "not a regular expression"),
        (["verify", "{pickled}", "{base}"], "--allow-pickle"),
        (["verify", "{bad_json}", "{base}"], "not a peftaudit snapshot"),
        (["snapshot", "{truncated}"], "truncated"),
        (["snapshot", "{base}", "--sample", "-1"], "--sample must be 0 or more"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base, _ = checkpoints(tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((base / "model.safetensors").read_bytes()[:-1])
    paths = {
        "tmp": tmp_path,
        "base": base,
        "pickled": pickled,
        "bad_json": tmp_path / "bad.json",
        "truncated": truncated,
    }
    code, out, err = cli(capsys, *(a.format(**paths) for a in args))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("peftaudit: error: ") and message in err


def test_verdict_written_to_a_file_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, after = checkpoints(tmp_path)
    code, out, _ = cli(capsys, "verify", base, after, "--json", "-o", tmp_path / "verdict.json")
    assert code == 1 and out == ""
    assert json.loads((tmp_path / "verdict.json").read_text())["ok"] is False


def test_merged_model_and_adapter_audit_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny: Callable[..., Any], train: Callable[..., None]
) -> None:
    model = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    train(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    wrapped.merge_and_unload().save_pretrained(tmp_path / "merged")
    code, out, _ = cli(capsys, "verify", tmp_path / "base", tmp_path / "merged", "--adapter", tmp_path / "adapter")
    assert code == 0, out
    assert out.startswith("PASS: 21 tensors compared, 4 changed, 4/4 intended changed")
    code, out, _ = cli(capsys, "verify", tmp_path / "base", "--adapter", tmp_path / "adapter", "--expect", "lora_*")
    assert code == 0, out
    code, out, _ = cli(capsys, "verify", tmp_path / "base", tmp_path / "merged")  # no adapter: nothing may change
    assert code == 1 and "4 failures" in out.splitlines()[0]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)


def test_verifying_safetensors_never_imports_torch(tmp_path: Path) -> None:
    base, after = checkpoints(tmp_path)
    code = (
        "import sys\nfrom peftaudit.cli import main\n"
        f"rc = main(['verify', {str(base)!r}, {str(after)!r}, '--json'])\n"
        "print('RC', rc, 'TORCH', 'torch' in sys.modules, 'TRANSFORMERS', 'transformers' in sys.modules)"
    )
    result = run_python(code)
    assert result.stdout.strip().splitlines()[-1] == "RC 1 TORCH False TRANSFORMERS False", result.stderr


@pytest.mark.parametrize("command", ["snapshot", "verify"])
def test_help_imports_nothing_heavy(command: str) -> None:
    code = (
        "import sys\nfrom peftaudit.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'rich', 'numpy', 'safetensors')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))"
    )
    result = run_python(code)
    assert "usage: peftaudit " + command in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_snapshot_replaces_a_snapshot_but_nothing_else_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, after = checkpoints(tmp_path)
    target = tmp_path / "snap.json"
    assert cli(capsys, "snapshot", base, "-o", target)[0] == 0
    first = json.loads(target.read_text())
    code, _, err = cli(capsys, "snapshot", after, "-o", target)  # a snapshot may be replaced
    assert code == 0, err
    assert json.loads(target.read_text())["tensors"] != first["tensors"]
    weights = (base / "model.safetensors").read_bytes()
    code, out, err = cli(capsys, "snapshot", base, "-o", base / "model.safetensors")
    assert code == 2 and out == ""
    assert "is a file of the checkpoint being fingerprinted" in err and "--force" in err
    assert (base / "model.safetensors").read_bytes() == weights
    notes = tmp_path / "notes.json"
    notes.write_text('{"format": "something else"}')
    code, _, err = cli(capsys, "snapshot", base, "-o", notes)
    assert code == 2 and f"{notes}: is not a peftaudit snapshot" in err
    code, _, err = cli(capsys, "snapshot", base, "-o", notes, "--force")
    assert code == 0, err
    assert json.loads(notes.read_text())["format"] == "peftaudit-snapshot"


def test_snapshot_save_refuses_to_replace_what_is_not_a_snapshot(tmp_path: Path) -> None:
    from peftaudit.verification import SnapshotError, snapshot

    base, _ = checkpoints(tmp_path)
    snap = snapshot(base)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(SnapshotError, match="is not a peftaudit snapshot"):
        snap.save(other)
    assert other.read_bytes() == b"\x00" * 16
    snap.save(other, force=True)
    assert json.loads(other.read_text())["format"] == "peftaudit-snapshot"
