"""The plugin core: built-ins through public hooks, runtime registration, refusal of unknown hooks."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import peftaudit
from peftaudit import plugins
from peftaudit.architecture import ArchitectureRule, ModuleRole
from peftaudit.errors import PeftauditError, PluginError
from peftaudit.inventory import take_inventory
from peftaudit.report import Report, audit
from peftaudit.report.render import RenderOptions
from peftaudit.sources.base import ResolvedModel, SourceOptions


@pytest.fixture(autouse=True)
def fresh_plugin_manager() -> Iterator[None]:
    plugins.reset()
    yield
    plugins.reset()


def test_builtins_are_registered_like_any_plugin() -> None:
    names = [name for name, _ in plugins.describe()]
    assert names == list(plugins.DEFAULT_PLUGINS)
    assert [s.name for s in plugins.sources()] == ["local", "catalog", "hub"]
    assert {"table", "json", "markdown"} <= set(plugins.renderers())


def test_unknown_hook_implementation_is_refused() -> None:
    class Typo:
        @peftaudit.hookimpl
        def peftaudit_register_gpu(self, register: Callable[[Any], None]) -> None:  # not a declared hook
            pass

    with pytest.raises(PluginError, match="peftaudit_register_gpu"):
        plugins.register_plugin(Typo(), name="typo")


def test_a_plugin_source_is_asked_in_priority_order() -> None:
    from tiny import TINY

    class Zoo:
        name = "zoo"
        priority = 150

        def resolve(self, spec: str, options: SourceOptions) -> ResolvedModel | None:
            if spec != "zoo:llama":
                return None
            return ResolvedModel(id=spec, source=self.name, config=TINY["llama"], origin="zoo")

        def build(self, resolved: ResolvedModel, options: SourceOptions) -> Any:
            from peftaudit.sources.build import build_from_config

            return build_from_config(resolved.config, model_id=resolved.id)

    class ZooPlugin:
        @peftaudit.hookimpl
        def peftaudit_register_sources(self, register: Callable[[Any], None]) -> None:
            register(Zoo())

    plugins.register_plugin(ZooPlugin(), name="zoo")
    assert [s.name for s in plugins.sources()] == ["local", "zoo", "catalog", "hub"]
    report = audit("zoo:llama", use_cache=False)
    assert report.model.source == "zoo"
    assert report.params.total > 0


def test_plugin_architecture_rules_win_over_builtins() -> None:
    from tiny import build

    class Rules:
        @peftaudit.hookimpl
        def peftaudit_register_architecture_rules(self, register: Callable[[ArchitectureRule], None]) -> None:
            # Pretend this team calls Llama's up projection an attention value projection.
            register(ArchitectureRule(r"\.up_proj$", ModuleRole.ATTENTION_V, model_types=("llama",)))

    model = build("llama")
    before = take_inventory(model).module("model.layers.0.mlp.up_proj")
    plugins.register_plugin(Rules(), name="rules")
    after = take_inventory(model).module("model.layers.0.mlp.up_proj")
    assert before is not None and before.role == ModuleRole.MLP_UP
    assert after is not None and after.role == ModuleRole.ATTENTION_V


def test_a_plugin_renderer_is_a_new_format(capsys: pytest.CaptureFixture[str]) -> None:
    class Csv:
        name = "csv"
        description = "layers as CSV"

        def render(self, report: Report, options: RenderOptions) -> str:
            return "".join(f"{r.name},{r.weights},{r.biases}\n" for r in report.layers)

    plugins.register_plugin(
        SimpleNamespace(peftaudit_register_renderers=peftaudit.hookimpl(lambda register: register(Csv()))),
        name="csv",
    )
    from peftaudit.cli import main

    assert main(["report", "gpt2", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "transformer.wte,38597376,0"
    assert sum(int(x.split(",")[1]) + int(x.split(",")[2]) for x in lines) == 124_439_808


def test_autoload_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    assert plugins._autoload_disabled()
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")
    assert not plugins._autoload_disabled()


def test_every_hook_is_documented() -> None:
    from peftaudit import hookspecs

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("peftaudit_")]
    assert hooks
    assert [h for h in hooks if f"`{h}(" not in doc] == []


# --- the plugin API ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_the_plugin_api_names_what_it_exports() -> None:
    from peftaudit import plugin_api

    for name in plugin_api.__all__:
        assert getattr(plugin_api, name) is not None, name
    assert plugin_api.hookimpl is peftaudit.hookimpl
    assert plugin_api.ArchitectureRule is ArchitectureRule
    assert plugin_api.memory_methods is plugins.memory_methods
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        plugin_api.nothing  # noqa: B018


def test_importing_the_plugin_api_is_cheap() -> None:
    # Every plugin imports it when peftaudit loads plugins, and that happens for --help too.
    from test_cli import imports_after

    modules = imports_after("import peftaudit.plugin_api")
    assert not modules & {"torch", "transformers", "rich", "huggingface_hub", "numpy", "yaml"}


def _peftaudit_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Each ``import peftaudit...`` / ``from peftaudit... import`` in a file: (line, module, names)."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "peftaudit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "peftaudit":
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return found


def test_first_party_plugins_import_only_the_plugin_api() -> None:
    sources = [
        p
        for p in sorted(ROOT.glob("plugins/*/*/**/*.py"))
        if p.parts[len(ROOT.parts) + 2] not in ("tests",) and ".egg-info" not in str(p)
    ]
    assert {p.parts[len(ROOT.parts) + 1] for p in sources} == {
        "peftaudit-diffusers",
        "peftaudit-example",
        "peftaudit-team-catalog",
    }
    stray = []
    for path in sources:
        for line, module, names in _peftaudit_imports(path):
            allowed = module == "peftaudit.plugin_api" or (
                module == "peftaudit" and names and set(names) <= set(peftaudit.__all__)
            )
            if not allowed:
                stray.append(f"{path.relative_to(ROOT)}:{line}: {module} {names}")
    assert stray == []


# --- plugin commands ----------------------------------------------------------------------------------


class Hello:
    """A plugin adding ``peftaudit hello NAME``."""

    @peftaudit.hookimpl
    def peftaudit_register_commands(self, subparsers: Any) -> None:
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("name")
        parser.set_defaults(run=self.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.name == "nobody":
            raise PeftauditError("nobody to greet")
        print(f"hello {args.name}")
        return 0


def test_a_plugin_adds_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.cli import build_parser, main

    builtin = list(_commands(build_parser()))
    plugins.register_plugin(Hello(), name="hello")
    assert list(_commands(build_parser())) == [*builtin, "hello"]  # after the built-ins
    assert main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert main(["hello", "nobody"]) == 2
    assert capsys.readouterr().err == "peftaudit: error: nobody to greet\n"
    assert "hello" in [name for name, hooks in plugins.describe() if "peftaudit_register_commands" in hooks]


def test_a_plugin_command_cannot_replace_a_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    from peftaudit.cli import build_parser

    class Shadow:
        @peftaudit.hookimpl
        def peftaudit_register_commands(self, subparsers: Any) -> None:
            subparsers.add_parser("report")

    plugins.register_plugin(Shadow(), name="shadow")
    assert "report" in _commands(build_parser())
    err = capsys.readouterr().err
    assert err.startswith("peftaudit: note: a plugin could not add its commands: ArgumentError")
    assert "conflicting subparser: report" in err and len(err.splitlines()) == 1


def test_a_plugin_that_cannot_load_leaves_help_working(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftaudit.cli import build_parser

    def broken() -> Any:
        raise PluginError("could not load a 'peftaudit' plugin: boom")

    monkeypatch.setattr(plugins, "get_plugin_manager", broken)
    assert "report" in _commands(build_parser())


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# --- collections ------------------------------------------------------------------------------------


def test_every_collection_is_refreshed_when_plugins_change() -> None:
    calls: list[int] = []

    @plugins.collection
    def counted() -> int:
        calls.append(1)
        return len(calls)

    assert counted() == counted() == 1
    plugins.register_plugin(Hello(), name="hello")
    assert counted() == 2
    plugins.reset()
    assert counted() == 3
