"""Make the plugin active in-process whether or not entry-point autoload is on.

The repository's own test run turns autoload off, so the plugin module is
registered here the way a user's installed entry point would register it.
"""

from __future__ import annotations

from collections.abc import Iterator

import peftaudit_diffusers
import pytest

from peftaudit import plugins


@pytest.fixture
def diffusers_plugin() -> Iterator[None]:
    """The plugin registered with peftaudit for the test's duration (once, however it got there)."""
    pm = plugins.get_plugin_manager()
    if pm.is_registered(peftaudit_diffusers):
        yield
        return
    plugins.register_plugin(peftaudit_diffusers, name="peftaudit-diffusers-under-test")
    try:
        yield
    finally:
        plugins.unregister_plugin(peftaudit_diffusers)
