"""Progress of long work: what the computing code reports, and where the command line shows it.

The trace, a step profile's derivation and a ``gpus`` sweep tell an optional callback how much
is done; the command line draws a rich bar on stderr only for a person at a terminal (both
streams terminals, not ``--format json``), so piped and captured output never changes.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tiny import TINY

from peftaudit import progress
from peftaudit.cli import main
from peftaudit.gpus import find_gpu
from peftaudit.gpus.sizing import smallest_setup, sweep
from peftaudit.inventory import take_inventory
from peftaudit.memory import TrainingPlan, estimate, trace
from peftaudit.render import progress as bar
from peftaudit.sources.build import build_from_config
from peftaudit.sources.catalog import lookup

Calls = list[tuple[int, int]]


class Recorder:
    """A :class:`peftaudit.progress.Reporter` that keeps every task's updates."""

    def __init__(self) -> None:
        self.tasks: dict[str, Calls] = {}

    @contextmanager
    def task(self, label: str, unit: progress.Unit) -> Iterator[progress.Progress]:
        calls = self.tasks.setdefault(label, [])
        yield lambda done, total: calls.append((done, total))


def _tiny_llama() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_from_config(TINY["llama"], model_id="tiny-llama")


@pytest.mark.parametrize(
    ("fields", "total"),
    [
        ({}, 2),  # two steps
        ({"gradient_accumulation": 2}, 4),  # two steps of two micro-batches
        ({"method": "freeze", "optimizer": "none"}, 1),  # inference: one forward pass
    ],
)
def test_the_trace_counts_its_micro_batches(fields: dict[str, Any], total: int) -> None:
    calls: Calls = []
    trace(_tiny_llama(), TrainingPlan(seq_len=32, batch_size=1, **fields), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(done, total) for done in range(total + 1)]


def test_deriving_a_profile_reports_each_traced_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPT has no layer program: its first estimate derives a profile from three traces."""
    monkeypatch.setenv("PEFTAUDIT_PROFILE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFTAUDIT_NO_CACHE", raising=False)
    recorder = Recorder()
    with progress.reporting(recorder):
        estimate(_opt(), TrainingPlan(seq_len=64))
    assert recorder.tasks == {"deriving the step profile of OPTForCausalLM": [(0, 3), (1, 3), (2, 3), (3, 3)]}
    with progress.reporting(recorder):
        estimate(_opt(), TrainingPlan(seq_len=64, batch_size=2))  # the stored profile: nothing derived
    assert len(recorder.tasks["deriving the step profile of OPTForCausalLM"]) == 4


def _opt() -> Any:
    """OPT-125m's catalog config, two layers deep (a fresh inventory: no profile kept in memory)."""
    entry = lookup("facebook/opt-125m")
    assert entry is not None
    config = {**entry.config, "num_hidden_layers": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return take_inventory(build_from_config(config, model_id="facebook/opt-125m"))


def _gpt2() -> Any:
    from peftaudit.sources.base import SourceOptions, resolve

    resolved, source = resolve("openai-community/gpt2")
    return take_inventory(source.build(resolved, SourceOptions()))


def test_a_sweep_reports_each_search_and_finds_what_each_search_finds() -> None:
    inventory = _gpt2()
    plans = [TrainingPlan(method="full"), TrainingPlan(method="lora")]
    gpus = [find_gpu("T4"), find_gpu("H100")]
    calls: Calls = []
    rows = sweep(inventory, plans, gpus, max_gpus=8, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(done, 4) for done in range(5)]
    assert rows == [[smallest_setup(inventory, p, g, max_gpus=8) for p in plans] for g in gpus]


def test_without_a_reporter_a_task_is_nothing() -> None:
    assert not progress.active()
    with progress.task("anything") as report:
        assert report is None
    assert progress.advancing(None, 10) is None


def test_advancing_adds_increments_up_to_the_total() -> None:
    calls: Calls = []
    advance = progress.advancing(lambda d, t: calls.append((d, t)), 10)
    assert advance is not None
    advance(4)
    advance(6)
    assert calls == [(4, 10), (10, 10)]


# --- the command line ----------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def at_a_terminal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No NO_COLOR (tests set it), a bar drawn at once, a report cache of this test's own; a tiny model dir."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("PEFTAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(bar, "DELAY_S", 0)
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY["llama"]))
    return model


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch, *, stdout_tty: bool, stderr_tty: bool) -> tuple[str, str]:
    out = Terminal() if stdout_tty else io.StringIO()
    err = Terminal() if stderr_tty else io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", out)
        m.setattr(sys, "stderr", err)
        assert main(argv) == 0
    return out.getvalue(), err.getvalue()


TRACE = ["--method", "lora", "--trace", "--seq-len", "32"]


def test_a_terminal_shows_the_trace_on_stderr(at_a_terminal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = _run(["report", str(at_a_terminal), *TRACE], monkeypatch, stdout_tty=True, stderr_tty=True)
    assert "tracing lora" in err and "2/2" in err
    assert "tracing" not in out and "lora (trace)" in out


@pytest.mark.parametrize(
    ("extra", "stdout_tty", "stderr_tty"),
    [
        ([], False, True),  # stdout piped: `peftaudit report ... > file`
        ([], True, False),  # stderr piped
        (["--format", "json"], True, True),
        ([], False, False),  # both captured, as in every other test
    ],
)
def test_no_bar_unless_both_streams_are_a_terminal_and_the_format_is_for_people(
    at_a_terminal: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], stdout_tty: bool, stderr_tty: bool
) -> None:
    argv = ["report", str(at_a_terminal), *TRACE, *extra]
    out, err = _run(argv, monkeypatch, stdout_tty=stdout_tty, stderr_tty=stderr_tty)
    assert err == ""
    if not stdout_tty:  # the very output a run with no terminal at all prints
        assert out == _run(argv, monkeypatch, stdout_tty=False, stderr_tty=False)[0]


def test_a_gpus_sweep_shows_its_progress(at_a_terminal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["gpus", "openai-community/gpt2", "--gpu", "T4", "--gpu", "H100"]
    _, err = _run(argv, monkeypatch, stdout_tty=True, stderr_tty=True)
    assert "sizing full, lora, qlora on 2 GPUs" in err and "6/6" in err
    out, err = _run(argv, monkeypatch, stdout_tty=False, stderr_tty=True)
    assert err == "" and "sizing" not in out


@pytest.mark.slow
def test_a_real_terminal_shows_the_bar(tmp_path: Path) -> None:
    """The whole process under a pseudo-terminal (pipes: the in-process tests above)."""
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY["llama"]))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm", COLUMNS="100", PEFTAUDIT_CACHE_DIR=str(tmp_path / "cache"))
    # The trace of a tiny model may end within the bar's delay: draw it at once.
    code = (
        "import sys; import peftaudit.render.progress as p; p.DELAY_S = 0; from peftaudit.cli import main; "
        f"sys.exit(main(['report', {str(model)!r}, *{TRACE!r}]))"
    )
    terminal = _under_a_terminal([sys.executable, "-c", code], env)
    assert b"tracing lora" in terminal and b"2/2" in terminal
    assert b"lora (trace)" in terminal  # and then the report


def _under_a_terminal(command: list[str], env: dict[str, str]) -> bytes:
    """Everything ``command`` writes to stdout and stderr, both a pseudo-terminal."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower side closed: the process is gone
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=30) == 0, seen[-2000:]
    return seen
