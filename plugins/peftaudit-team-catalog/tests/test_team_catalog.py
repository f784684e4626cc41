"""The team-catalog plugin, loaded the way users get it: through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "tie_word_embeddings": False,
}
# Embedding + head (128x64 each), 2 layers of q,o (64x64) k,v (32x64) gate,up,down (128x64), 2 norms, final norm.
LLAMA_TOTAL = 2 * 128 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) + 64


def run(*args: str, folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEFTAUDIT_TEAM_CATALOG": str(folder), "PEFTAUDIT_NO_CACHE": "1"}
    env.pop("PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD", None)  # the entry point is what we test
    return subprocess.run(
        [sys.executable, "-m", "peftaudit", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "our-llama.json").write_text(json.dumps(LLAMA))
    entry = {
        "id": "acme/our-llama-pinned",
        "config": LLAMA,
        "published_params": {"total": LLAMA_TOTAL, "source": "our model card"},
    }
    (tmp_path / "Pinned.json").write_text(json.dumps(entry))
    (tmp_path / "broken.json").write_text('{"model_type": "llama", "hidden_size": ')
    return tmp_path


def test_plugin_is_loaded_from_its_entry_point(folder: Path) -> None:
    result = run("plugins", "--json", folder=folder)
    assert result.returncode == 0, result.stderr
    names = [row["name"] for row in json.loads(result.stdout)]
    assert any(n.startswith("team_catalog (peftaudit-team-catalog") for n in names)


def test_plain_config_is_reported(folder: Path) -> None:
    result = run("report", "team:our-llama", "--json", folder=folder)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["source"] == "team-catalog"
    assert data["params"]["total"] == LLAMA_TOTAL


def test_catalog_entry_keeps_its_id_and_published_count(folder: Path) -> None:
    data = json.loads(run("report", "TEAM:pinned", "--json", folder=folder).stdout)
    assert data["model"]["id"] == "acme/our-llama-pinned"
    assert data["published"] == {"value": LLAMA_TOTAL, "source": "our model card", "matches": True}


@pytest.mark.parametrize(
    ("spec", "message"),
    [("team:missing", "no missing.json in"), ("team:broken", "not valid JSON"), ("team:../etc", "without folders")],
)
def test_errors_are_one_line(folder: Path, spec: str, message: str) -> None:
    result = run("report", spec, folder=folder)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_autoload_can_be_turned_off(folder: Path) -> None:
    env = {**os.environ, "PEFTAUDIT_TEAM_CATALOG": str(folder), "PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "peftaudit", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert not any(r["name"].startswith("team_catalog") for r in json.loads(result.stdout))
