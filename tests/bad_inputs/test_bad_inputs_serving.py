"""Bad-input rows for ``peftaudit serve`` (issue 17): flags vLLM would refuse, and adapters we must not load.

Every row runs ``python -m peftaudit`` in its own process. Most are refused before the model is built
(the serving plan is checked first), so they cost a fresh interpreter and no more; the pickle row builds
the model and proves the pickled adapter is refused without being unpickled. The same inputs and the ones
that need the model (tensor-parallel sizes, ranks, targets, releases, encoders) run in-process in
``tests/serving/test_serving_cli.py``.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
from bad_input_corpus import Case, run_case

SERVE = ["serve", "meta-llama/Llama-3.1-8B", "--gpu", "L4"]


def _pickled_adapter(tmp: Path) -> None:
    """An adapter folder holding only ``adapter_model.bin``, a pickle that creates ``unpickled`` when loaded."""
    folder = tmp / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Touch(tmp / "unpickled")}))


class _Touch:
    """Unpickles as ``Path.touch(path)``: the file exists afterwards only if someone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.path,))


def _not_unpickled(tmp: Path, _: subprocess.CompletedProcess[str]) -> None:
    assert not (tmp / "unpickled").exists(), "the adapter's pickle was loaded"


CASES = [
    Case("17-serve-context-0", [*SERVE, "--context", "0"], stderr=r"--context must be at least 1, got 0"),
    Case("17-serve-context-8k", [*SERVE, "--context", "8k"], stderr=r"--context.*'8k'"),
    Case("17-serve-concurrency-0", [*SERVE, "--concurrency", "0"], stderr=r"--concurrency must be at least 1"),
    Case(
        "17-serve-utilization-1.5",
        [*SERVE, "--gpu-memory-utilization", "1.5", "--format", "json"],
        stderr=r"--gpu-memory-utilization must be above 0 and at most 1, got 1\.5",
    ),
    Case("17-serve-utilization-0", [*SERVE, "--gpu-memory-utilization", "0"], stderr=r"--gpu-memory-utilization"),
    Case("17-serve-block-size-0", [*SERVE, "--block-size", "0"], stderr=r"--block-size must be at least 1"),
    Case("17-serve-max-lora-rank-0", [*SERVE, "--max-lora-rank", "0"], stderr=r"--max-lora-rank must be at least 1"),
    Case(
        "17-serve-max-cpu-loras",
        [*SERVE, "--max-cpu-loras", "1", "--max-loras", "2"],
        stderr=r"--max-cpu-loras \(1\) must be at least --max-loras \(2\)",
    ),
    Case(
        "17-serve-transformers-utilization",
        [*SERVE, "--engine", "transformers", "--gpu-memory-utilization", "0.5"],
        stderr=r"--gpu-memory-utilization appl(y|ies) to --engine vllm only",
    ),
    Case("17-serve-format-html", [*SERVE, "--format", "html"], stderr=r"--format .*'html'"),
    Case("17-serve-unknown-gpu", ["serve", "meta-llama/Llama-3.1-8B", "--gpu", "NOPE"], stderr=r"unknown GPU 'NOPE'"),
    Case(
        "17-serve-adapter-pickle-only",
        [*SERVE, "--adapter", "{tmp}/adapter", "--format", "json"],
        stderr=r"adapter_model\.bin \(pickle\); peftaudit never unpickles",
        setup=_pickled_adapter,
        check=_not_unpickled,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)
