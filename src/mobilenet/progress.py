"""The one progress display: a rich bar with count, rate and ETA, on stderr so stdout stays clean for JSON.

Every long job (decoding a dataset, training, evaluation, prediction, calibration, reproduce) shows progress
through :func:`progress_bar` (one bar) or :func:`new_progress` (a display holding several bars).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

__all__ = ["new_progress", "progress_bar"]


def progress_columns(*fields: str) -> list[ProgressColumn]:
    """Description, bar, done/total, percent, elapsed time, the ETA, then the named per-task text ``fields`` (a
    rate, running metrics): last, so that in a narrow terminal the free text is cut, not the ETA."""

    def fixed(width: int) -> Column:
        return Column(no_wrap=True, min_width=width)

    return [
        TextColumn(
            "{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", min_width=11, max_width=24)
        ),
        BarColumn(bar_width=12, table_column=fixed(12)),
        MofNCompleteColumn(table_column=fixed(9)),
        TaskProgressColumn(table_column=fixed(4)),
        TimeElapsedColumn(table_column=fixed(7)),
        TextColumn("ETA", table_column=fixed(3)),
        TimeRemainingColumn(table_column=fixed(7)),
        *(_FieldColumn(name) for name in fields),
    ]


class _FieldColumn(ProgressColumn):
    """A task's text field on one line, cut with an ellipsis where the terminal is too narrow (a plain TextColumn
    would wrap it, or squeeze the ETA out)."""

    def __init__(self, name: str) -> None:
        super().__init__(table_column=Column(ratio=1, min_width=1))
        self.name = name

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get(self.name, "")), no_wrap=True, overflow="ellipsis")


def new_progress(*fields: str, enabled: bool = True, transient: bool = False, stderr: bool = True) -> Progress:
    """A rich :class:`~rich.progress.Progress` with :func:`progress_columns`; each task sets the named ``fields``.

    ``stderr`` (default) keeps stdout clean for ``--format json``; a job that logs lines to stdout while its bar
    runs (training) passes False, so rich keeps the log above the bar.
    """
    console = Console(stderr=True) if stderr else None
    return Progress(*progress_columns(*fields), console=console, disable=not enabled, transient=transient)


@contextmanager
def progress_bar(
    total: int, description: str, *, enabled: bool = True, unit: str = "img", transient: bool = False
) -> Iterator[Callable[[int], None]]:
    """One bar over ``total`` items; yields ``advance(n)``, which also updates the rate (``unit``/s)."""
    if not enabled:
        yield lambda _n: None
        return
    with new_progress("rate", transient=transient) as bar:
        task = bar.add_task(escape(description), total=total, rate="")  # a folder named "d[/b]" is not markup
        started = time.perf_counter()

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{done / elapsed:.1f} {unit}/s")

        yield advance
