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
    result = run("report", "diffusers:sdxl/unet", "--json")
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
        result = run("report", spec, "--json")
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
