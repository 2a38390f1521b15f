"""The task registry: built-in tasks by name, user files by ``NAME=PATH``."""

import dataclasses
from typing import Callable

import datasets

from tasks import user_files
from tasks.schema import KINDS

__all__ = ["KINDS", "Task", "register", "get", "names", "resolve"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: a name, a kind, and a way to load its data.

    Attributes:
      name: the name used on the command line, in metrics and in requests.
      kind: one of ``KINDS``; decides the head and the columns.
      description: one line for ``--help`` and logs.
      load: returns a ``DatasetDict`` with splits ``train``, ``validation``
        and ``test``, each holding exactly the kind's columns
        (``schema.COLUMNS``). It should cache, since it is called more than
        once.
      file: a user's task file (``NAME=PATH``), which training reads through the
        tokenized-data cache (``tasks.cache.cached_file``) rather than ``load``.
    """

    name: str
    kind: str
    description: str
    load: Callable[[], datasets.DatasetDict]
    file: user_files.TaskFile | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r} has kind {self.kind!r}; accepted kinds are {', '.join(KINDS)}.")
        if not self.name or "=" in self.name or "," in self.name:
            raise ValueError(f"Task name {self.name!r} is not accepted; use a non-empty name without '=' or ','.")


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Adds a task to the registry and returns it.

    Raises:
      ValueError: a task of the same name is already registered.
    """
    if task.name in _TASKS:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """Returns the registered task called ``name``.

    Raises:
      ValueError: no task has that name; the message lists the known ones.
    """
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; known tasks are {', '.join(names()) or 'none'}.") from None


def names() -> list[str]:
    """Returns the names of the registered tasks, sorted."""
    return sorted(_TASKS)


def resolve(specs: list[str]) -> list[Task]:
    """Turns ``--tasks`` specs into tasks, in the order given.

    Args:
      specs: each a registered task name (``g2p``) or ``NAME=PATH`` for a
        user file (``.jsonl``, ``.csv`` or ``.parquet``) whose columns decide
        its kind. A user file's start is read here (a missing file or columns
        that fit no kind fail now); its rows are checked as they are
        tokenized, before training starts.

    Returns:
      The tasks. User-file tasks are not added to the registry.

    Raises:
      ValueError: an unknown name, a bad file, or a name used twice.
    """
    tasks = []
    for spec in specs:
        spec = spec.strip()
        if "=" in spec:
            name, path = (part.strip() for part in spec.split("=", 1))
            if not name or not path:
                raise ValueError(f"Task spec {spec!r} is not accepted; use a task name or NAME=PATH.")
            if path.startswith(user_files.HUB_PREFIX):
                kind, load = user_files.load_hub_task(path)
                task = Task(name, kind, f"{kind} task from {path}", load)
            else:
                task_file = user_files.TaskFile.open(path)
                task = Task(name, task_file.kind, f"{task_file.kind} task from {path}", task_file.load, task_file)
        else:
            task = get(spec)
        if any(t.name == task.name for t in tasks):
            raise ValueError(f"Task {task.name!r} is named more than once in the task list.")
        tasks.append(task)
    return tasks
