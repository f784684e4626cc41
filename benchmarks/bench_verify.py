"""Verifier speed and memory on a multi-GB checkpoint pair, on a warm page cache.

    .venv/bin/python benchmarks/bench_verify.py [--gib-per-checkpoint 2] [--shards 2] [--runs 3] [--dir DIR]

Writes a sharded bf16 checkpoint ("base") and a copy with a few tensors
patched ("finetuned"), both real safetensors files with an index, then times
``peftaudit verify base finetuned --json`` in fresh processes after one
warm-up run. Reports: the verify call's throughput (bytes of both checkpoints
/ seconds), the whole command's wall time, and the peak resident memory
beyond the interpreter (peak RSS minus RSS after imports). Targets (issue 6):
at least 3 GB/s, and under 500 MB beyond the interpreter. Deletes its files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
TENSOR_MIB = 64

# One measured run, in a fresh process: RSS after imports, then verify through the CLI entry point.
# VmHWM, not getrusage's ru_maxrss: a child forked from a large parent inherits the parent's
# peak in ru_maxrss across exec, while VmHWM starts afresh.
CHILD = """
import json, sys, time
from peftaudit.cli import main
import peftaudit.verification, peftaudit.commands.verify, peftaudit.verification.render, rich.console, rich.table
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
baseline = status_kib("VmRSS")
start = time.perf_counter()
code = main(["verify", sys.argv[1], sys.argv[2], "--json", "--output", sys.argv[3], "--no-progress"])
seconds = time.perf_counter() - start
print(json.dumps({"code": code, "seconds": seconds, "baseline_kib": baseline, "peak_kib": status_kib("VmHWM")}))
"""


def write_pair(root: Path, gib: float, shards: int) -> tuple[Path, Path, int]:
    import torch
    from safetensors.torch import save_file

    base, tuned = root / "base", root / "finetuned"
    base.mkdir()
    per_shard = int(gib * 1024 / shards) // TENSOR_MIB
    elements = TENSOR_MIB * (1 << 20) // 2  # bf16
    weight_map: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        block = {}
        for t in range(per_shard):
            key = f"model.layers.{s * per_shard + t}.mlp.weight"
            block[key] = torch.randn(elements // 4096, 4096, generator=generator).to(torch.bfloat16)
            weight_map[key] = name
        save_file(block, base / name, metadata={"format": "pt"})
        del block
    index = {"metadata": {}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copytree(base, tuned)
    # Patch two bytes inside the first tensor of each shard of the copy: one unexpected change per shard.
    from peftaudit.verification.checkpoint import read_safetensors_header

    for shard in sorted(tuned.glob("*.safetensors")):
        entries, _ = read_safetensors_header(shard)
        with open(shard, "r+b") as handle:
            handle.seek(entries[0].start + 1000)
            handle.write(b"\x11\x22")
    total = sum(p.stat().st_size for d in (base, tuned) for p in d.glob("*.safetensors"))
    return base, tuned, total


def run_once(base: Path, tuned: Path, out: Path, expected: int) -> dict[str, float]:
    start = time.perf_counter()
    result = subprocess.run([PY, "-c", CHILD, str(base), str(tuned), str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"verify failed to run:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if data["code"] != 1:
        raise SystemExit(f"expected exit 1 (patched tensors), got {data['code']}")
    found = len(json.loads(out.read_text())["findings"])
    if found != expected:
        raise SystemExit(f"expected {expected} findings, got {found}")
    return {**data, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib-per-checkpoint", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="peftaudit-bench-", dir=args.dir))
    try:
        start = time.perf_counter()
        base, tuned, total = write_pair(root, args.gib_per_checkpoint, args.shards)
        took = time.perf_counter() - start
        print(f"wrote 2 x {total / 2 / 2**30:.2f} GiB ({args.shards} shards each) in {took:.1f} s")
        verdict = root / "verdict.json"
        run_once(base, tuned, verdict, args.shards)  # warm the page cache
        runs = [run_once(base, tuned, verdict, args.shards) for _ in range(args.runs)]
        best = min(runs, key=lambda r: r["seconds"])
        beyond = max(r["peak_kib"] - r["baseline_kib"] for r in runs) / 1024
        print(f"bytes hashed:            {total / 1e9:.2f} GB (both checkpoints)")
        print(f"verify call, best of {args.runs}:  {best['seconds']:.2f} s  = {total / best['seconds'] / 1e9:.1f} GB/s")
        print(f"whole command, best:     {min(r['wall'] for r in runs):.2f} s wall (interpreter start included)")
        print(f"interpreter + imports:   {best['baseline_kib'] / 1024:.0f} MiB RSS")
        print(f"peak RSS beyond that:    {beyond:.0f} MiB (worst of {args.runs})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
