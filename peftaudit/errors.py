"""Errors peftaudit raises for bad input, so the CLI can answer in one line."""

from __future__ import annotations


class PeftauditError(Exception):
    """A problem with the user's input or environment, not a bug in peftaudit.

    The CLI prints ``peftaudit: error: <message>`` on one line and exits with
    code 2; Python callers get the exception with the same message.
    """


class SourceNotFound(PeftauditError):
    """No model source could resolve the given id or path."""


class ConfigError(PeftauditError):
    """A config.json that is missing, malformed, truncated or unbuildable."""


class RemoteCodeRequired(PeftauditError):
    """The model needs ``trust_remote_code`` and the user did not allow it."""


class PluginError(PeftauditError):
    """A plugin failed to load or implements a hook peftaudit does not declare."""
