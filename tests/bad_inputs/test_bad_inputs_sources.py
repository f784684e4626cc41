"""Bad-input rows for where a model comes from (issue 11, items 5, 6, 8, 12, 13).

Configs that transformers' own validation refuses, a skeleton too large to
build, a report-cache entry that is valid JSON but not a report, a config.json
too large to read (or a FIFO in its place), a config with nothing to audit,
and a hub that accepts the connection and then never answers. Every row runs
``python -m peftaudit`` in its own process; the hub rows start a local HTTP
server on 127.0.0.1 that stalls, and point ``HF_ENDPOINT`` at it.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import tiny
from bad_input_corpus import Case, run_case, strict_json, write_config

LLAMA: Mapping[str, Any] = tiny.TINY["llama"]


def _llama(**changes: Any) -> Any:
    """A setup writing the tiny llama config with ``changes`` to ``{tmp}/m``."""
    return lambda tmp: write_config(tmp / "m", {**LLAMA, **changes})


REPORT = ["report", "{tmp}/m", "--no-cache"]

# ---------------------------------------------------------------- item 6: configs transformers refuses


CONFIG_CASES = [
    Case("11.6-hidden-size-null", REPORT, stderr=r"'hidden_size'", setup=_llama(hidden_size=None)),
    Case(
        "11.6-heads-do-not-divide-hidden",
        REPORT,
        stderr=r"hidden size \(64\) is not a multiple of the number of attention heads \(5\)",
        setup=_llama(num_attention_heads=5, num_key_value_heads=5),
    ),
    Case("11.6-odd-head-dim", REPORT, stderr=r"head_dim", setup=_llama(head_dim=7)),
    Case("11.6-architectures-not-a-list", REPORT, stderr=r"'architectures'", setup=_llama(architectures=5)),
    Case(
        "11.6-architectures-list-of-numbers",
        REPORT,
        stderr=r"'architectures'",
        setup=_llama(architectures=[5]),
    ),
    # Refused before anything is built: the bound is in the message, and it answers in seconds.
    Case(
        "11.6-billion-layers",
        REPORT,
        stderr=r"'num_hidden_layers' is 1000000000.*at most 1,000 layers",
        setup=_llama(num_hidden_layers=10**9),
        timeout=30,
    ),
    Case(
        "11.6-too-many-expert-blocks",
        REPORT,
        stderr=r"1,000,000 experts.*at most 100,000",
        setup=lambda tmp: write_config(
            tmp / "m", {**tiny.TINY["mixtral"], "num_hidden_layers": 1000, "num_local_experts": 1000}
        ),
        timeout=30,
    ),
]

# ---------------------------------------------------------------- item 8: a cache entry that is not a report


def _poisoned_cache_entry(content: str) -> Any:
    """A setup: the tiny llama, and its report-cache entry replaced by ``content``.

    The key is computed in-process exactly as the CLI computes it (same config,
    origin and versions); the check proves it was the CLI's key, since the CLI
    then overwrites the entry with a real report.
    """

    def setup(tmp: Path) -> None:
        from peftaudit import cache
        from peftaudit.sources.base import SourceOptions, resolve

        write_config(tmp / "m", LLAMA)
        os.environ["PEFTAUDIT_CACHE_DIR"] = str(tmp / ".report-cache")
        try:
            options = SourceOptions()
            resolved, _ = resolve(str(tmp / "m"), options)
            key = cache.key_for(resolved, options)
            assert key is not None
            folder = cache.cache_dir()
        finally:
            del os.environ["PEFTAUDIT_CACHE_DIR"]
        folder.mkdir(parents=True)
        (folder / f"{key}.json").write_text(content)

    return setup


def _entry_rebuilt(tmp: Path, result: subprocess.CompletedProcess[str]) -> None:
    report = strict_json(result.stdout)
    assert report["params"]["total"] == sum(p.numel() for p in tiny.build("llama").parameters())
    entries = list((tmp / ".report-cache").glob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["params"] == report["params"], "the bad entry was not replaced"


CACHE_CASES = [
    Case(
        f"11.8-cache-entry-{name}",
        ["report", "{tmp}/m", "--params-only", "--json"],  # the counts are what the entry caches
        exit_code=0,
        setup=_poisoned_cache_entry(content),
        check=_entry_rebuilt,
    )
    for name, content in (
        ("null", "null"),
        ("empty-list", "[]"),
        ("string", '"x"'),
        ("wrong-shape", '{"schema_version": 1, "layers": [5]}'),
    )
]

# ---------------------------------------------------------------- item 12: config.json too large, or not a file


def _sparse_config(tmp: Path) -> None:
    folder = tmp / "m"
    folder.mkdir()
    with open(folder / "config.json", "wb") as fh:
        fh.truncate(2 << 30)  # 2 GiB of holes: nothing on disk, everything if read


def _fifo_config(tmp: Path) -> None:
    folder = tmp / "m"
    folder.mkdir()
    os.mkfifo(folder / "config.json")  # opening it for reading would wait for a writer forever


LIMIT_CASES = [
    Case(
        "11.12-config-2gb-sparse",
        REPORT,
        stderr=r"config\.json of 2147483648 bytes exceeds the 52428800-byte limit",
        setup=_sparse_config,
        timeout=30,
    ),
    Case("11.12-config-fifo", REPORT, stderr=r"config\.json is not a regular file", setup=_fifo_config, timeout=30),
    Case(
        "11.12-config-fifo-named-directly",
        ["report", "{tmp}/m/config.json", "--no-cache"],
        stderr=r"config\.json is not a regular file",
        setup=_fifo_config,
        timeout=30,
    ),
]

# ---------------------------------------------------------------- item 13: nothing to audit

EMPTY_CASES = [
    Case(
        "11.13-pretrainedmodel-has-no-parameters",
        REPORT,
        stderr=r"builds a PreTrainedModel with no parameters: nothing to audit",
        setup=_llama(architectures=["PreTrainedModel"]),
    ),
    Case(
        "11.13-zero-parameters-in-fit",
        ["fit", "{tmp}/m", "--gpu", "H100"],
        stderr=r"no parameters",
        setup=_llama(architectures=["PreTrainedModel"]),
    ),
]

CASES = CONFIG_CASES + CACHE_CASES + LIMIT_CASES + EMPTY_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


# ---------------------------------------------------------------- item 5: a hub that accepts and never answers

#: How long the stalling hub holds each request before giving up by itself (far past the bound tested).
STALL_S = 60.0
#: The hub bound these rows configure (``PEFTAUDIT_HUB_TIMEOUT``): small, so the rows take seconds.
HUB_BOUND_S = 2


class _StallingHub(http.server.ThreadingHTTPServer):
    """A hub on 127.0.0.1 that reads each request and answers only after :data:`STALL_S`, or when stopped."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StallHandler)
        self.stop = threading.Event()
        self.requests: list[str] = []


class _StallHandler(http.server.BaseHTTPRequestHandler):
    server: _StallingHub

    def _stall(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        self.server.stop.wait(STALL_S)
        self.send_error(503)

    do_GET = do_HEAD = _stall

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stalling_hub() -> Iterator[_StallingHub]:
    hub = _StallingHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.stop.set()
        hub.shutdown()
        hub.server_close()


def _hub_env(hub: _StallingHub) -> dict[str, str]:
    return {
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": "{tmp}/hf-home",  # an empty hub cache: only the (stalling) hub could answer
        "PEFTAUDIT_HUB_TIMEOUT": str(HUB_BOUND_S),
    }


def _timed(case: Case, tmp: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = run_case(case, tmp)
    return result, time.monotonic() - start


def test_slow_hub_is_one_line_within_the_bound(stalling_hub: _StallingHub, tmp_path: Path) -> None:
    case = Case(
        "11.5-slow-hub-unknown-model",
        ["report", "acme/no-such-model", "--no-cache"],
        stderr=rf"'acme/no-such-model': the hub did not answer within {HUB_BOUND_S} s \(PEFTAUDIT_HUB_TIMEOUT\)",
        env=_hub_env(stalling_hub),
        timeout=STALL_S - 5,
    )
    _, elapsed = _timed(case, tmp_path)
    assert any("acme/no-such-model" in r for r in stalling_hub.requests), "the hub was never asked"
    # The bound plus interpreter start-up, far below the hub's own stall (and its retries).
    assert elapsed < HUB_BOUND_S + 15


def test_slow_hub_falls_back_to_the_catalog_quietly(stalling_hub: _StallingHub, tmp_path: Path) -> None:
    def only_the_note(_: Path, result: subprocess.CompletedProcess[str]) -> None:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"library noise on stderr: {result.stderr}"
        assert "using the bundled catalog's config instead" in lines[0]
        assert strict_json(result.stdout)["model"]["source"] == "catalog"

    case = Case(
        "11.5-slow-hub-catalog-fallback",
        ["report", "openai-community/gpt2", "--online", "--json", "--no-cache"],
        exit_code=0,
        stderr=rf"the hub did not answer within {HUB_BOUND_S} s",
        env=_hub_env(stalling_hub),
        check=only_the_note,
        timeout=STALL_S - 5,
    )
    _, elapsed = _timed(case, tmp_path)
    assert elapsed < HUB_BOUND_S + 15


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_hub_bound_must_be_a_positive_number(value: str, tmp_path: Path) -> None:
    run_case(
        Case(
            f"11.5-hub-timeout-{value}",
            ["report", "acme/no-such-model", "--no-cache"],
            stderr=r"PEFTAUDIT_HUB_TIMEOUT must be a positive number of seconds",
            env={"PEFTAUDIT_HUB_TIMEOUT": value},
        ),
        tmp_path,
    )
