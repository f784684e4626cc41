"""Progress of long work, reported by computing code and shown (or not) by the command line.

Computing code never draws anything: it takes an optional :data:`Progress`
callback, called with ``(done, total)`` as the work advances (the trace's
steps, the setups of a ``gpus`` sweep), and stays free of rich. The command
line decides whether anything is shown (a terminal on stdout and stderr, not
``--format json``: :func:`peftaudit.commands._output.shows_progress`) and, when
so, installs a :class:`Reporter` for the command with :func:`reporting`
(:func:`peftaudit.render.progress.display` draws a rich bar on stderr).

A command opens a labelled line of progress with :func:`task` and hands its
callback to the computing code. Work that runs deep inside a pure function
(a new architecture's step profile, derived inside
:func:`peftaudit.memory.estimate` by whichever command estimates first) opens
its own :func:`task`: with no reporter installed, as in every library call and
test, :func:`task` gives ``None`` and costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Literal, Protocol

#: Called with ``(done, total)`` as work advances: ``done`` of ``total`` units are finished.
Progress = Callable[[int, int], None]

#: What a task counts: steps (``2/4``) or bytes (shown as a size and a rate).
Unit = Literal["steps", "bytes"]


class Reporter(Protocol):
    """Something that shows tasks' progress (the CLI's rich bar; a list in tests)."""

    def task(self, label: str, unit: Unit) -> AbstractContextManager[Progress]:
        """A line of progress labelled ``label``, open for the ``with`` block; its callback."""
        ...


_REPORTER: ContextVar[Reporter | None] = ContextVar("peftaudit_progress_reporter", default=None)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the progress of every :func:`task` opened in this block through ``reporter`` (``None``: nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def active() -> bool:
    """Whether progress is shown: a reporter is installed (work that is costly to size can skip it)."""
    return _REPORTER.get() is not None


@contextmanager
def task(label: str, *, unit: Unit = "steps") -> Iterator[Progress | None]:
    """A line of progress for the ``with`` block, or ``None`` when no reporter is installed."""
    reporter = _REPORTER.get()
    if reporter is None:
        yield None
        return
    with reporter.task(label, unit) as progress:
        yield progress


def advancing(progress: Progress | None, total: int) -> Callable[[int], None] | None:
    """An ``advance(n)`` callback over ``progress``: ``n`` more of ``total`` are done (thread-safe).

    For work counted in increments from several threads (bytes hashed by a pool of workers).
    """
    if progress is None:
        return None
    lock = threading.Lock()
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            progress(done, total)

    return advance
