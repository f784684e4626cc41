"""CLI start-up and report speed, against the floor of a bare transformers script and of ``import torch``.

    .venv/bin/python benchmarks/bench_startup.py [--repeat N]

Targets (issue 2): ``--help`` and ``--version`` under 0.3 s without importing
torch; a cold ``report`` of Llama-3.1-405B (``--no-cache``: no cache read or
written) no slower than building the same model on the meta device with a bare
transformers script; a second (cached) report under 1 s without importing torch.

Targets (issue 15): after a first ``report``, a repeat ``report MODEL --compare
full,lora,qlora``, ``gpus MODEL`` and ``fit MODEL --gpu H100`` each take at most
a third of ``python -c "import torch"``, answered from the model cache without
importing torch, transformers or peft (checked once per command here).

Every figure is a whole process, the best of N. The commands are measured in
rounds (each round runs every command once), so a busy machine slows all of
them alike and the ratios stay paired. Child processes may write bytecode
(``PYTHONDONTWRITEBYTECODE`` is dropped: torch ships its ``.pyc`` files, and
peftaudit's must exist too for a fair comparison) and each command runs once,
unmeasured, before the rounds.
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
#: At most this fraction of ``import torch`` for each repeat command.
REPEAT_TARGET = 1 / 3

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

#: Runs a command line in-process and prints which of torch, transformers, peft it imported.
HEAVY_IMPORTS = """
import contextlib, io, sys
from peftaudit.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(code, ",".join(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""

CACHED = {
    "report_cached_s": ["report", MODEL],
    "report_compare_cached_s": ["report", MODEL, "--compare", "full,lora,qlora"],
    "gpus_cached_s": ["gpus", MODEL],
    "fit_cached_s": ["fit", MODEL, "--gpu", "H100"],
}


def run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def best_in_rounds(commands: dict[str, list[str]], repeat: int, env: dict[str, str]) -> dict[str, float]:
    """The best wall time of each command over ``repeat`` rounds, each round running every command once."""
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(repeat):
        for name, argv in commands.items():
            best[name] = min(best[name], run(argv, env))
    return best


def heavy_imports(args: list[str], env: dict[str, str]) -> str:
    """The heavy modules a command line imported ("" when none), failing if the command failed."""
    result = subprocess.run([PY, "-c", HEAVY_IMPORTS, *args], check=True, capture_output=True, text=True, env=env)
    code, _, heavy = result.stdout.strip().rpartition("\n")[2].partition(" ")
    if code != "0":
        raise SystemExit(f"{' '.join(args)} exited {code}: {result.stderr.strip()}")
    return heavy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    entry = Path(__file__).parents[1] / "peftaudit" / "catalog" / "models" / "meta-llama__Llama-3.1-405B.json"
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as profiles:
        env = {**os.environ, "PEFTAUDIT_CACHE_DIR": cache, "PEFTAUDIT_PROFILE_DIR": profiles, "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("PEFTAUDIT_NO_CACHE", None)
        cli = [PY, "-m", "peftaudit"]
        cold = {
            "help_s": [*cli, "--help"],
            "version_s": [*cli, "--version"],
            "import_torch_s": [PY, "-c", "import torch"],
            "bare_transformers_meta_build_s": [PY, "-c", BARE, str(entry)],
            "report_cold_s": [*cli, "report", MODEL, "--no-cache", "--json"],
        }
        for argv in cold.values():  # warm-up: bytecode written, files in the page cache
            run(argv, env)
        results = best_in_rounds(cold, args.repeat, env)
        run([*cli, "report", MODEL, "--json"], env)  # the first report: fills the report and model caches
        for name, command in CACHED.items():
            heavy = heavy_imports(command, env)
            if heavy:
                raise SystemExit(f"{name}: `peftaudit {' '.join(command)}` imported {heavy} from a warm cache")
        # The cached commands paired with `import torch`, round by round.
        paired = best_in_rounds(
            {"import_torch_s": cold["import_torch_s"]} | {k: [*cli, *v] for k, v in CACHED.items()}, args.repeat, env
        )
        results["import_torch_s"] = min(results["import_torch_s"], paired.pop("import_torch_s"))
        results |= paired
    for name, seconds in results.items():
        print(f"{name:34s} {seconds:7.3f} s")
    ratios = {f"{k.removesuffix('_s')}/import_torch": v / results["import_torch_s"] for k, v in paired.items()}
    ratios["report_cold/bare_transformers_meta_build"] = (
        results["report_cold_s"] / results["bare_transformers_meta_build_s"]
    )
    for name, ratio in ratios.items():
        target = 1.0 if name.startswith("report_cold") else REPEAT_TARGET
        print(f"{name:52s} {ratio:6.3f}  (target <= {target:.3f}: {'met' if ratio <= target else 'MISSED'})")
    print(json.dumps({k: round(v, 3) for k, v in results.items()} | {k: round(v, 3) for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
