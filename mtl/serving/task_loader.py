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

Generation tasks fit any row. The other kinds need a row whose head is of
their kind: spare rows get heads of the kinds ``serve.spare_kinds`` lists, in
turn (by default classify when ``serve.max_classes`` is positive, else none).
A classify or tag task fills a spare classifier of ``serve.max_classes``
labels from its first column, the columns past its labels getting a bias of
-1e30 (a probability of exactly 0); a regress task's weights are written
scaled by its targets' standard deviation and shifted by their mean, as the
spare head's own scale is (0, 1). Which task holds which row is the task
table's (:mod:`mtl.serving.task_table`); this module reads the other run and
writes the rows, one transaction an add.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import threading

import jax
import numpy as np
from flax import nnx

from mtl import adapters
from mtl import config as C
from mtl.checkpoint import Checkpoints, candidates
from mtl.checksums import ChecksumError
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from mtl.serving.task_table import SPARE, Task, TaskError, TaskTable

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_mtl.json")  # what makes two runs' tokens the same


def with_room(cfg: C.Config) -> C.Config:
    """``cfg`` whose model has ``serve.max_tasks`` task rows: the run's tasks, then spare rows, whose heads
    take the kinds of ``serve.spare_kinds`` in turn (classify and tag heads of ``serve.max_classes`` labels)."""
    m, room = cfg.model, cfg.serve.max_tasks
    if room <= len(m.heads):
        return cfg
    kinds = spare_kinds(cfg.serve)
    spare = tuple(
        C.HeadConfig(SPARE.format(i), kind, cfg.serve.max_classes if kind in ("classify", "tag") else 0)
        for i, kind in zip(range(room - len(m.heads)), itertools.cycle(kinds))
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, heads=m.heads + spare))


def spare_kinds(serve: C.ServeConfig) -> tuple[str, ...]:
    """The head kinds of spare rows, in turn: ``serve.spare_kinds``, else classify or generate as before."""
    if serve.spare_kinds:
        return tuple(k.strip() for k in serve.spare_kinds.split(","))
    return ("classify",) if serve.max_classes else ("generate",)


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
    except ChecksumError as e:
        raise TaskError(f"run {run!r}: checkpoint {steps[-1]} is damaged: {e}") from None
    finally:
        checkpoints.close()


def _tokenizer_files(run_dir: pathlib.Path) -> dict[str, bytes | None]:
    return {name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None for name in TOKENIZER_FILES}


class TaskLoader:
    """Adds tasks of other runs to a served model, and removes tasks, through its task table.

    Args:
      table: the served model's task table (its ``heads`` as compiled, spare rows included).
      engine: the device engine whose ``params`` hold the rows.
      cfg: the served run's config, as restored (without the spare rows).
      run_dir: the served run's folder (its tokenizer files).
      runs_root: the folder clients' adds may read runs from (:meth:`add_confined`); default: the
        folder that holds ``run_dir``.
    """

    def __init__(
        self, table: TaskTable, engine, cfg: C.Config, run_dir: pathlib.Path, runs_root: pathlib.Path | None = None
    ):
        self.table = table
        self.engine = engine
        self.cfg = cfg
        self.run_dir = pathlib.Path(run_dir)
        self.runs_root = pathlib.Path(runs_root or self.run_dir.resolve().parent).resolve()
        self._lock = threading.Lock()  # one add at a time: each rewrites the served parameters

    def add_confined(self, run: str, task: str) -> dict:
        """:meth:`add` for a client (``POST /v1/tasks``): ``run`` must lie under ``runs_root``.

        A relative ``run`` is read from ``runs_root``. Symlinks and ``..`` are resolved first, and a
        path outside is refused in the same words whether or not it exists, so that the answers tell
        a client nothing about the server's disk.

        Raises:
          TaskError: as :meth:`add`; a run outside the root with status 403.
        """
        path = (self.runs_root / run).resolve()  # an absolute run replaces the root
        if not path.is_relative_to(self.runs_root):
            raise TaskError(f"run {run!r} is not under the server's runs root; only runs there can be added", 403)
        return self.add(str(path), task, name=run)

    def add(self, run: str, task: str, name: str | None = None) -> dict:
        """Serves task ``task`` of run ``run`` in a free row; returns ``{"task", "row", "run"}``
        (``name``: how the answers name the run, if not as ``run``).

        One transaction: the row is reserved, written, then published; if anything fails the
        row is given back and the task is not served.

        Raises:
          TaskError: the task is served already, or absent from that run; the run has another
            backbone or tokenizer; or no free row fits it.
        """
        label = str(run) if name is None else name
        with self._lock:
            folder, step, meta = _read_run(run)
            other = C.from_dict(meta["config"]).model
            self._check_backbone_shape(label, other)
            if _tokenizer_files(folder.parent) != _tokenizer_files(self.run_dir):
                raise TaskError(f"run {label!r} has another tokenizer than the served model")
            info = {t["name"]: t for t in meta.get("tasks", [])}.get(task)
            if task not in other.task_names or info is None:
                raise TaskError(f"run {label!r} has no task {task!r}; it has {', '.join(other.task_names) or 'none'}")
            head = other.head(task)
            row = self.table.reserve(task, head.kind, head.num_classes)
            try:
                params = self._restored(folder, step, other)
                self._check_backbone_weights(label, params)
                spare = self.table.heads[row]
                self._write(row, spare, params, other.task_names.index(task), head)
            except BaseException:
                self.table.abort(row)
                raise
            labels, max_new = tuple(info.get("labels", ())), int(info.get("max_new_tokens", 0) or 0)
            record = Task(task, head.kind, row, spare.task, labels, max_new, head.value_mean, head.value_std, str(run))
            self.table.commit(record)
            return {"task": task, "row": row, "run": label}

    def remove(self, task: str) -> dict:
        """Stops serving ``task``: new requests for it are refused; those queued or running finish.

        Raises:
          TaskError: no such task is served (status 404).
        """
        self.table.remove(task)
        return {"task": task, "removed": True}

    def _check_backbone_shape(self, run: str, other: C.ModelConfig) -> None:
        mine = self.cfg.model
        for field in dataclasses.fields(mine):
            if field.name != "heads" and getattr(mine, field.name) != getattr(other, field.name):
                raise TaskError(
                    f"run {run!r} has another backbone: model.{field.name}={getattr(other, field.name)!r}, "
                    f"the served model's is {getattr(mine, field.name)!r}"
                )

    def _restored(self, folder: pathlib.Path, step: int, other: C.ModelConfig) -> dict:
        _, abstract, _ = abstract_state(lambda: MultiTaskModel(other, rngs=nnx.Rngs(0)), self.engine.mesh)
        checkpoints = Checkpoints(folder, read_only=True)
        try:
            checkpoints.restore(step, abstract)
        except ChecksumError as e:
            raise TaskError(f"checkpoint {folder / str(step)} is damaged: {e}") from None
        finally:
            checkpoints.close()
        return dict(nnx.to_flat_state(abstract))

    def _check_backbone_weights(self, run: str, other: dict) -> None:
        """The backbone's weights must be the served ones: an adapter is trained against them."""
        for path, variable in nnx.to_flat_state(self.engine.params):
            names = tuple(str(p) for p in path)
            if _task_axis(path) is None and names[0] != "heads":
                if not np.array_equal(np.asarray(variable[...]), np.asarray(other[path][...])):
                    raise TaskError(
                        f"run {run!r} has other backbone weights ({'/'.join(names)} differs): its adapters were "
                        "trained on another backbone (train.trainable=all?)"
                    )

    def _write(self, row: int, row_head: C.HeadConfig, other: dict, source_row: int, head: C.HeadConfig) -> None:
        """Copies the task's rows into ``row`` of the served parameters, and its head into the row's head,
        on the host: no program to compile. The other rows are untouched."""
        leaves = []
        for path, variable in nnx.to_flat_state(self.engine.params):
            names = tuple(str(p) for p in path)
            axis = _task_axis(path)
            value = None
            if axis is not None and path in other:
                value = np.array(variable[...])
                index = (slice(None),) * axis
                value[(*index, row)] = np.asarray(other[path][...])[(*index, source_row)]
            elif names[:2] == ("heads", row_head.task) and head.kind != "generate":
                source = np.asarray(other[("heads", head.task, names[2])][...])
                value = _head_value(names[2], variable, source, head, row_head)
            if value is not None:
                variable = variable.replace(jax.device_put(value, variable[...].sharding))
            leaves.append((path, variable))
        self.engine.params = nnx.from_flat_state(leaves)


def _head_value(name: str, variable, source: np.ndarray, head: C.HeadConfig, row_head: C.HeadConfig) -> np.ndarray:
    """The row's head parameter ``name`` holding the task's ``source``.

    Classify and tag: the task's classifier in the first ``num_classes`` columns, the others never
    chosen (a bias of -1e30: exp(-1e30 - max) is 0). Regress: rescaled, since the row's head maps
    back with its own mean and deviation (0 and 1 for a spare row).
    """
    if head.kind == "regress":
        # The row's head computes mean_r + std_r * (x.w' + b'); the task's is mean + std * (x.w + b).
        scale = head.value_std / row_head.value_std
        shift = (head.value_mean - row_head.value_mean) / row_head.value_std if name == "b" else 0.0
        return (source * scale + shift).astype(variable.dtype)
    value = np.zeros(variable.shape, variable.dtype)
    if name == "b_c":
        value[:] = -1e30
    value[..., : head.num_classes] = source
    return value


def add_at_start(loader: TaskLoader, specs: str) -> None:
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
            loader.add(run, task)
        except TaskError as e:
            raise UsageError(f"serve.add_tasks {spec!r}: {e}") from None
