"""Progress bars for long phases (rich), silent when asked to be."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, console: Optional[Console] = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    @contextmanager
    def phase(self, description: str) -> Iterator[Callable[[int, int], None]]:
        if not self.enabled:
            yield lambda done, total: None
            return
        with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
