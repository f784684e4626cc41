"""CLI start-up and report speed, against the floor of a bare transformers script.

    .venv/bin/python benchmarks/bench_startup.py [--repeat N]

Targets (issue 2): ``--help`` and ``--version`` under 0.3 s without importing
torch; a cold ``report`` of Llama-3.1-405B no slower than building the same
model on the meta device with a bare transformers script; a second (cached)
report under 1 s without importing torch. Prints the best of N wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
MODEL = "meta-llama/Llama-3.1-405B"

BARE = """
import json, sys, torch, transformers
from transformers import AutoConfig
entry = json.load(open(sys.argv[1]))
config = dict(entry["config"]); model_type = config.pop("model_type")
cfg = AutoConfig.for_model(model_type, **config)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(cfg)
print(sum(p.numel() for p in model.parameters()))
"""


def best_of(repeat: int, argv: list[str], env: dict[str, str]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    entry = Path(__file__).parents[1] / "peftaudit" / "catalog" / "models" / "meta-llama__Llama-3.1-405B.json"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PEFTAUDIT_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
        cli = [PY, "-m", "peftaudit"]
        results = {
            "help_s": best_of(args.repeat + 2, [*cli, "--help"], env),
            "version_s": best_of(args.repeat + 2, [*cli, "--version"], env),
            "bare_transformers_meta_build_s": best_of(args.repeat, [PY, "-c", BARE, str(entry)], env),
            "report_cold_s": best_of(args.repeat, [*cli, "report", MODEL, "--no-cache", "--json"], env),
        }
        subprocess.run([*cli, "report", MODEL, "--json"], check=True, capture_output=True, env=env)
        results["report_cached_s"] = best_of(args.repeat + 2, [*cli, "report", MODEL], env)
    for name, seconds in results.items():
        print(f"{name:34s} {seconds:7.3f} s")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
