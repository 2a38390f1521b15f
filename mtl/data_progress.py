"""What tokenizing a task file shows: rows/s and the time left, then what the cache holds.

A rich bar on a terminal; elsewhere (a pipe, a log file) a first line at once
and then one line about every ten seconds, so a user piping a ten-million-row
build sees it move.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


def tokenize_progress(console: Console, name: str, total: int, every: float = 10.0) -> TokenizeBar | TokenizeLines:
    """The display of one task file's build: ``update(bytes read, bytes in all, rows so far)``."""
    if console.is_terminal and not console.is_jupyter:
        return TokenizeBar(console, name, total)
    return TokenizeLines(console, name, total, every)


def rate_text(rows: int, seconds: float) -> str:
    return f"{rows / max(seconds, 1e-9):,.0f} rows/s"


class TokenizeBar:
    """rich's bar over the file's bytes, with the rows and rows/s beside it."""

    def __init__(self, console: Console, name: str, total: int):
        self.t0 = time.perf_counter()
        self.progress = Progress(
            TextColumn(f"tokenizing {name}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rows]}"),
            console=console,
            disable=console.quiet,
        )
        self.progress.add_task("tokenize", total=total, rows="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, done: int, total: int, rows: int) -> None:
        text = f"{rows:,} rows, {rate_text(rows, time.perf_counter() - self.t0)}"
        self.progress.update(0, completed=done, total=total, rows=text)


class TokenizeLines:
    """A line at the start, then one about every ``every`` seconds: percent, rows, rows/s, time left."""

    def __init__(self, console: Console, name: str, total: int, every: float = 10.0):
        self.console, self.name, self.total, self.every = console, name, total, every
        self.t0 = self.last = time.perf_counter()

    def __enter__(self):
        self._print(f"tokenizing {self.name}: {self.total / 1e6:,.1f} MB to read (a line every {self.every:.0f}s)")
        return self

    def __exit__(self, *exc):
        return None

    def update(self, done: int, total: int, rows: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        left = elapsed * (total - done) / done if done else float("nan")
        left_text = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
        self._print(
            f"tokenizing {self.name}: {100 * done / max(total, 1):.0f}%  {rows:,} rows  "
            f"{rate_text(rows, elapsed)}  {left_text} left"
        )

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)
