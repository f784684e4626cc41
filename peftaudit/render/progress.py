"""The progress bar: rich, on stderr, for work still running after a moment.

:class:`BarReporter` is the command line's :class:`~peftaudit.progress.Reporter`:
each :func:`peftaudit.progress.task` is one line (``tracing lora ━━━━━━ 1/2 0:00:04``,
bytes as a size and a rate). Nothing is drawn for work done within
:data:`DELAY_S` (a fast ``gpus`` sweep would only flicker), and the bar is
transient: when the last open task ends it is erased, before the command
prints its result. rich is imported when the first task opens, never at start-up.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from peftaudit.progress import Progress, Unit

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress as RichProgress

#: Seconds a task runs before the bar is drawn.
DELAY_S = 0.5


class BarReporter:
    """Tasks as lines of one rich progress display on ``file`` (stderr by default)."""

    def __init__(self, file: TextIO | None = None, *, delay: float | None = None) -> None:
        self._file = file if file is not None else sys.stderr
        self._delay = DELAY_S if delay is None else delay
        self._lock = threading.Lock()
        self._bar: RichProgress | None = None
        self._timer: threading.Timer | None = None
        self._shown = False
        self._open = 0

    @contextmanager
    def task(self, label: str, unit: Unit) -> Iterator[Progress]:
        """One line labelled ``label`` for the ``with`` block; the callback moves it (``done``, ``total``)."""
        with self._lock:
            bar = self._bar or self._new_bar()
            task_id = bar.add_task(label, total=None, unit=unit)
            self._open += 1
            if self._delay <= 0:
                self._start(bar)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        try:
            yield update
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    self._close()  # its last frame shows this task as it ended
                bar.remove_task(task_id)

    def _new_bar(self) -> RichProgress:
        from rich.console import Console
        from rich.progress import BarColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            "{task.description}",
            BarColumn(),
            _amount_column(),
            TimeRemainingColumn(),
            console=Console(file=self._file),
            transient=True,
            # stdout is the command's result: never through the bar. Our own notes on stderr
            # print above it while it is drawn.
            redirect_stdout=False,
        )
        self._bar = bar
        if self._delay > 0:
            self._timer = threading.Timer(self._delay, self._show, args=(bar,))
            self._timer.daemon = True
            self._timer.start()
        return bar

    def _show(self, bar: RichProgress) -> None:
        """The timer's end: draw ``bar`` if its tasks are still running."""
        with self._lock:
            self._start(bar)

    def _start(self, bar: RichProgress) -> None:
        if self._bar is bar and not self._shown:
            bar.start()
            self._shown = True

    def _close(self) -> None:
        """Under the lock, the last task done: erase the bar; the next task starts a new one."""
        if self._timer is not None:
            self._timer.cancel()
        if self._bar is not None and self._shown:
            self._bar.stop()
        self._bar, self._timer, self._shown = None, None, False


def _amount_column() -> Any:
    """A column of how much is done: ``1/2`` for steps; a size, its total and a rate for bytes."""
    from rich.progress import DownloadColumn, MofNCompleteColumn, ProgressColumn, Task, TransferSpeedColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._steps = MofNCompleteColumn()
            self._size = DownloadColumn()
            self._rate = TransferSpeedColumn()

        def render(self, task: Task) -> Text:
            if task.fields.get("unit") == "bytes":
                return Text.assemble(self._size.render(task), " ", self._rate.render(task))
            return self._steps.render(task)

    return Amount()
