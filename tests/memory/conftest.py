"""Fixtures for the memory-estimator tests: model skeletons and inventories, built once."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from memory_models import CONFIGS, build

DATA = Path(__file__).parent / "data"


@functools.cache
def _inventory(key: str) -> Any:
    from peftaudit.inventory import take_inventory

    config = CONFIGS[key] if key in CONFIGS else json.loads(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return take_inventory(build(config))


@pytest.fixture(scope="session")
def inventory_of() -> Any:
    """``inventory_of("llama")`` or ``inventory_of(config_dict)``: a cached inventory."""

    def get(name_or_config: str | dict[str, Any]) -> Any:
        key = name_or_config if isinstance(name_or_config, str) else json.dumps(name_or_config, sort_keys=True)
        return _inventory(key)

    return get


@pytest.fixture(scope="session")
def measurements() -> dict[str, Any]:
    return json.loads((DATA / "measurements.json").read_text())
