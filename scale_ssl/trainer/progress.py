"""Rank-zero progress display: a live rich bar on a terminal, plain lines in a log file or CI.

Values shown are those fetched at logging intervals; the bar never forces a device sync itself.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressDisplay:
    def __init__(self, enabled: bool, total_steps: int | None, description: str = "fit"):
        self.enabled = enabled
        self.total = total_steps
        self.console = Console(file=sys.stderr)
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._fields: dict[str, str] = {}
        self._last_line = 0.0
        self.description = description

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, metrics="")
        return self

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        if metrics:
            self._fields = {k: _fmt(v) for k, v in metrics.items()}
        text = " ".join(f"{k}={v}" for k, v in self._fields.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=text)
        elif metrics:
            total = f"/{self.total}" if self.total else ""
            self.console.print(f"[{self.description}] step {step}{total} {text}", highlight=False)

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3f}"
    return f"{value:.4g}"


def now() -> float:
    return time.perf_counter()
