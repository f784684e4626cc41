"""The exit codes of ``peftaudit``: what a script or CI job can rely on.

Importing this module imports nothing else, so the CLI's ``--help`` path stays light.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How a ``peftaudit`` command ended; an ``int``, so it is also the process's exit status."""

    #: Success: the command did what was asked (findings below ``--fail-on`` included).
    OK = 0
    #: Findings at or above ``--fail-on``, or a verification that failed.
    FINDINGS = 1
    #: A usage or input error (a bad flag, an unknown model, unreadable output): one line on stderr.
    USAGE = 2
    #: An internal error, a bug: one line on stderr, the traceback with ``PEFTAUDIT_DEBUG=1``.
    INTERNAL = 3
    #: Interrupted with Ctrl-C (128 + SIGINT, as shells report it).
    INTERRUPTED = 130
