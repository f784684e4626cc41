"""The plugin as users get it: loaded from its entry point by ``peftaudit`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peftaudit_diffusers.bundled import entry


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEFTAUDIT_NO_CACHE": "1"}
    env.pop("PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD", None)  # the entry point is what we test
    return subprocess.run(
        [sys.executable, "-m", "peftaudit", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.slow
def test_sdxl_unet_report_as_json() -> None:
    result = run("report", "diffusers:sdxl/unet", "--params-only", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["source"] == "diffusers"
    assert data["model"]["model_type"] == "diffusers-unet-2d-condition"
    assert data["params"]["total"] == 2_567_463_684
    assert data["published"]["value"] == 2_567_463_684 and data["published"]["matches"] is True


@pytest.mark.slow
def test_local_diffusers_folder(tmp_path: Path) -> None:
    sd15 = entry("stable-diffusion-v1-5/unet")
    assert sd15 is not None
    (tmp_path / "config.json").write_text(json.dumps(sd15["config"]))
    for spec in (str(tmp_path), f"diffusers:{tmp_path}"):
        result = run("report", spec, "--params-only", "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["model"]["source"] == "diffusers"
        assert data["params"]["total"] == 859_520_964


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("diffusers:sdxl/vae", "no bundled diffusers config 'sdxl/vae'; known:"),
        ("diffusers:", "name a model"),
        ("diffusers:./no-such-folder", "no config.json in"),
        ("diffusers:{bad_json}", "not valid JSON"),
        ("diffusers:{vae}", "'AutoencoderKL' is not one of"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path: Path, spec: str, message: str) -> None:
    bad, vae = tmp_path / "bad", tmp_path / "vae"
    bad.mkdir()
    vae.mkdir()
    (bad / "config.json").write_text('{"_class_name": "UNet2DConditionModel", ')
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    result = run("report", spec.format(bad_json=bad, vae=vae))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# --- peftaudit image-memory (added by the plugin's peftaudit_register_commands) -----------------------


def test_image_memory_is_a_peftaudit_command() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "image-memory" in result.stdout
    result = run("image-memory", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--resolution", "--method", "--batch-size", "--gradient-checkpointing", "--format"):
        assert option in result.stdout


@pytest.mark.slow
def test_image_memory_json_is_the_python_estimate() -> None:
    from peftaudit_diffusers.memory import estimate_image_training

    argv = ["diffusers:sdxl/unet", "--resolution", "1024", "--method", "lora", "--batch-size", "2"]
    result = run("image-memory", *argv, "--gradient-checkpointing", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == estimate_image_training("sdxl/unet", "lora", 1024, 2, True).to_dict()


@pytest.mark.slow
def test_image_memory_table() -> None:
    result = run("image-memory", "stable-diffusion-v1-5/unet", "--resolution", "512")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "stable-diffusion-v1-5/unet: lora, 512 px, batch 1, no gradient checkpointing"
    rows = {
        line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in lines if line.endswith(tuple("0123456789"))
    }
    assert rows["base weights"] == f"{859_520_964 * 2 / 1024**3:.2f}"
    assert "total" in rows and "activations" in rows


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sdxl/unet", "--resolution", "1001"], "resolution 1001 must be a positive multiple of 8"),
        (["sdxl/unet", "--method", "qlora"], "image training memory covers methods lora, full, not 'qlora'"),
        (["sdxl/unet", "--batch-size", "0"], "batch size must be a positive integer"),
        (["sdxl/vae"], "no bundled diffusers config 'sdxl/vae'"),
        (["sdxl/unet", "--resolution", "big"], "argument --resolution: invalid int value: 'big'"),
        (["sdxl/unet", "--format", "csv"], "argument --format: invalid choice: 'csv'"),
    ],
)
def test_image_memory_bad_input_is_a_one_line_error(argv: list[str], message: str) -> None:
    result = run("image-memory", *argv)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == ""
