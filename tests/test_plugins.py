"""The plugin core: built-ins through public hooks, runtime registration, refusal of unknown hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import peftaudit
from peftaudit import plugins
from peftaudit.architecture import ArchitectureRule, ModuleRole
from peftaudit.errors import PluginError
from peftaudit.inventory import take_inventory
from peftaudit.render import RenderOptions
from peftaudit.report import Report, audit
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
    from pathlib import Path

    from peftaudit import hookspecs

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("peftaudit_")]
    assert hooks
    assert [h for h in hooks if f"`{h}(" not in doc] == []
