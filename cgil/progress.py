"""Progress bars for long phases (rich), silent when asked to be."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Progress on stderr (unless disabled) and every log line, quiet or not, in the run's train.log."""

    def __init__(self, console: Optional[Console] = None, enabled: bool = True):
        self.console = console or Console(stderr=True, markup=False)  # paths may hold [brackets]
        self.enabled = enabled
        self.log_path: Optional[Path] = None
        self._pending: list[str] = []  # lines logged before the run directory exists

    def attach_log(self, path: Path) -> None:
        """Append this and every later log line to `path` (created with the run directory)."""
        self.log_path = Path(path)
        pending, self._pending = self._pending, []
        for line in pending:
            self._append(line)

    def _append(self, line: str) -> None:
        if self.log_path is None:
            self._pending.append(line)
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def log(self, message: str) -> None:
        self._append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
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
