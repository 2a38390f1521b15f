"""A training run's folder: its config, tasks, metrics, TensorBoard scalars and checkpoints.

::

    RUN/
      config.json      the resolved config (mtl.config), read back to resume and to serve
      tasks.json       each task's name, kind, labels and generation length
      metrics.jsonl    one JSON record a line: training and evaluation metrics
      tensorboard/     the same numbers as TensorBoard scalars
      checkpoints/     mtl.checkpoint's step folders
      best/            the checkpoint ranked highest by train.best_metric
      .lock            held (fcntl.flock) by the train.py writing the folder; names its pid

In a multi-process run only process 0 writes files; every process writes its
own shards of the checkpoints.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import socket

import jax
import numpy as np
from tensorboardX import SummaryWriter

from mtl import config as C
from mtl import disk
from mtl.checkpoint import Checkpoints, complete_steps, restore_newest, set_aside
from mtl.config import UsageError
from mtl.evaluator import selection_score

# Fields that may change between a run and its resumption; nothing else may.
# (Remat, unrolling and micro-batching compute the same update another way.)
RESUMABLE_TRAIN = {"steps", "mesh", "log_every", "eval_every", "eval_examples", "checkpoint_every", "keep_checkpoints"}
RESUMABLE_TRAIN |= {"grad_accum"}
RESUMABLE_MODEL = {"remat", "scan_unroll"}


class RunFolder:
    """``config.json``, ``tasks.json``, ``metrics.jsonl`` and ``tensorboard/`` of one run."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._board = None  # TensorBoard writer, opened on the first record
        self._lock = None  # the open lock file, while this process trains the run

    def lock(self) -> None:
        """Takes the folder's lock, or raises UsageError naming the process that holds it.

        The lock is ``fcntl.flock`` on ``.lock`` (``.lock-I`` for process I of a
        multi-process run), so the operating system releases it when the process
        ends, however it ends; the file stays, holding the last holder's pid.
        """
        if self._lock is not None:
            return
        index = jax.process_index()
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / (".lock" if index == 0 else f".lock-{index}")
        f = path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UsageError(
                f"--out {str(self.path)!r} is being trained by {holder}; "
                "wait for it to end, stop it, or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"train.py pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock = f

    def check_path(self) -> None:
        """Raises UsageError if the folder cannot be one: it or a folder above it is a file, or it cannot be written."""
        for path in (self.path, *self.path.parents):
            if path.exists() and not path.is_dir():
                what = "" if path == self.path else f" (its parent {str(path)!r} is)"
                raise UsageError(f"--out {str(self.path)!r} must be a folder, but a file is there{what}")
            if path.exists():
                break
        disk.check_writable(self.path)

    def check_resumable(self, cfg: C.Config, tasks: list[dict] | None = None) -> None:
        """Raises UsageError if the folder holds a run of another model or data, or one past ``train.steps``.

        The serving section may change freely: it is how the run is served, not
        what it trains. More steps extend the run; fewer than its newest
        checkpoint would log its metrics under steps the model is not at.
        ``tasks`` (each task's ``meta()``) must match the kinds and labels the
        run trained on: a task file edited since reads as other data.
        """

        self.check_path()
        saved = self.path / "config.json"
        if not saved.exists():
            if self.path.exists() and any(not p.name.startswith(".lock") for p in self.path.iterdir()):
                raise UsageError(f"--out {str(self.path)!r} is not empty and holds no mtl run")
            return
        old = C.from_dict(json.loads(saved.read_text()))
        changed = [
            f"model.{k}"
            for k, v in dataclasses.asdict(cfg.model).items()
            if k not in RESUMABLE_MODEL and dataclasses.asdict(old.model)[k] != v
        ]
        changed += [
            f"train.{k}"
            for k, v in dataclasses.asdict(cfg.train).items()
            if k not in RESUMABLE_TRAIN and dataclasses.asdict(old.train)[k] != v
        ]
        changed += self._changed_tasks(tasks or [])
        if changed:
            raise UsageError(
                f"--out {str(self.path)!r} holds a run with different {', '.join(changed)}; "
                "use a new --out to start afresh"
            )
        done = complete_steps(self.path / "checkpoints")
        if done and done[-1] > cfg.train.steps:
            raise UsageError(
                f"--out {str(self.path)!r} holds a run already at step {done[-1]}, past --steps {cfg.train.steps}; "
                f"give --steps {done[-1]} or more to resume it, or a new --out"
            )

    def _changed_tasks(self, tasks: list[dict]) -> list[str]:
        """``task NAME kind`` / ``task NAME labels`` for each task whose kind or labels differ from tasks.json's."""
        saved_path = self.path / "tasks.json"
        if not tasks or not saved_path.exists():
            return []
        saved = {t["name"]: t for t in json.loads(saved_path.read_text())}
        return [
            f"task {t['name']} {field}"
            for t in tasks
            if t["name"] in saved
            for field in ("kind", "labels")
            if saved[t["name"]].get(field) != t.get(field)
        ]

    def start(self, cfg: C.Config, task_meta: list[dict]) -> None:
        """Writes the run's config and tasks (again, on resumption: ``steps`` or ``mesh`` may have changed)."""
        if jax.process_index() != 0:
            return  # one writer in a multi-process run
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / "config.json", C.dumps(cfg))
        _write_atomic(self.path / "tasks.json", json.dumps(task_meta, indent=2))

    def truncate_metrics(self, step: int, evaluated: bool) -> None:
        """Drops metric lines a run resumed at ``step`` logs again.

        That is every line after ``step`` and, when ``step`` is one the run
        evaluates at (``evaluated``: the last step, or an ``eval_every`` step),
        its evaluation lines: a run killed while evaluating may have written
        some of them, and the resumed run evaluates that step again. A torn
        last line (a crash mid-write) is dropped too.
        """
        if jax.process_index() != 0 or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line can be torn by a crash; this is not ours to drop
                    raise UsageError(f"{str(self.metrics_path)!r} line {number} is not JSON: {line[:80]!r}") from None
        kept = [
            json.dumps(r, allow_nan=False)
            for r in records
            if r["step"] < step or (r["step"] == step and not (evaluated and "split" in r))
        ]
        _write_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        """Appends ``record`` to ``metrics.jsonl`` and to TensorBoard."""
        if jax.process_index() != 0:
            return  # one writer in a multi-process run
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: the loop writes non-finite as null
        self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        """The same numbers as TensorBoard scalars: ``train/TASK/loss``, ``validation/TASK/accuracy``, ..."""
        if self._board is None:
            self._board = SummaryWriter(str(self.path / "tensorboard"), flush_secs=10)
        section = record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "task", "split", "steps") or not isinstance(value, (int, float)):
                continue
            tag = f"throughput/{key}" if key in ("tokens_per_s", "mfu", "mfu_peak_flops") else f"{section}/{record['task']}/{key}"
            self._board.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class BestCheckpoint:
    """``best/``: the checkpoint whose validation metrics rank highest by ``train.best_metric``.

    Its meta records the score, so a resumed run keeps comparing against it.
    """

    def __init__(self, path: pathlib.Path, spec: str, kinds: dict[str, str], warn=lambda *_: None):
        self.spec, self.kinds = spec, kinds
        self.checkpoints = Checkpoints(path, keep=1)
        self.score = -np.inf
        if steps := self.checkpoints.all_steps():
            try:
                _, meta, skipped = restore_newest(path, steps, self.checkpoints.read_meta, warn, optimizer=True)
                self.score = meta["score"]
            except ValueError:
                skipped = steps  # none readable: the next validation saves a new best
            if skipped:
                if jax.process_index() == 0:
                    for step in skipped:
                        set_aside(path, step)
                self.checkpoints.reload()

    def offer(self, step: int, state, scores: dict, meta: dict) -> None:
        """Saves ``state`` as the best checkpoint if ``scores`` rank above the best so far."""
        score = selection_score(self.spec, self.kinds, scores)
        if not np.isfinite(score):
            return  # a non-finite score ranks nothing (strict JSON in the checkpoint's meta, too)
        if score > self.score and step not in self.checkpoints.all_steps():
            self.score = score
            meta = {**meta, "score": score, "best_metric": self.spec}
            self.checkpoints.save(step, state["model"], state["optimizer"], meta)
