"""A long run of varying lengths made from a few traced steps (``peftaudit.memory.allocator.lengths``).

The check is against the real libraries: a run made from a trace at four lengths must hand the
allocator exactly what a trace of those steps themselves does, byte for byte and in order.
"""

from __future__ import annotations

import warnings

import pytest
from memory_models import build, reduced_config

from peftaudit.memory.allocator import allocation_events, replay
from peftaudit.memory.allocator.lengths import RUN_STEPS, SHORTEST, long_run, run_lengths, step_blocks
from peftaudit.memory.plan import TrainingPlan
from peftaudit.memory.tracing.model import decoder_layers
from peftaudit.memory.tracing.run import run_trace
from peftaudit.memory.tracing.tracker import EventLog
from peftaudit.sources.catalog import lookup

TRACED = (64, 128, 192, 256)
RUN = (160, 40, 256, 96, 248)


def _trace(model_id: str, method: str, checkpointing: bool, lengths: tuple[int, ...]) -> EventLog:
    entry = lookup(model_id)
    assert entry is not None
    config = reduced_config(entry.config, 1) | {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 1024}
    config |= {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    model = build(config)
    plan = TrainingPlan(method=method, seq_len=max(lengths), gradient_checkpointing=checkpointing, lengths="varied")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = run_trace(
            model, plan, layers=[(str(i), m) for i, m in enumerate(decoder_layers(model))], lengths=lengths
        )
    assert traced.events is not None
    return traced.events


@pytest.mark.parametrize(
    ("model_id", "method", "checkpointing"),
    [
        ("meta-llama/Llama-2-7b-hf", "lora", True),
        ("Qwen/Qwen2.5-7B", "qlora", False),
        ("meta-llama/Meta-Llama-3-8B", "full", False),
    ],
)
def test_a_made_run_is_what_tracing_those_steps_gives(model_id: str, method: str, checkpointing: bool) -> None:
    made = long_run(_trace(model_id, method, checkpointing, TRACED), TRACED, RUN)
    real = allocation_events(_trace(model_id, method, checkpointing, TRACED[:1] + RUN))
    assert made is not None
    # The real trace ends by freeing what it held (optimizer states, weights' gradients): the made run stops before.
    assert len(real) > len(made)
    assert [n for _k, n in made] == [n for _k, n in real[: len(made)]]
    assert replay(made).peak_reserved == replay(real).peak_reserved
    assert replay(made).peak_allocated == replay(real).peak_allocated


def test_steps_are_cut_at_their_marks() -> None:
    log = _trace("meta-llama/Llama-2-7b-hf", "lora", False, TRACED)
    blocks = step_blocks(log)
    assert len(blocks) == len(TRACED) + 1
    # Every step after the first runs the same number of allocations and frees; the first also
    # allocates the optimizer states, the last frees everything at the end of the trace.
    assert len(blocks[2]) == len(blocks[3]) < len(blocks[1])
    assert sum(n for block in blocks for _k, n in block) == sum(n for _k, n in allocation_events(log))


def test_a_run_needs_three_distinct_lengths_after_the_first() -> None:
    log = _trace("meta-llama/Llama-2-7b-hf", "lora", False, (64, 128, 128, 256))
    assert long_run(log, (64, 128, 128, 256), RUN) is None
    assert long_run(log, (64, 128, 256), RUN) is None  # not one length per step


def test_run_lengths_are_drawn_once_and_reach_the_plan_length() -> None:
    lengths = run_lengths(4096)
    assert len(lengths) == RUN_STEPS and lengths == run_lengths(4096)
    assert max(lengths) == 4096 and min(lengths) >= 4096 * SHORTEST
    assert all(n % 8 == 0 for n in lengths)
    assert run_lengths(4096, seed=1) != lengths
    assert set(run_lengths(8, 5)) == {8}
