"""What a training run shows while it runs: per-task metrics between log lines, and the progress display.

:class:`Window` gathers each step's metrics on the device and fetches them once
a log interval (tokens/s and MFU with compilation time left out, non-finite
steps noted); :func:`make_progress` is rich's bar on a terminal, a plain line
every few seconds elsewhere.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


class Window:
    """Per-task metrics between two log lines; device values are fetched only at flush.

    Throughput counts only timed steps (:meth:`timed`): ``tokens`` their real
    (non-padding) tokens, ``flops`` the model FLOPs of the padded batches the
    devices computed for them. A step that compiles, a checkpoint or an
    evaluation is :meth:`untimed`: its seconds leave the clock and its tokens and
    FLOPs leave the counts, so neither tokens/s nor MFU counts work it did
    outside the time they divide by. A window of untimed steps only has no
    throughput (None). ``diverged`` is set, at a fetch, to ``(step, task,
    what)`` of the first step whose update was skipped as non-finite.
    """

    def __init__(self, peak_flops: float):
        self.peak_flops = peak_flops
        self.diverged: tuple[int, str, str] | None = None
        self.reset()

    def reset(self):
        self.sums: dict[str, list] = {}
        self.steps: dict[str, list[int]] = {}
        self.checked = 0  # steps of ``sums`` whose flags have been read
        self.tokens = 0
        self.flops = 0.0
        self.excluded = 0.0
        self.t0 = time.perf_counter()

    def timed(self, tokens: int, flops: float) -> None:
        """A step whose time counts: its real tokens and model FLOPs."""
        self.tokens += tokens
        self.flops += flops

    def untimed(self, seconds: float) -> None:
        """Seconds that are not training throughput (a compile, a checkpoint, an evaluation)."""
        self.excluded += seconds

    def add(self, task: str, metrics, step: int = 0) -> None:
        self.sums.setdefault(task, []).append(metrics)
        self.steps.setdefault(task, []).append(step)

    def check(self) -> None:
        """Fetches only the ``skipped`` flags of the steps so far (before a checkpoint is saved)."""
        flags = jax.device_get({t: [m.get("skipped", 0.0) for m in items] for t, items in self.sums.items()})
        self._note(flags)

    def _note(self, flags: dict[str, list]) -> None:
        bad = [(s, t) for t, fs in flags.items() for s, f in zip(self.steps[t], fs) if float(f) > 0]
        if bad and self.diverged is None:
            step, task = min(bad)
            self.diverged = (step, task, "the loss or gradient norm")

    def flush(self, step: int) -> list[dict]:
        fetched = jax.device_get(self.sums)  # the one host sync of a log interval
        self._note({t: [m.get("skipped", 0.0) for m in items] for t, items in fetched.items()})
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        records = []
        for task, items in sorted(fetched.items()):
            record = {"step": step, "task": task, "steps": len(items)}
            for key in items[0]:
                if key == "skipped":
                    continue
                value = float(np.mean([m[key] for m in items]))
                record[key] = round(value, 6) if math.isfinite(value) else None  # metrics.jsonl is strict JSON
            if skipped := int(sum(float(m.get("skipped", 0.0)) for m in items)):
                record["skipped_steps"] = skipped
            timed = self.tokens > 0
            record["tokens_per_s"] = round(self.tokens / seconds, 1) if timed else None
            record["mfu"] = round(self.flops / seconds / self.peak_flops, 4) if timed else None
            record["mfu_peak_flops"] = round(self.peak_flops)  # what MFU divides by: the matmul peak measured
            records.append(record)
        self.reset()
        return records


def losses_text(last: dict) -> str:
    losses = "  ".join(
        f"{t} {r['loss']:.3f}" if r.get("loss") is not None else f"{t} non-finite" for t, r in sorted(last.items())
    )
    rate = next(iter(last.values())).get("tokens_per_s") if last else None
    return losses + (f"  {rate / 1e3:.1f}k tok/s" if rate else "")


class Eta:
    """The time left, from the steps done since the start and the seconds they took, less compilations.

    A step that compiles takes seconds to minutes more than the rest; counted,
    it made the first estimate of a run hours long (issue 26). :meth:`untimed`
    takes such a step out: its seconds and the step itself.
    """

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t_start = total, start, time.perf_counter()

    def untimed(self, seconds: float, steps: int = 1) -> None:
        self.t_start += seconds
        self.start += steps

    def text(self, completed: int) -> str:
        done, seconds = completed - self.start, time.perf_counter() - self.t_start
        if done <= 0 or seconds <= 0:
            return "? left"
        left = (self.total - completed) * seconds / done
        return time.strftime("%H:%M:%S", time.gmtime(left)) + " left"


def make_progress(console: Console, total: int, start: int) -> Bar | Lines:
    """A progress bar on a terminal; elsewhere (a pipe, a file, a notebook) a plain line every few seconds."""
    if console.is_terminal and not console.is_jupyter:
        return Bar(console, total, start)
    return Lines(console, total, start)


class Bar:
    """rich's progress bar, with the losses and throughput beside it."""

    def __init__(self, console: Console, total: int, start: int):
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[left]}"),  # ours, not rich's: it leaves compilations out
            TextColumn("{task.fields[losses]}"),
            console=console,
            disable=console.quiet,  # processes other than 0 show no bar
        )
        self.progress.add_task("train", total=total, completed=start, losses="", left="? left")
        self.console = self.progress.console
        self.eta = Eta(total, start)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def log(self, message: str) -> None:
        self.console.log(message)

    def untimed(self, seconds: float, steps: int = 1) -> None:
        self.eta.untimed(seconds, steps)

    def update(self, completed: int, losses: str | None = None) -> None:
        fields = {"left": self.eta.text(completed)} | ({} if losses is None else {"losses": losses})
        self.progress.update(0, completed=completed, **fields)


class Lines:
    """One plain line every ``every`` seconds: step, per-task loss, tokens/s and the time left."""

    def __init__(self, console: Console, total: int, start: int, every: float = 5.0):
        self.console, self.total, self.every = console, total, every
        self.eta = Eta(total, start)
        self.last_print = time.perf_counter()
        self.losses = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def log(self, message: str) -> None:
        self.console.log(message)

    def untimed(self, seconds: float, steps: int = 1) -> None:
        self.eta.untimed(seconds, steps)

    def update(self, completed: int, losses: str | None = None) -> None:
        if losses is not None:
            self.losses = losses
        now = time.perf_counter()
        if now - self.last_print < self.every and completed != self.total:
            return
        self.last_print = now
        self.console.print(
            f"train step {completed}/{self.total}  {self.losses}  {self.eta.text(completed)}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
