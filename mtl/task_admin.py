"""Tasks added and removed while the server runs: ``POST /v1/tasks`` and ``DELETE /v1/tasks/NAME``.

A served model has room for ``serve.max_tasks`` tasks: its task rows (the task
embedding, every adapter stack) are that many from the start, the run's own
tasks first and spare rows after them, so adding a task writes its rows into
parameters of unchanged shapes and the engine's programs run on as compiled.
A task is added from another run on the same backbone (the same model shape,
tokenizer and backbone weights: a run trained with ``train.trainable=adapters``
from this one, or from the same ``--init``): its task embedding and adapter
rows, its labels and length limit. Removing a task stops new requests at once;
its row is reused only once the requests already queued or running for it
have finished. The other tasks' rows are never touched, so their answers do not
change.

Generation tasks fit any row. A classification task needs a row with a
classifier of at least its labels: each spare row has one of
``serve.max_classes`` labels (when that is positive), which an added task fills
from its first column, the columns past its labels getting a bias of -1e30 (a
probability of exactly 0). Regression and tagging tasks cannot be added: their
heads are modules of their own in the model, and a new one would change the
compiled programs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import threading

import jax
import numpy as np
from flax import nnx

from mtl import adapters
from mtl import config as C
from mtl.checkpoint import Checkpoints, candidates
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state

SPARE = "free:{}"  # a spare row's placeholder task: not a name a task file can give (tasks name files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_mtl.json")  # what makes two runs' tokens the same


class TaskError(ValueError):
    """A task that cannot be added or removed: one line, answered with HTTP 400 (404: no such task)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def with_room(cfg: C.Config) -> C.Config:
    """``cfg`` whose model has ``serve.max_tasks`` task rows: the run's tasks, then spare rows
    (with a classifier of ``serve.max_classes`` labels each, when that is positive)."""
    m, room, classes = cfg.model, cfg.serve.max_tasks, cfg.serve.max_classes
    if room <= len(m.heads):
        return cfg
    kind = "classify" if classes else "generate"
    spare = tuple(C.HeadConfig(SPARE.format(i), kind, classes) for i in range(room - len(m.heads)))
    return dataclasses.replace(cfg, model=dataclasses.replace(m, heads=m.heads + spare))


def _task_axis(path: tuple) -> int | None:
    """The task axis of a parameter that has one row a task (task embeddings, adapter stacks [L, J, ...])."""
    names = tuple(str(p) for p in path)
    if names[0] in ("task_embed", "task_log_var"):
        return 0
    return 1 if adapters.is_adapter_path(names) else None


def make_room(cfg: C.Config, params: nnx.State, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The restored ``params`` of ``cfg``'s run laid into the model of :func:`with_room`: spare rows zero.

    Returns:
      (graphdef, state) of the roomier model, on ``mesh``.
    """
    roomy = with_room(cfg).model
    graphdef, abstract, _ = abstract_state(lambda: MultiTaskModel(roomy, rngs=nnx.Rngs(0)), mesh)
    restored = dict(nnx.to_flat_state(params))
    leaves = []
    for path, target in nnx.to_flat_state(abstract):
        if path not in restored:  # a spare row's classifier: empty until a task fills it
            leaves.append((path, target.replace(jax.device_put(np.zeros(target.shape, target.dtype), target.sharding))))
            continue
        value = restored[path][...]
        if value.shape != target.shape:
            axis = _task_axis(path)
            widths = [(0, t - v) if i == axis else (0, 0) for i, (v, t) in enumerate(zip(value.shape, target.shape))]
            value = jax.device_put(np.pad(np.asarray(value), widths), target.sharding)
        leaves.append((path, restored[path].replace(value)))
    return graphdef, nnx.from_flat_state(leaves)


def _read_run(run: str) -> tuple[pathlib.Path, int, dict]:
    """A run's checkpoints folder, newest step and that step's meta (config and tasks)."""
    try:
        folder, steps = candidates(run)
    except ValueError as e:
        raise TaskError(str(e).replace("--ckpt ", "run ")) from None
    checkpoints = Checkpoints(folder, read_only=True)
    try:
        return folder, steps[-1], checkpoints.read_meta(steps[-1])
    finally:
        checkpoints.close()


def _tokenizer_files(run_dir: pathlib.Path) -> dict[str, bytes | None]:
    return {name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None for name in TOKENIZER_FILES}


class TaskRoom:
    """The task rows of a served model: who holds each, and adding and removing tasks (thread-safe).

    Args:
      server: the :class:`mtl.server.Server` (its engine, tasks and tokenizer).
      cfg: the served run's config, as restored (without the spare rows).
      run_dir: the served run's folder (its tokenizer files).
    """

    def __init__(self, server, cfg: C.Config, run_dir: pathlib.Path):
        self.server = server
        self.cfg = cfg
        self.run_dir = pathlib.Path(run_dir)
        self.heads = with_room(cfg).model.heads  # each row's head, as compiled
        self.owners: list[str | None] = [None if h.task.startswith("free:") else h.task for h in self.heads]
        self.leaving: dict[str, int] = {}  # removed tasks whose requests may still run, and their rows
        self._lock = threading.Lock()

    def add(self, run: str, task: str) -> dict:
        """Serves task ``task`` of run ``run`` in a free row; returns ``{"task", "row", "run"}``.

        Raises:
          TaskError: the task is served already, or absent from that run, or not a generation task; the run
            has another backbone or tokenizer; or every row is taken.
        """
        with self._lock:
            engine = self.server.engine
            if task in self.server.tasks:
                raise TaskError(f"task {task!r} is served already; DELETE /v1/tasks/{task} first to replace it")
            folder, step, meta = _read_run(run)
            other = C.from_dict(meta["config"]).model
            self._check_backbone_shape(run, other)
            if _tokenizer_files(folder.parent) != _tokenizer_files(self.run_dir):
                raise TaskError(f"run {run!r} has another tokenizer than the served model")
            info = {t["name"]: t for t in meta.get("tasks", [])}.get(task)
            if task not in other.task_names or info is None:
                raise TaskError(f"run {run!r} has no task {task!r}; it has {', '.join(other.task_names) or 'none'}")
            head = other.head(task)
            if head.kind not in ("generate", "classify"):
                raise TaskError(f"task {task!r} is a {head.kind} task; only generation and classify tasks can be added")
            row = self._free_row(head)
            params = self._restored(folder, step, other)
            self._check_backbone_weights(run, params)
            self._write_row(row, params, other.task_names.index(task))
            if head.kind == "classify":
                self._write_classifier(self.heads[row].task, params, task, head.num_classes)
                engine.head_names[task] = self.heads[row].task
            self.owners[row] = task
            engine.task_ids[task] = row
            engine.kinds[task] = head.kind
            from mtl.server import TaskInfo  # the application layer's record of a task (no import cycle at load)

            self.server.tasks[task] = TaskInfo(task, head.kind, tuple(info["labels"]), info["max_new_tokens"])
            return {"task": task, "row": row, "run": str(run)}

    def remove(self, task: str) -> dict:
        """Stops serving ``task``: new requests for it are refused; those queued or running finish.

        Raises:
          TaskError: no such task is served (status 404).
        """
        with self._lock:
            if task not in self.server.tasks:
                raise TaskError(f"task {task!r} is not served", status=404)
            del self.server.tasks[task]
            row = self.owners.index(task)
            self.owners[row] = None
            self.leaving[task] = row
            return {"task": task, "removed": True}

    def _free_row(self, head: C.HeadConfig) -> int:
        """A free row that can hold a task with ``head``: any for generation, one with a large enough classifier."""
        engine = self.server.engine
        for task, row in list(self.leaving.items()):
            if not engine.has_requests_of(task):  # its last requests have finished: the row is free again
                del self.leaving[task], engine.task_ids[task], engine.kinds[task]
                engine.head_names.pop(task, None)
        busy = set(self.leaving.values())
        free = [row for row, owner in enumerate(self.owners) if owner is None and row not in busy]
        fits = [r for r in free if head.kind == "generate" or self._classes(r) >= head.num_classes]
        if fits:
            return fits[0]
        if free:
            most = max(self._classes(r) for r in free)
            raise TaskError(
                f"no free row has a classifier for {head.num_classes} labels (the largest holds {most}); "
                "serve with serve.max_classes at least that"
            )
        raise TaskError(
            f"no room for another task: serve.max_tasks={len(self.owners)} rows are in use; "
            "DELETE a task or serve with a larger serve.max_tasks"
        )

    def _classes(self, row: int) -> int:
        head = self.heads[row]
        return head.num_classes if head.kind == "classify" else 0

    def _check_backbone_shape(self, run: str, other: C.ModelConfig) -> None:
        mine = self.cfg.model
        for field in dataclasses.fields(mine):
            if field.name != "heads" and getattr(mine, field.name) != getattr(other, field.name):
                raise TaskError(
                    f"run {run!r} has another backbone: model.{field.name}={getattr(other, field.name)!r}, "
                    f"the served model's is {getattr(mine, field.name)!r}"
                )

    def _restored(self, folder: pathlib.Path, step: int, other: C.ModelConfig) -> dict:
        mesh = self.server.engine.mesh
        _, abstract, _ = abstract_state(lambda: MultiTaskModel(other, rngs=nnx.Rngs(0)), mesh)
        checkpoints = Checkpoints(folder, read_only=True)
        try:
            checkpoints.restore(step, abstract)
        finally:
            checkpoints.close()
        return dict(nnx.to_flat_state(abstract))

    def _check_backbone_weights(self, run: str, other: dict) -> None:
        """The backbone's weights must be the served ones: an adapter is trained against them."""
        for path, variable in nnx.to_flat_state(self.server.engine.params):
            names = tuple(str(p) for p in path)
            if _task_axis(path) is None and names[0] != "heads":
                if not np.array_equal(np.asarray(variable[...]), np.asarray(other[path][...])):
                    raise TaskError(
                        f"run {run!r} has other backbone weights ({'/'.join(names)} differs): its adapters were "
                        "trained on another backbone (train.trainable=all?)"
                    )

    def _write_row(self, row: int, other: dict, source_row: int) -> None:
        """Copies the task's rows into ``row`` of the served parameters, on the host: no program to compile."""
        engine = self.server.engine
        leaves = []
        for path, variable in nnx.to_flat_state(engine.params):
            axis = _task_axis(path)
            if axis is not None and path in other:
                value = np.array(variable[...])
                index = (slice(None),) * axis
                value[(*index, row)] = np.asarray(other[path][...])[(*index, source_row)]
                variable = variable.replace(jax.device_put(value, variable[...].sharding))
            leaves.append((path, variable))
        engine.params = nnx.from_flat_state(leaves)

    def _write_classifier(self, head: str, other: dict, task: str, classes: int) -> None:
        """The task's classifier into the row's own, its first ``classes`` columns; the others never chosen."""
        engine = self.server.engine
        leaves = []
        for path, variable in nnx.to_flat_state(engine.params):
            names = tuple(str(p) for p in path)
            if names[:2] == ("heads", head):
                value = np.zeros(variable.shape, variable.dtype)
                if names[2] == "b_c":
                    value[:] = -1e30  # exp(-1e30 - max) is 0: the padding's probability is exactly zero
                value[..., :classes] = np.asarray(other[("heads", task, names[2])][...])
                variable = variable.replace(jax.device_put(value, variable[...].sharding))
            leaves.append((path, variable))
        engine.params = nnx.from_flat_state(leaves)


def add_at_start(room: TaskRoom, specs: str) -> None:
    """Adds ``serve.add_tasks`` (``RUN:TASK,...``) before serving starts.

    Raises:
      UsageError: a part is not RUN:TASK, or its task cannot be added (the reason, one line).
    """
    from mtl.config import UsageError

    for spec in filter(None, (s.strip() for s in specs.split(","))):
        run, _, task = spec.rpartition(":")
        if not run or not task:
            raise UsageError(f"serve.add_tasks part {spec!r} must be RUN:TASK")
        try:
            room.add(run, task)
        except TaskError as e:
            raise UsageError(f"serve.add_tasks {spec!r}: {e}") from None


def add_routes(app, server) -> None:
    """``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}`` on the aiohttp ``app`` (docs/contract.md), on ``server.room``."""
    from aiohttp import web

    def room() -> TaskRoom:
        if server.room is None:
            raise TaskError("this server was not loaded from a run folder: it cannot add or remove tasks")
        return server.room

    def failed(e: TaskError):
        return web.json_response({"id": None, "error": str(e)}, status=e.status)

    async def post_task(request):
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            return failed(TaskError('the body is not JSON; send {"run": RUN_DIR, "task": NAME}'))
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("run", "task")):
            return failed(TaskError('the body must be {"run": RUN_DIR, "task": NAME}, both strings'))
        loop = asyncio.get_running_loop()
        try:  # restoring a checkpoint takes a while: off the event loop, which keeps answering requests
            added = await loop.run_in_executor(None, room().add, body["run"], body["task"])
        except TaskError as e:
            return failed(e)
        return web.json_response(added)

    async def delete_task(request):
        try:
            return web.json_response(room().remove(request.match_info["name"]))
        except TaskError as e:
            return failed(e)

    app.router.add_post("/v1/tasks", post_task)
    app.router.add_delete("/v1/tasks/{name}", delete_task)
