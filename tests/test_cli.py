"""The command line from the outside: exit codes, one-line errors, parseable output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftaudit.cli import main

PYTHON = sys.executable


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m peftaudit ARGS`` in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([PYTHON, "-m", "peftaudit", *args], capture_output=True, text=True, env=full_env, timeout=120)


def imports_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the top-level modules it imported."""
    script = f"import sys\n{code}\nprint('MODULES', ' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag: str) -> None:
    modules = imports_after(f"from peftaudit.cli import main\ntry:\n    main([{flag!r}])\nexcept SystemExit:\n    pass")
    assert "peftaudit" in modules
    assert not modules & {"torch", "transformers", "rich", "huggingface_hub"}


def test_version_output(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftaudit {__version__}"


def test_report_json_from_the_catalog_is_parseable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "openai-community/gpt2", "--format", "json", "--no-cache", "--params-only"])
    out = capsys.readouterr()
    assert code == 0
    data = json.loads(out.out)
    assert data["model"]["id"] == "openai-community/gpt2"
    assert data["model"]["source"] == "catalog"
    assert data["params"]["total"] == 124_439_808
    assert data["published"]["matches"] is True


def test_json_flag_equals_format_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["report", "gpt2", "--json"])
    a = capsys.readouterr().out
    main(["report", "gpt2", "--format", "json"])
    b = capsys.readouterr().out
    assert json.loads(a) == json.loads(b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "acme/no-such-model-anywhere"], "'acme/no-such-model-anywhere'"),
        (["report", "./missing-dir/"], "no such file or directory"),
        (["report", "gpt2", "--format", "yaml"], "unknown --format 'yaml'"),
        (["report", "gpt2", "--width", "0"], "expected a positive integer"),
        (["report", "gpt2", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["report"], "the following arguments are required: MODEL"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["catalog", "--family", "nope"], "no catalog family 'nope'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("peftaudit: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_malformed_config_through_the_real_process(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 4')
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("peftaudit: error: ")
    assert "not valid JSON" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_output_file_is_written_whole_or_not_at_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.json"
    assert main(["report", "gpt2", "--json", "--params-only", "-o", str(target)]) == 0
    assert json.loads(target.read_text())["params"]["total"] == 124_439_808
    before = target.read_text()
    assert main(["report", "acme/nothing-here", "--json", "-o", str(target)]) == 2
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert capsys.readouterr().out == ""


def test_notes_go_to_stderr_and_stdout_stays_json(tmp_path: Path) -> None:
    # --online with the hub unreachable (offline) falls back to the catalog and says so on stderr.
    result = run_cli("report", "gpt2", "--online", "--json", "--params-only", env={"HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["source"] == "catalog"
    assert "bundled catalog" in result.stderr


def test_second_report_is_cached_and_does_not_import_torch(tmp_path: Path) -> None:
    env = {"PEFTAUDIT_CACHE_DIR": str(tmp_path / "cache")}
    code = "from peftaudit.cli import main\nrc = main(['report', 'Qwen/Qwen2.5-0.5B', '--json'])\nassert rc == 0"
    first = imports_after(code, env)
    assert "torch" in first
    second = imports_after(code, env)
    assert "torch" not in second and "transformers" not in second
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_corrupt_cache_entry_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(tmp_path))
    assert main(["report", "gpt2", "--json"]) == 0
    good = json.loads(capsys.readouterr().out)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"schema_version": 1, "trunc')
    assert main(["report", "gpt2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == good


def test_tree_flag_shows_collapsed_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "gpt2", "--tree", "--params-only", "--width", "80"]) == 0
    out = capsys.readouterr().out
    assert "0-11 (x12)  GPT2Block  7,087,872" in out


def test_no_color_and_non_tty_output_has_no_escape_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "gpt2"]) == 0
    assert "\x1b[" not in capsys.readouterr().out


def test_catalog_lists_at_least_30_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 30
    assert {"meta-llama/Llama-3.1-8B", "openai-community/gpt2"} <= {r["id"] for r in rows}


def test_plugins_lists_builtins_and_their_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r["hooks"] for r in json.loads(capsys.readouterr().out)}
    assert rows["peftaudit.builtin.sources"] == ["peftaudit_register_sources"]
    assert "peftaudit_register_renderers" in rows["peftaudit.builtin.renderers"]


def test_an_internal_error_is_one_line_exit_3_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import peftaudit.commands.catalog as catalog_command

    def broken(args: object) -> int:
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(catalog_command, "run", broken)
    assert main(["catalog"]) == 3
    err = capsys.readouterr().err
    expected = "RuntimeError: something went wrong (a bug: PEFTAUDIT_DEBUG=1 shows the traceback)"
    assert err == f"peftaudit: internal error: {expected}\n"
    monkeypatch.setenv("PEFTAUDIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="went wrong"):
        main(["catalog"])


@pytest.mark.parametrize("command", ["catalog", "plugins", "gpus"])
def test_table_or_json_commands_refuse_other_formats(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--format", "markdown"]) == 2
    assert capsys.readouterr().err == f"peftaudit: error: {command} supports --format table or json, not 'markdown'\n"
