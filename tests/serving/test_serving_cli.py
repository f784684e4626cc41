"""``peftaudit serve`` through the real CLI entry (``peftaudit.cli.main``): its JSON's arithmetic, GPU
counts, engines, saved adapters, ``-o`` and bad input.

The expected numbers come from outside peftaudit: Llama-3.1-8B's published config (32 layers, 32 query
and 8 key/value heads of 128, hidden 4096: https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json),
vLLM's own block and concurrency rules (restated where used, with file:line), and real peft adapters
saved here, read back with safetensors. What users read is pinned by ``tests/test_golden_outputs.py``
(``serve``, ``serve-ranking``, ``serve-adapters``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bad_input_corpus import strict_json
from tiny import TINY

from peftaudit.cli import main

LLAMA_8B = "meta-llama/Llama-3.1-8B"
LLAMA_70B = "meta-llama/Llama-3.1-70B"
SMOL = "HuggingFaceTB/SmolLM2-135M"
BERT = "google-bert/bert-base-uncased"

# Llama-3.1-8B's config.json (see the module docstring).
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 4096 // 32
#: vLLM 0.11 ``LoRAConfig.__post_init__`` ``possible_max_ranks`` (vllm/config/lora.py:104).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

L4_8K = [LLAMA_8B, "--gpu", "L4", "--context", "8192"]


def serve(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``peftaudit serve ARGV`` in-process: (exit code, stdout, stderr); argparse's exits are caught."""
    try:
        code = main(["serve", *argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def serve_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """The JSON of a run that must succeed, parsed strictly (no NaN, no Infinity)."""
    code, out, err = serve(capsys, *argv, "--format", "json")
    assert code == 0, err
    data = strict_json(out)
    assert isinstance(data, dict)
    return data


def estimate(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """The one-GPU estimate (``--gpu`` given)."""
    result = serve_json(capsys, *argv)["estimate"]
    assert isinstance(result, dict)
    return result


def numbers(value: Any) -> Iterator[float]:
    """Every number anywhere in a parsed JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


# ---------------------------------------------------------------- the estimate's arithmetic

#: vLLM plans on Llama-3.1-8B (a uniform model: one KV-cache group of all 32 layers), one GPU of the group.
VLLM_PLANS: dict[str, list[str]] = {
    "l4": L4_8K,
    "tp2": [*L4_8K, "-tp", "2"],
    "v0.6": [*L4_8K, "--vllm-version", "0.6"],
    "v0.20-graphs-budgeted": [*L4_8K, "--vllm-version", "0.20"],
    "adapters": [*L4_8K, "--adapters", "3", "--max-loras", "2", "--max-lora-rank", "32"],
    "fp8-cache-block32": [*L4_8K[:-1], "4000", "--kv-cache-dtype", "fp8", "--block-size", "32"],
    "h100-fp8-eager": [LLAMA_8B, "--gpu", "H100 SXM", "--context", "32768", "-q", "fp8", "--enforce-eager"],
    "util-0.5-tp4": [*L4_8K, "--gpu-memory-utilization", "0.5", "-tp", "4"],
    "70b-does-not-start": [LLAMA_70B, "--gpu", "L4", "--context", "8192", "-tp", "1"],
}


@pytest.mark.parametrize("argv", list(VLLM_PLANS.values()), ids=list(VLLM_PLANS))
def test_vllm_terms_add_up_to_the_kv_cache_and_its_blocks(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    e = estimate(capsys, *argv)
    if e["model"] != LLAMA_8B:
        assert not e["starts"] and not e["fits"] and e["blocks"] == 0 and e["kv_cache_bytes"] < 0
        return
    # vLLM determine_available_memory: requested - weights - peak activation - non-torch [- graphs, 0.20 on].
    graphs = e["cuda_graph_bytes"] if e["graphs_budgeted"] else 0
    taken = e["weights_bytes"] + e["lora_bytes"] + e["activation_bytes"] + e["non_torch_bytes"] + graphs
    assert e["requested_bytes"] - taken == e["kv_cache_bytes"]
    assert e["requested_bytes"] == math.ceil(e["total_bytes"] * e["gpu_memory_utilization"])
    assert e["activation_bytes"] == max(e["forward_bytes"], e["sampler_bytes"])
    assert e["graphs_budgeted"] == (argv[-2:] == ["--vllm-version", "0.20"])

    # The cache's page from the published config: K and V, this GPU's KV heads, head_dim, block_size tokens.
    tp = e["tensor_parallel"]
    kv_bytes = 1 if "fp8" in argv and "--kv-cache-dtype" in argv else 2
    per_layer_token = 2 * (KV_HEADS // tp) * HEAD_DIM * kv_bytes
    assert e["kv_bytes_per_token"] == LAYERS * per_layer_token
    assert e["sequence_bytes"] == e["max_model_len"] * e["kv_bytes_per_token"]
    page = per_layer_token * e["block_size"]
    # get_num_blocks (V1): bytes // page // layers per group; V0: bytes // (page x layers). Same for one group.
    assert e["blocks"] == e["kv_cache_bytes"] // page // LAYERS
    per_request = -(-e["max_model_len"] // e["block_size"])
    if e["release"] == "0.6":  # V0's log: blocks x block_size / max_model_len
        assert e["max_concurrency"] == pytest.approx(e["blocks"] * e["block_size"] / e["max_model_len"], rel=1e-12)
    else:  # V1 get_max_concurrency_for_kv_cache_config: blocks / blocks per request
        assert e["max_concurrency"] == pytest.approx(e["blocks"] / per_request, rel=1e-12)
    if e["release"] in ("0.6", "0.11"):
        assert e["kv_cache_tokens"] == e["blocks"] * e["block_size"]
    else:  # 0.21 on print max concurrency x max_model_len
        assert e["kv_cache_tokens"] == int(e["max_concurrency"] * e["max_model_len"])
    assert e["starts"] == (e["blocks"] >= per_request)
    assert e["served_concurrency"] == min(math.floor(e["max_concurrency"]), e["max_num_seqs"])


def test_tensor_parallel_halves_the_kv_cache_per_gpu_until_the_kv_heads_run_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    per_token = {tp: estimate(capsys, *L4_8K, "-tp", str(tp)) for tp in (1, 2, 4, 8, 16)}
    assert per_token[1]["kv_bytes_per_token"] == 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # 128 KiB in bf16
    for tp in (2, 4, 8):
        assert per_token[tp]["kv_bytes_per_token"] * 2 == per_token[tp // 2]["kv_bytes_per_token"], tp
        assert per_token[tp]["kv_heads_per_gpu"] == KV_HEADS // tp
        assert per_token[tp]["kv_heads_divide"]
    # 16 GPUs, 8 KV heads: vLLM replicates them, one per GPU, so nothing shrinks past 8.
    past = per_token[16]
    assert past["kv_bytes_per_token"] == per_token[8]["kv_bytes_per_token"]
    assert past["kv_heads_per_gpu"] == 1 and not past["kv_heads_divide"]
    assert any("do not divide over 16 GPUs" in note for note in past["notes"])
    code, out, _ = serve(capsys, *L4_8K, "-tp", "16", "--width", "200")
    assert code == 0 and "the KV heads do not divide over 16 GPUs" in out


@pytest.mark.parametrize(
    ("model", "gpu"),
    [(LLAMA_70B, "L4"), (LLAMA_70B, "A100 80GB"), (LLAMA_8B, "T4"), (LLAMA_8B, "L4")],
    ids=["70b-l4", "70b-a100-80gb", "8b-t4", "8b-l4"],
)
def test_the_fewest_gpus_that_fit_are_chosen(model: str, gpu: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [model, "--gpu", gpu, "--context", "8192"]
    explicit = {n: estimate(capsys, *argv, "-tp", str(n))["fits"] for n in (1, 2, 4, 8)}
    fewest = min(n for n, fits in explicit.items() if fits)
    chosen = estimate(capsys, *argv)
    assert chosen["tensor_parallel"] == fewest and chosen["fits"]
    if model == LLAMA_70B and gpu == "L4":
        assert fewest > 1  # 70B of bf16 weights are 131 GiB: more than one 24 GB card
    code, out, _ = serve(capsys, *argv, "--width", "200")
    assert code == 0 and (f"on {fewest} x {gpu}" in out if fewest > 1 else f"on one {gpu}" in out)


@pytest.mark.parametrize("concurrency", [1, 2, 4])
def test_a_concurrency_that_fits_reaches_its_context(concurrency: int, capsys: pytest.CaptureFixture[str]) -> None:
    e = estimate(capsys, *L4_8K, "-tp", "1", "--concurrency", str(concurrency))
    assert e["fits"] and e["concurrency"] == concurrency
    assert e["max_context"] >= 8192
    assert e["headroom_bytes"] >= 0
    assert e["max_concurrency"] >= concurrency


def test_a_concurrency_past_the_cache_does_not_fit_and_says_how_long_it_could_be(
    capsys: pytest.CaptureFixture[str],
) -> None:
    most = math.floor(estimate(capsys, *L4_8K, "-tp", "1")["max_concurrency"])
    e = estimate(capsys, *L4_8K, "-tp", "1", "--concurrency", str(most + 1))
    assert not e["fits"] and e["headroom_bytes"] < 0
    assert 0 < e["max_context"] < 8192
    # The context it reports does fit that many sequences.
    shorter = estimate(capsys, *L4_8K[:-1], str(e["max_context"]), "-tp", "1", "--concurrency", str(most + 1))
    assert shorter["fits"]


def test_v0_fits_agrees_with_the_blocks_a_request_takes(capsys: pytest.CaptureFixture[str]) -> None:
    # 0.8232666 of an L4 leaves exactly 1,025 blocks under V0's accounting.
    argv = [LLAMA_8B, "--gpu", "L4", "--context", "8200", "--concurrency", "2", "-tp", "1", "--vllm-version", "0.6"]
    e = estimate(capsys, *argv, "--gpu-memory-utilization", "0.8232666")
    assert e["blocks"] == 1025  # the case this test is about: 2 x 513 blocks needed
    assert not e["fits"] or (e["headroom_bytes"] >= 0 and e["max_context"] >= 8200)


# ---------------------------------------------------------------- transformers generate


def test_transformers_serves_max_concurrency_sequences_and_not_one_more(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*L4_8K, "--engine", "transformers", "-tp", "1"]
    alone = estimate(capsys, *argv)
    most = int(alone["max_concurrency"])
    assert most == alone["max_concurrency"] >= 1 and alone["fits"] and alone["served_concurrency"] == most
    assert alone["release"] is None and alone["blocks"] == 0
    assert alone["kv_cache_tokens"] == most * 8192
    at_most = estimate(capsys, *argv, "--concurrency", str(most))
    assert at_most["fits"] and at_most["headroom_bytes"] >= 0 and at_most["max_context"] >= 8192
    beyond = estimate(capsys, *argv, "--concurrency", str(most + 1))
    assert not beyond["fits"] and beyond["headroom_bytes"] < 0 and beyond["max_context"] < 8192


def test_transformers_terms_add_up_to_the_kv_cache(capsys: pytest.CaptureFixture[str]) -> None:
    e = estimate(capsys, *L4_8K, "--engine", "transformers", "-tp", "1", "--concurrency", "3")
    taken = e["weights_bytes"] + e["lora_bytes"] + e["activation_bytes"]
    # The CUDA context comes first (reported as the non-torch term): what is left is the engine's to use.
    assert e["requested_bytes"] == e["total_bytes"] - e["non_torch_bytes"] and e["non_torch_bytes"] == 2**30
    assert e["requested_bytes"] - taken == e["kv_cache_bytes"]


# ---------------------------------------------------------------- strict JSON, -o


@pytest.mark.parametrize(
    "argv",
    [L4_8K, [LLAMA_8B, "--context", "8192"], [*L4_8K, "--engine", "transformers"], VLLM_PLANS["70b-does-not-start"]],
    ids=["one-gpu", "ranking", "transformers", "does-not-start"],
)
def test_the_json_is_strict_and_every_number_finite(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    data = serve_json(capsys, *argv)
    values = list(numbers(data))
    assert values and all(math.isfinite(v) for v in values)
    if "--gpu" not in argv:
        names = [row["gpu"] for row in data["gpus"]]
        assert len(names) == len(set(names)) > 1


@pytest.mark.parametrize("fmt", ["json", "table", "markdown"])
def test_output_file_is_written_atomically_with_what_stdout_shows(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*L4_8K, "--format", fmt, "--width", "100"]
    code, shown, _ = serve(capsys, *argv)
    assert code == 0 and shown
    target = tmp_path / "serve.out"
    target.write_text("old")
    target.chmod(0o640)
    before = target.stat().st_ino
    code, out, err = serve(capsys, *argv, "-o", str(target))
    assert code == 0, err
    assert out == ""
    assert target.read_text(encoding="utf-8") == shown
    after = target.stat()
    assert after.st_ino != before  # replaced by a rename, not rewritten in place
    assert stat.S_IMODE(after.st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve.out"]  # no temporary left behind


# ---------------------------------------------------------------- a real saved adapter


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder (config.json only): the tiny Llama the adapters below are trained on."""
    root = tmp_path_factory.mktemp("tiny-llama")
    (root / "config.json").write_text(json.dumps(TINY["llama"]), encoding="utf-8")
    return root


def _save_adapter(folder: Path, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in TINY["llama"].items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Real peft adapters (q_proj, v_proj) of rank 8 and 24 on the tiny Llama, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("adapters")
    return {rank: _save_adapter(root / f"r{rank}", rank) for rank in (8, 24)}


def _tensor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = [handle.get_tensor(name) for name in handle.keys()]  # noqa: SIM118 - safe_open has no iter
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    "rank",
    [
        8,
        24,
    ],
)
def test_a_saved_adapter_is_read_for_its_bytes_and_rank(
    rank: int, tiny_model: Path, adapters: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = adapters[rank]
    data = serve_json(capsys, str(tiny_model), "--gpu", "L4", "--adapter", str(folder))
    got = data["estimate"]["adapters"]
    assert got["adapter_bytes"] == _tensor_bytes(folder)
    assert got["count"] == 1 and data["plan"]["adapters"]["paths"] == [str(folder)]
    assert got["max_lora_rank"] == min(r for r in VLLM_RANKS if r >= rank)


# ---------------------------------------------------------------- bad input: one line, exit 2


def _no_config(tmp: Path) -> list[str]:
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return ["--adapter", str(tmp / "adapter")]


class _Touch:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _pickle_only(tmp: Path) -> list[str]:
    folder = tmp / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Touch(tmp / "unpickled")}))
    return ["--adapter", str(folder)]


#: id -> (argv after ``serve``, or a function of the test's folder that returns the extra flags; the message).
BAD: dict[str, tuple[list[str], str]] = {
    "context-0": ([*L4_8K[:-1], "0"], r"--context must be at least 1, got 0"),
    "concurrency-0": ([*L4_8K, "--concurrency", "0"], r"--concurrency must be at least 1"),
    "utilization-1.5": ([*L4_8K, "--gpu-memory-utilization", "1.5"], r"--gpu-memory-utilization .*1\.5"),
    "utilization-0": ([*L4_8K, "--gpu-memory-utilization", "0"], r"--gpu-memory-utilization.*'0'"),
    "block-size-0": ([*L4_8K, "--block-size", "0"], r"--block-size must be at least 1"),
    "tp-3-on-32-heads": ([*L4_8K, "-tp", "3"], r"32 attention heads do not divide over 3 GPUs"),
    "max-lora-rank-above-vllm": ([*L4_8K, "--max-lora-rank", "100000"], r"rank 100000 .*512"),
    "max-lora-rank-above-the-model": (
        # SmolLM2-135M's k_proj: 3 KV heads of 64 = 192 outputs (its config.json), below rank 256.
        [SMOL, "--gpu", "L4", "--max-lora-rank", "256"],
        r"max_lora_rank 256 is larger than k_proj's smaller dimension 192",
    ),
    "max-lora-rank-0": ([*L4_8K, "--max-lora-rank", "0"], r"--max-lora-rank must be at least 1"),
    "max-lora-rank-not-vllms": ([*L4_8K, "--max-lora-rank", "24"], r"max.lora.rank 24 .*use 32"),
    "max-cpu-loras-below-max-loras": (
        [*L4_8K, "--max-cpu-loras", "1", "--max-loras", "2"],
        r"--max-cpu-loras \(1\) must be at least --max-loras \(2\)",
    ),
    "vllm-0.34": ([*L4_8K, "--vllm-version", "0.34"], r"vLLM 0\.34.*not modelled"),
    "vllm-abc": ([*L4_8K, "--vllm-version", "abc"], r"--vllm-version .*'abc'"),
    "vllm-0.5": ([*L4_8K, "--vllm-version", "0.5"], r"vLLM 0\.5 is older"),
    "transformers-utilization": (
        [*L4_8K, "--engine", "transformers", "--gpu-memory-utilization", "0.5"],
        r"--gpu-memory-utilization appl(y|ies) to --engine vllm only",
    ),
    "transformers-eager": (
        [*L4_8K, "--engine", "transformers", "--enforce-eager", "--block-size", "32"],
        r"--block-size, --enforce-eager apply to --engine vllm only",
    ),
    "format-html": ([*L4_8K, "--format", "html"], r"--format .*'html'"),
    "encoder": ([BERT, "--gpu", "L4"], r"BertForMaskedLM: not a generative model"),
    "unknown-target": (
        [*L4_8K, "--targets", "nonexistent_module", "--adapters", "2"],
        r"unknown LoRA target 'nonexistent_module' for LlamaForCausalLM",
    ),
    "unknown-gpu": ([LLAMA_8B, "--gpu", "NOPE"], r"unknown GPU 'NOPE'"),
    "context-not-a-number": ([*L4_8K[:-1], "8k"], r"--context.*'8k'"),
    "adapter-not-a-folder": ([*L4_8K, "--adapter", "/nonexistent/adapter"], r"not a directory"),
}
BAD_SETUP = {
    "adapter-without-config": (_no_config, r"no adapter_config\.json"),
    "adapter-pickle-only": (_pickle_only, r"adapter_model\.bin \(pickle\); peftaudit never unpickles"),
}
BAD_IDS = [*BAD, *BAD_SETUP, "max-loras-0"]


def _assert_one_line_error(code: int, out: str, err: str, pattern: str) -> None:
    assert "Traceback" not in err
    assert code == 2, (code, out[-500:], err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftaudit: error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert out == ""


@pytest.mark.parametrize(
    "case",
    [
        *BAD_IDS,
    ],
)
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case in BAD:
        argv, pattern = BAD[case]
    elif case in BAD_SETUP:
        setup, pattern = BAD_SETUP[case]
        argv = [*L4_8K, *setup(tmp_path)]
    else:
        argv, pattern = [*L4_8K, "--max-loras", "0"], r"--max-loras must be at least 1"
    code, out, err = serve(capsys, *argv)
    _assert_one_line_error(code, out, err, pattern)
    assert not (tmp_path / "unpickled").exists()
    assert sorted(os.listdir(tmp_path)) in ([], ["adapter"])  # nothing written


def test_cross_attention_layers_do_not_grow_per_token(capsys: pytest.CaptureFixture[str]) -> None:
    """Mllama's 8 cross-attention layers cache the image's tokens whatever the context: one more token of
    context adds only the 32 self-attention layers' keys and values (Llama-3.2-11B-Vision's text config:
    40 layers, 8 of them cross-attention, 8 KV heads of 128), while a sequence holds both."""
    argv = ["meta-llama/Llama-3.2-11B-Vision", "--gpu", "L4", "--context", "4096", "-tp", "1"]
    e = estimate(capsys, *argv, "--engine", "transformers")
    per_token = 32 * 2 * 8 * 128 * 2
    assert e["kv_bytes_per_token"] == per_token
    vision_tokens = 4 * ((560 // 14) ** 2 + 1)  # one image at max_num_tiles: 6,404 tokens in each cross layer
    assert e["sequence_bytes"] == 4096 * per_token + 8 * vision_tokens * 2 * 8 * 128 * 2


@pytest.mark.parametrize(("gpu", "block"), [("H200", 64), ("B200", 128), ("A100", 16)])
def test_mla_models_take_the_block_size_vllm_forces(capsys: pytest.CaptureFixture[str], gpu: str, block: int) -> None:
    """vLLM 0.11 forces FlashMLA's 64-token blocks on Hopper and CUTLASS MLA's 128 on Blackwell
    (``vllm/platforms/cuda.py:131-182``); elsewhere (A100: Triton MLA) the configured 16 stands."""
    argv = ["deepseek-ai/DeepSeek-V3", "--gpu", gpu, "-tp", "8", "--quantization", "fp8", "--context", "8192"]
    e = estimate(capsys, *argv)
    assert e["block_size"] == block
    assert e["max_concurrency"] == e["blocks"] / -(-8192 // block)
    # One latent of 576 elements per token and layer (61 layers), whole on every GPU: no split by -tp.
    assert e["kv_bytes_per_token"] == 61 * 576 * 2
