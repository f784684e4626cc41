#!/usr/bin/env python3
"""Check the bundled model catalog against the published parameter counts.

For every ``peftaudit/catalog/models/*.json`` entry this script builds the
architecture named in ``config.architectures[0]`` on the meta device (no
weights are allocated), counts its parameters (tied weights once) and compares
the count with ``published_params.total``:

* an integer must match exactly;
* a string such as ``"7.61B"``, ``"671B"`` or ``"60 million"`` must equal the
  computed count rounded *or* truncated to the printed precision (model cards
  print both ways: Qwen2.5-7B's 7,615,616,512 is printed "7.61B", Mixtral
  8x22B's 140,620,634,112 is printed "141B").

For MoE entries the script also prints an *estimate* of the active parameters
per token (every parameter outside the routed experts plus top_k/num_experts of
the routed-expert parameters) next to the published active figure.  That
column is informational only: vendors differ on whether embeddings count as
active (OpenAI's gpt-oss figures leave out the input embedding, Qwen's and
Mistral's include it), so it never fails the run.

Usage::

    python benchmarks/check_catalog.py                # every entry
    python benchmarks/check_catalog.py qwen3 gemma    # ids containing a filter
    python benchmarks/check_catalog.py --models-dir path/to/models

Exit status: 0 when every entry builds and matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO / "peftaudit" / "catalog" / "models"

REQUIRED_KEYS = {"id", "family", "description", "config_source", "published_params", "config"}
OPTIONAL_KEYS = {"aliases", "notes"}
PUBLISHED_REQUIRED = {"total", "source"}
PUBLISHED_OPTIONAL = {"active", "active_source"}

_UNITS = {
    "": 1,
    "k": 10**3,
    "thousand": 10**3,
    "m": 10**6,
    "million": 10**6,
    "b": 10**9,
    "billion": 10**9,
    "t": 10**12,
    "trillion": 10**12,
}
_FIGURE = re.compile(r"^\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_figure(text: str) -> tuple[int, int]:
    """Return (value, unit) in parameters for a printed figure.

    ``unit`` is the place value of the last printed digit, e.g. "7.61B" ->
    (7_610_000_000, 10_000_000) and "671B" -> (671_000_000_000, 1_000_000_000).
    """
    m = _FIGURE.match(text)
    if not m:
        raise ValueError(f"cannot parse published figure {text!r}")
    number, suffix = m.group(1).replace(",", ""), m.group(2).lower()
    if suffix not in _UNITS:
        raise ValueError(f"unknown unit {m.group(2)!r} in {text!r}")
    scale = _UNITS[suffix]
    decimals = len(number.split(".")[1]) if "." in number else 0
    mantissa = int(number.replace(".", ""))  # exact integer arithmetic
    unit = scale // 10**decimals if scale >= 10**decimals else None
    if unit is None:
        raise ValueError(f"figure {text!r} is more precise than one parameter")
    return mantissa * unit, unit


def matches(computed: int, published: int | str) -> bool:
    if isinstance(published, bool):
        return False
    if isinstance(published, int):
        return computed == published
    value, unit = parse_figure(published)
    rounded = ((2 * computed + unit) // (2 * unit)) * unit  # round half up
    truncated = (computed // unit) * unit
    return value in (rounded, truncated)


def human(n: int) -> str:
    for div, suf in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def validate_entry(path: Path, entry: dict) -> list[str]:
    problems = []
    keys = set(entry)
    if REQUIRED_KEYS - keys:
        problems.append(f"missing keys {sorted(REQUIRED_KEYS - keys)}")
    if keys - REQUIRED_KEYS - OPTIONAL_KEYS:
        problems.append(f"unexpected keys {sorted(keys - REQUIRED_KEYS - OPTIONAL_KEYS)}")
    pub = entry.get("published_params", {})
    pkeys = set(pub) if isinstance(pub, dict) else set()
    if PUBLISHED_REQUIRED - pkeys:
        problems.append(f"published_params missing {sorted(PUBLISHED_REQUIRED - pkeys)}")
    if pkeys - PUBLISHED_REQUIRED - PUBLISHED_OPTIONAL:
        extra = sorted(pkeys - PUBLISHED_REQUIRED - PUBLISHED_OPTIONAL)
        problems.append(f"published_params unexpected {extra}")
    if ("active" in pkeys) != ("active_source" in pkeys):
        problems.append("published_params.active and active_source must come together")
    want = entry.get("id", "").replace("/", "__") + ".json"
    if path.name != want:
        problems.append(f"file name should be {want}")
    cfg = entry.get("config", {})
    if "model_type" not in cfg or not cfg.get("architectures"):
        problems.append("config needs model_type and architectures")
    total = pub.get("total") if isinstance(pub, dict) else None
    if isinstance(total, str):
        try:
            parse_figure(total)
        except ValueError as exc:
            problems.append(str(exc))
    elif not isinstance(total, int) or isinstance(total, bool):
        problems.append("published_params.total must be an int or a printed figure string")
    return problems


def build_and_count(config: dict):
    import torch
    import transformers
    from transformers import AutoConfig

    c = dict(config)
    model_type = c.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **c)
    cls = getattr(transformers, cfg.architectures[0])
    with torch.device("meta"):
        model = cls(cfg)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once

    active = None
    expert_keys = ("num_local_experts", "num_experts", "n_routed_experts")
    n_experts = next((c[k] for k in expert_keys if c.get(k)), None)
    top_k = c.get("num_experts_per_tok")
    if n_experts and top_k:
        routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = total - routed + routed * top_k // n_experts
    del model
    gc.collect()
    return total, active


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("filters", nargs="*", help="only check ids containing one of these (case-insensitive)")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing is reported below
        pass

    files = sorted(args.models_dir.glob("*.json"))
    if args.filters:
        flt = [f.lower() for f in args.filters]
        files = [f for f in files if any(x in f.stem.lower().replace("__", "/") for x in flt)]
    if not files:
        print(f"no catalog entries found in {args.models_dir}", file=sys.stderr)
        return 1

    header = f"{'id':<55} {'computed':>17} {'published':>16} {'match':<5} {'active est.':>11} {'active pub.':>11}"
    print(header)
    print("-" * len(header))
    failures = 0
    for path in files:
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            print(f"{path.name:<55} INVALID JSON: {exc}")
            failures += 1
            continue
        problems = validate_entry(path, entry)
        ident = entry.get("id", path.stem)
        if problems:
            print(f"{ident:<55} SCHEMA: {'; '.join(problems)}")
            failures += 1
            continue
        pub = entry["published_params"]
        try:
            total, active = build_and_count(entry["config"])
        except Exception as exc:  # report and keep going
            print(f"{ident:<55} BUILD FAILED: {type(exc).__name__}: {exc}"[:300])
            failures += 1
            continue
        ok = matches(total, pub["total"])
        failures += not ok
        shown = f"{pub['total']:,}" if isinstance(pub["total"], int) else pub["total"]
        act_est = human(active) if active is not None else ""
        act_pub = str(pub.get("active", ""))
        verdict = "yes" if ok else "NO"
        print(
            f"{ident:<55} {total:>17,} {shown:>16} {verdict:<5} {act_est:>11} {act_pub:>11}",
            flush=True,
        )

    print("-" * len(header))
    print(f"{len(files)} entries, {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
