"""Every family in the catalog: the estimate within 3 % of a fake-tensor trace, three plan shapes.

One catalog model per model type runs here (``benchmarks/bench_derived.py`` runs them all and
prints the table in docs/memory.md). Families with a hand-written layer program (Llama, Qwen,
Mistral, GPT-2, BERT...) are also checked on tiny configs in test_memory_trace.py, so they run
the LoRA shape only; families whose profile is derived from a trace run all three.
"""

from __future__ import annotations

import pytest
from catalog_accuracy import SHAPES, TOLERANCE, catalog_configs, compare, one_per_family

from peftaudit.memory.analytic.programs import lookup

CASES = [
    (model_id, shape)
    for model_id in one_per_family()
    for shape in SHAPES
    if shape == "lora" or lookup(str(catalog_configs()[model_id]["model_type"])) is None
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_id", "shape"), CASES)
def test_catalog_family_matches_the_trace(model_id: str, shape: str) -> None:
    result = compare(model_id, shape)
    # Every family traces (T5 under 4-bit too: its feed-forward output stays unquantized, memory/keep_fp32.py).
    assert result.trace_bytes is not None, result
    assert "approximate-activations" not in result.warnings, result
    assert abs(result.error) <= TOLERANCE, result
