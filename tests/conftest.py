"""Test-wide settings: no network, no user cache, no stray plugins."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest_plugins = ["pytester"]

# No test touches the network: the hub client answers from its cache or fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Third-party plugins installed in the developer's environment must not change results.
os.environ["PEFTAUDIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("NO_COLOR", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite the golden files under tests/golden/ with today's output (review the diff)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--update-golden", default=False):
        os.environ["PEFTAUDIT_UPDATE_GOLDEN"] = "1"
    if not hasattr(config, "workerinput"):
        # One store of derived step profiles for this session, shared by the xdist workers and the
        # CLI processes tests start (they inherit the environment): each model and plan shape is
        # traced once per run, never read from a user's store or an earlier run.
        folder = tempfile.mkdtemp(prefix="peftaudit-profiles-")
        os.environ["PEFTAUDIT_PROFILE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        # Likewise one cache of reports and built models: never the user's ~/.cache.
        reports = tempfile.mkdtemp(prefix="peftaudit-cache-")
        os.environ["PEFTAUDIT_CACHE_DIR"] = reports
        config.add_cleanup(lambda: shutil.rmtree(reports, ignore_errors=True))
