"""The docs site cannot rot: references generated from the code, fields and
commands documented, and the examples on its pages executed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from peftaudit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages whose examples are run: every page of the site, and the README.
PAGES = [*sorted(p for p in DOCS.glob("*.md") if p.name != "cli.md"), ROOT / "README.md"]

#: Tokens that keep a documented command from running here, and why. A command
#: naming one of them is skipped; every other ``peftaudit ...`` line must exit 0.
SKIPPED_TOKENS = {
    "./my-model/": "a local model directory the reader has, not the repository",
    "./model": "a local model directory the reader has",
    "model-dir/": "a local checkpoint directory",
    "base/": "the reader's base checkpoint",
    "before.json": "a snapshot written by an earlier, skipped command",
    "image-memory": "a command of the peftaudit-diffusers plugin (autoload is off here); its own tests run it",
}
#: Options that make a documented command too slow for the docs tests; run elsewhere in the suite.
SKIPPED_OPTIONS = {
    "--trace": "a real training step on fake tensors: slow; tests/memory/ covers the trace",
}
#: Documented commands that exit non-zero on purpose, with the code they must exit with.
EXPECTED_EXIT = {
    # Shows --fail-on gating CI: gpt2's Conv1D targets raise warnings, so it exits 1.
    "peftaudit recommend gpt2 --target-modules c_attn,c_proj --fail-on warning": 1,
}
FENCE = re.compile(r"^(?P<marker><!-- run -->\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)
SHELL_LANGS = {"", "console", "bash", "sh", "shell", "text"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fences(page: Path) -> list[tuple[bool, str, str]]:
    text = page.read_text(encoding="utf-8")
    return [(bool(m["marker"]), m["lang"], m["body"]) for m in FENCE.finditer(text)]


def _commands(body: str) -> list[str]:
    """``peftaudit ...`` lines of a shell block, continuations joined, ``$ `` prompts dropped."""
    lines = (line.strip().removeprefix("$ ") for line in body.replace("\\\n", " ").splitlines())
    return [line for line in lines if line.startswith("peftaudit ")]


def _documented_commands() -> list[tuple[str, str]]:
    """Each distinct documented command once (as its arguments), with the first page showing it."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for _, lang, body in _fences(page):
            if lang in SHELL_LANGS:
                for command in _commands(body):
                    seen.setdefault(shlex.join(["peftaudit", *_argv(command)]), page.name)
    return sorted(seen.items())


def _argv(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)[1:]
    for stop in (">", "|"):
        if stop in tokens:
            tokens = tokens[: tokens.index(stop)]
    return tokens


def _skip_reason(argv: list[str]) -> str | None:
    for token in argv:
        if token in SKIPPED_TOKENS:
            return f"{token}: {SKIPPED_TOKENS[token]}"
        if token in SKIPPED_OPTIONS:
            return f"{token}: {SKIPPED_OPTIONS[token]}"
    return None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# --- the CLI reference ------------------------------------------------------------------------


def test_cli_reference_is_current() -> None:
    generated = _load("gen_cli_reference").render()
    committed = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert committed == generated, "docs/cli.md is stale: run python docs/gen_cli_reference.py"


def test_cli_reference_names_every_command_and_option() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    missing = [opt for a in parser._actions for opt in a.option_strings if f"`{opt}" not in text]
    for name, sub in _subparsers(parser).items():
        if f"## peftaudit {name}\n" not in text:
            missing.append(f"command {name}")
        section = text.split(f"## peftaudit {name}\n", 1)[-1].split("\n## ", 1)[0]
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            missing += [
                f"{name} {opt}"
                for opt in action.option_strings
                if f"`{opt}" not in section and f", {opt}" not in section
            ]
    assert not missing, f"not in docs/cli.md: {missing}"


# --- the report's JSON ------------------------------------------------------------------------


def test_every_schema_field_is_documented() -> None:
    schema = json.loads((DOCS / "report.schema.json").read_text(encoding="utf-8"))
    page = (DOCS / "report-json.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    missing = sorted(set(schema["properties"]) - rows)
    assert not missing, f"top-level report fields without a row in docs/report-json.md: {missing}"


# --- the site ---------------------------------------------------------------------------------


def test_every_page_is_in_the_nav_and_every_picture_is_shown() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md")}
    missing = sorted(p for p in pages if f": {p}" not in config)
    assert not missing, f"pages missing from the mkdocs.yml nav: {missing}"
    shown = "".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    pictures = sorted(p.name for p in (DOCS / "img").glob("*.svg"))
    assert {"report.svg", "sizing.svg", "verify-failure.svg"} <= set(pictures)
    assert not [p for p in pictures if f"(img/{p})" not in shown], "a picture no page shows"


@pytest.mark.slow
def test_pictures_are_current(tmp_path: Path) -> None:
    _load("gen_pictures").write_all(tmp_path)
    for picture in ("report.svg", "sizing.svg", "verify-failure.svg"):
        committed = (DOCS / "img" / picture).read_text(encoding="utf-8")
        assert (tmp_path / picture).read_text(encoding="utf-8") == committed, (
            f"docs/img/{picture} is stale: run python docs/gen_pictures.py"
        )


# --- examples on the pages --------------------------------------------------------------------

COMMANDS = _documented_commands()


def test_docs_have_runnable_commands() -> None:
    runnable = [c for c, _ in COMMANDS if _skip_reason(_argv(c)) is None]
    assert len(runnable) >= 15, runnable


@pytest.mark.slow
@pytest.mark.parametrize(("command", "page"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_runs(
    command: str, page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _argv(command)
    reason = _skip_reason(argv)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # --plot, --output and the like write here
    code = main(argv)
    out, err = capsys.readouterr()
    expected = EXPECTED_EXIT.get(command, 0)
    assert code == expected, f"{page}: `{command}` exited {code}, not {expected}: {err.strip()}"
    assert out or list(tmp_path.iterdir()), f"{page}: `{command}` printed nothing"


PYTHON_BLOCKS = [
    (page.name, i, body)
    for page in PAGES
    for i, (marked, lang, body) in enumerate(_fences(page))
    if marked and lang == "python"
]


def test_marked_python_blocks_exist() -> None:
    assert {"api.md", "recommend.md", "schema.md"} <= {page for page, _, _ in PYTHON_BLOCKS}


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index", "body"), PYTHON_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in PYTHON_BLOCKS])
def test_marked_python_block_runs(page: str, index: int, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = compile(body, f"{page} (block {index})", "exec")
    exec(code, {"__name__": f"docs_example_{index}"})


@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
