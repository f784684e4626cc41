"""Golden files for everything a user reads: every command, in every format it prints.

These pin the rendered output byte for byte, so a restructuring that moves code
around is proven not to change what users see. ``./dev test --update-golden``
(or ``PEFTAUDIT_UPDATE_GOLDEN=1``) rewrites them; review the diff before committing.

Every command runs in-process on bundled catalog models (offline, no cache),
at a fixed width and without colour. The verifier's rows compare real
safetensors files written by the test; their temporary paths are replaced by
``<tmp>`` (and peftaudit's version by ``<version>``) so the files do not depend
on where the test ran or on a release.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import assert_matches_golden

from peftaudit import __version__
from peftaudit.cli import main

LLAMA_1B = "meta-llama/Llama-3.2-1B"
LLAMA_8B = "meta-llama/Llama-3.1-8B"

#: name -> the command line (``--width`` and ``--no-cache`` are added where the command takes them).
COMMANDS: dict[str, list[str]] = {
    "report": ["report", "openai-community/gpt2", "--no-cache"],
    # The counts alone, as the report printed before it showed memory and the recommendation.
    "report-params-only": ["report", "openai-community/gpt2", "--no-cache", "--params-only"],
    # The memory table where the classes differ: full needs 80 GB, LoRA 48 GB, QLoRA 24 GB.
    "report-8b": ["report", LLAMA_8B, "--no-cache"],
    "report-tree": ["report", "openai-community/gpt2", "--no-cache", "--tree"],
    "findings": ["report", "openai-community/gpt2", "--no-cache", "--checks"],
    "memory": ["report", LLAMA_1B, "--no-cache", "--compare", "full,lora,qlora", "--seq-len", "1024"],
    "memory-one": [
        "report",
        LLAMA_8B,
        "--no-cache",
        "--method",
        "qlora",
        "--rank",
        "16",
        "--batch-size",
        "4",
        "--gradient-checkpointing",
    ],
    "recommend": ["recommend", LLAMA_8B, "--gpu", "A10G", "--task", "instruct", "--tokens", "20M"],
    "gpus": ["gpus", LLAMA_8B, "--method", "qlora", "--seq-len", "4096"],
    "gpu-list": ["gpus"],
    "fit": ["fit", LLAMA_8B, "--gpu", "RTX4090", "--method", "lora"],
    "plan": ["plan", "Qwen/Qwen2.5-7B", "--tokens", "500M", "--gpu", "H100", "--price", "2.5"],
    "catalog": ["catalog", "--family", "llama"],
    # Serving (issue 17): one GPU, every GPU ranked, and LoRA slots for 10 adapters, 4 per batch.
    "serve": ["serve", LLAMA_8B, "--gpu", "L4", "--context", "8192"],
    "serve-ranking": ["serve", LLAMA_8B, "--context", "8192"],
    "serve-adapters": ["serve", LLAMA_8B, "--gpu", "L4", "--context", "8192", "--adapters", "10", "--max-loras", "4"],
}

#: The formats each command prints (a command that prints only tables and JSON refuses markdown).
FORMATS: dict[str, tuple[str, ...]] = {
    "report": ("table", "markdown", "json"),
    "report-params-only": ("table", "markdown"),
    "report-8b": ("table", "markdown", "json", "html"),
    "report-tree": ("table", "markdown"),
    "findings": ("table", "markdown", "json"),
    "memory": ("table", "markdown", "json", "html"),
    "memory-one": ("table", "json"),
    "recommend": ("table", "markdown", "json"),
    "gpus": ("table", "json"),
    "gpu-list": ("table", "json"),
    "fit": ("table", "json"),
    "plan": ("table", "json"),
    "catalog": ("table", "json"),
    "serve": ("table", "markdown", "json"),
    "serve-ranking": ("table", "markdown", "json"),
    "serve-adapters": ("table", "markdown", "json"),
    "verify": ("table", "json"),
    "verify-failing": ("table", "json"),
}

SUFFIX = {"table": "txt", "markdown": "md", "json": "json", "html": "html"}

CASES = [(name, fmt) for name, formats in FORMATS.items() for fmt in formats]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_output_matches_golden(name: str, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if name.startswith("verify"):
        argv = verify_argv(tmp_path, failing=name == "verify-failing")
    else:
        argv = list(COMMANDS[name])
    argv += ["--format", fmt]
    if fmt != "json":
        argv += ["--width", "100"]
    code, out = run(argv, capsys)
    assert code == (1 if name == "verify-failing" else 0), out
    version = f'"peftaudit_version": "{__version__}"'
    out = out.replace(str(tmp_path), "<tmp>").replace(version, '"peftaudit_version": "<version>"')
    out = out.replace(f"peftaudit {__version__}", "peftaudit <version>")  # the HTML page's generator and footer
    assert out.strip(), f"{name} printed nothing"
    assert_matches_golden(out, f"cli/{name}.{SUFFIX[fmt]}")


def verify_argv(tmp: Path, *, failing: bool) -> list[str]:
    """Two real safetensors checkpoints: a fine-tune that changed only what it should, or one that did not."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(16, 8, generator=generator),
        "layers.0.q_proj.weight": torch.randn(8, 8, generator=generator),
        "layers.0.v_proj.weight": torch.randn(8, 8, generator=generator),
        "layers.0.mlp.weight": torch.randn(8, 8, generator=generator),
    }
    after = dict(base)
    after["layers.0.q_proj.weight"] = base["layers.0.q_proj.weight"] + 0.01
    after["layers.0.v_proj.weight"] = base["layers.0.v_proj.weight"] + 0.01
    if failing:
        after["layers.0.mlp.weight"] = base["layers.0.mlp.weight"] * 2
    for name, tensors in (("base", base), ("tuned", after)):
        (tmp / name).mkdir()
        save_file(tensors, str(tmp / name / "model.safetensors"))
    return ["verify", str(tmp / "base"), str(tmp / "tuned"), "--expect", "re:q_proj|v_proj", "--no-progress"]
