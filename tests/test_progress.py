"""The one progress display: at 80 columns the ETA is never cut (the free text is), and the rate is shown."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress

from mobilenet.progress import progress_bar, progress_columns


def _render(width: int, stats: str) -> str:
    console = Console(width=width, record=True, force_terminal=False)
    bar = Progress(*progress_columns("stats"), console=console, auto_refresh=False)
    task = bar.add_task("epoch 12/16", total=390, stats=stats)
    bar.update(task, completed=120)
    console.print(bar.make_tasks_table(bar.tasks))
    return console.export_text()


def test_eta_survives_a_narrow_terminal():
    stats = "loss 1.234 acc 55.0% 250 img/s lr 0.0935 and more text than fits"
    narrow = _render(80, stats)
    assert "epoch 12/16" in narrow and "120/390" in narrow and "ETA -:--:--" in narrow
    assert len(narrow.splitlines()[0]) <= 80
    assert stats in _render(160, stats)


def test_progress_bar_advances_and_can_be_off():
    with progress_bar(4, "x", enabled=False) as advance:
        advance(4)  # a no-op when off
    with progress_bar(4, "x", transient=True) as advance:
        advance(2)
        advance(2)


def test_a_description_holding_markup_is_shown_as_it_is(monkeypatch):
    """A data folder named "d[/b]" in "decoding d[/b]" raised rich's MarkupError on a terminal."""
    console = Console(width=120, record=True, force_terminal=True)
    monkeypatch.setattr("mobilenet.progress.Console", lambda **_: console)
    with progress_bar(2, "decoding d[/b]/[bold]x", transient=False) as advance:
        advance(2)
    assert "decoding d[/b]/[bold]x" in console.export_text()
