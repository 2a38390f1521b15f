"""The task table: the one owner of every fact about a served task, safe across threads.

A served model has a fixed number of task rows (its compiled programs index
task embeddings, adapters and heads by row). The table knows which task holds
each row, with the task's kind, the head it answers from, its labels and
length limit, and how many admitted requests still use each row. Everyone
else asks it: the scheduler when it admits a request (:meth:`TaskTable.acquire`
pins the task's row to the request until it finishes), the server when it
parses one, the HTTP routes when they list tasks.

Adding a task is one transaction: :meth:`~TaskTable.reserve` takes a free row
that fits (and the name), the caller writes the row's weights meanwhile, then
:meth:`~TaskTable.commit` publishes the task or :meth:`~TaskTable.abort`
gives the row back. A task is served fully or not at all. Removing a task
(:meth:`~TaskTable.remove`) unpublishes it at once; its row is reused only
after the last request admitted for it has finished.

Host only: no JAX.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence

from mtl.config import HeadConfig

SPARE = "free:{}"  # a spare row's placeholder head: not a name a task file can give (tasks name files)


def is_spare(head: HeadConfig) -> bool:
    return head.task.startswith("free:")


class TaskError(ValueError):
    """A task that cannot be added or removed: one line, answered with ``status`` (400; 404: no such task)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Task:
    """A served task, as it was when the record was made (records are never changed, only replaced).

    Attributes:
      name: what requests name.
      kind: ``generate``, ``classify``, ``regress`` or ``tag``.
      row: its row in the task embeddings, adapter stacks and heads.
      head: the head module it answers from: its own name, or that of the spare row it was added to.
      labels: classify: its labels; tag: its tags.
      max_new_tokens: generate: the default length of an answer (0: the server's default).
      value_mean, value_std: regress: its targets' scale (the head predicts in standard units).
      run: the run folder it was added from while serving; None for the served run's own tasks.
    """

    name: str
    kind: str
    row: int
    head: str
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 0
    value_mean: float = 0.0
    value_std: float = 1.0
    run: str | None = None


def fits(row_head: HeadConfig, kind: str, classes: int) -> bool:
    """Whether a task of ``kind`` with ``classes`` labels can live in a spare row compiled with ``row_head``.

    Generation uses no head of its own (the language-model head answers it), so it fits any row;
    the other kinds need the row's head to be of their kind, with at least their labels.
    """
    if kind == "generate":
        return True
    return row_head.kind == kind and (kind == "regress" or row_head.num_classes >= classes)


class TaskTable:
    """Which task holds each row of a served model, and how many requests use each row.

    Args:
      heads: the model's heads as compiled, one a row; spare rows are named ``free:N``.
      infos: per task name, the run's task record (``labels``, ``max_new_tokens``), where known.
    """

    def __init__(self, heads: Sequence[HeadConfig], infos: Mapping[str, Mapping] | None = None):
        infos = infos or {}
        self.heads = tuple(heads)
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._owners: list[str | None] = [None] * len(self.heads)
        self._in_use = [0] * len(self.heads)  # admitted requests not yet finished, by row
        self._reserved: dict[int, str] = {}  # rows being filled by an add, and the name being added
        for row, head in enumerate(self.heads):
            if is_spare(head):
                continue
            info = infos.get(head.task, {})
            self._tasks[head.task] = Task(
                head.task,
                head.kind,
                row,
                head.task,
                tuple(info.get("labels", ())),
                int(info.get("max_new_tokens", 0) or 0),
                head.value_mean,
                head.value_std,
            )
            self._owners[row] = head.task

    # Reading.

    def get(self, name: str) -> Task | None:
        with self._lock:
            return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._tasks

    def names(self) -> list[str]:
        """The served tasks' names, sorted."""
        with self._lock:
            return sorted(self._tasks)

    def kinds(self) -> dict[str, str]:
        """Each served task's kind, by name."""
        with self._lock:
            return {name: task.kind for name, task in self._tasks.items()}

    def tasks(self) -> list[Task]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.name)

    def in_use(self, row: int) -> int:
        """Requests admitted on ``row`` that have not finished."""
        with self._lock:
            return self._in_use[row]

    # Requests hold their task's row while they run.

    def acquire(self, name: str) -> Task | None:
        """The task ``name`` (None if it is not served), its row held for one request until :meth:`release`."""
        with self._lock:
            task = self._tasks.get(name)
            if task is not None:
                self._in_use[task.row] += 1
            return task

    def release(self, task: Task) -> None:
        """One request of ``task`` has finished (or was never admitted): its row is free of it."""
        with self._lock:
            self._in_use[task.row] -= 1
            assert self._in_use[task.row] >= 0, f"row {task.row} released more often than acquired"

    # Adding and removing: transactions.

    def reserve(self, name: str, kind: str, classes: int = 0) -> int:
        """Takes a free row that can hold a ``kind`` task with ``classes`` labels, and the name, for an add.

        Raises:
          TaskError: the name is served or being added already, or no free row fits.
        """
        with self._lock:
            if name in self._tasks:
                raise TaskError(f"task {name!r} is served already; DELETE /v1/tasks/{name} first to replace it")
            if name in self._reserved.values():
                raise TaskError(f"task {name!r} is being added already")
            free = [
                row
                for row, owner in enumerate(self._owners)
                if owner is None and row not in self._reserved and self._in_use[row] == 0
            ]
            fitting = [row for row in free if fits(self.heads[row], kind, classes)]
            if fitting:
                # Rows that fit nothing else first: a generation task leaves the heads to the tasks that need them.
                row = min(fitting, key=lambda r: (self.heads[r].kind != "generate", self.heads[r].num_classes, r))
                self._reserved[row] = name
                return row
            if free:
                raise TaskError(_no_fit(kind, classes, [self.heads[r] for r in free]))
            raise TaskError(
                f"no room for another task: serve.max_tasks={len(self._owners)} rows are in use; "
                "DELETE a task or serve with a larger serve.max_tasks"
            )

    def commit(self, task: Task) -> None:
        """Publishes ``task`` in the row :meth:`reserve` gave it: from now on requests may name it."""
        with self._lock:
            assert self._reserved.get(task.row) == task.name, f"row {task.row} is not reserved for {task.name!r}"
            del self._reserved[task.row]
            self._owners[task.row] = task.name
            self._tasks[task.name] = task

    def abort(self, row: int) -> None:
        """Gives back a row :meth:`reserve` took, its add having failed."""
        with self._lock:
            self._reserved.pop(row, None)

    def remove(self, name: str) -> Task:
        """Stops serving ``name`` at once; its row is free again once its last admitted request finishes.

        Raises:
          TaskError: no such task is served (status 404).
        """
        with self._lock:
            task = self._tasks.pop(name, None)
            if task is None:
                raise TaskError(f"task {name!r} is not served", status=404)
            self._owners[task.row] = None
            return task


def _no_fit(kind: str, classes: int, free: Sequence[HeadConfig]) -> str:
    if kind == "classify" or kind == "tag":
        same = [h.num_classes for h in free if h.kind == kind]
        if same:
            return (
                f"no free row has a {kind} head for {classes} labels (the largest holds {max(same)}); "
                "serve with serve.max_classes at least that"
            )
    return f"no free row has a {kind} head; serve with serve.spare_kinds including {kind}"
