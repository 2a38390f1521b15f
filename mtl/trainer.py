"""The training run: data in, a trained model, its metrics and checkpoints out.

``train.py`` is a thin command line over this module; a notebook or a
benchmark calls it directly::

    from mtl import trainer
    cfg = trainer.configure(preset="tiny", tasks="g2p,langid", steps=100)
    plan = trainer.prepare(cfg)          # data loaded and checked, nothing written yet
    test = trainer.run(plan, "runs/tiny")  # trains (or resumes), evaluates; test metrics

It joins ``tasks`` (data, mixture sampler, metrics) and the model core
(model, train step, checkpoints), which never import each other. The run
folder it writes (config, metrics, TensorBoard, checkpoints) is
:mod:`mtl.run_folder`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import tasks
from mtl import config as C
from mtl import distributed, evaluator, hf_import, perf, training
from mtl.checkpoint import Checkpoints
from mtl.checkpoint import find as find_checkpoint
from mtl.config import UsageError
from mtl.model import MultiTaskModel, count_params
from mtl.partition import abstract_state, create_sharded
from mtl.run_folder import BestCheckpoint, RunFolder
from sharding import make_mesh
from sharding.mesh import process_rows

# ---------------------------------------------------------------------------
# Configuration


def configure(
    preset: str = "tiny",
    *,
    tasks: str | Sequence[str] | None = None,
    mixture: str | None = None,
    mesh: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
    init: str | None = None,
) -> C.Config:
    """A run's config: a preset, the ``train`` fields given, then ``KEY=VALUE`` overrides.

    The arguments are ``train.py``'s flags (``--preset``, ``--tasks``, ...,
    ``--set``, ``--init``); ``None`` keeps the preset's value. ``tasks`` is a
    comma-separated string or a list of task specs (names or ``NAME=PATH``).
    With ``init`` the model's shape, dtype and architecture come from that
    source (a Hugging Face folder, ``hf:ORG/NAME`` or an mtl run), and the
    preset sets only the training fields; ``--set model.X`` still overrides.

    Raises:
      UsageError: an unknown preset or field, a bad value, no task, or an
        init source that cannot be imported.
    """
    if isinstance(tasks, str):
        tasks = [s.strip() for s in tasks.split(",") if s.strip()]
    changes = {"mixture": mixture, "mesh": mesh, "steps": steps, "batch_size": batch_size, "seed": seed}
    changes = {k: v for k, v in changes.items() if v is not None}
    if tasks is not None:
        changes["tasks"] = tuple(tasks)
    if init:
        changes["init"] = init
    try:
        cfg = C.preset(preset)
        if init:
            cfg = dataclasses.replace(cfg, model=source_model(init))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
        for assignment in overrides:
            cfg = C.override(cfg, assignment)
        C.validate(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not cfg.train.tasks:
        raise UsageError("--tasks names no task; give at least one, e.g. --tasks g2p,langid")
    return cfg


def source_model(init: str) -> C.ModelConfig:
    """The backbone of an ``--init`` source, without heads (raises ValueError, one line)."""
    kind, folder = hf_import.resolve_source(init)
    if kind == "hf":
        return hf_import.read_config(folder)
    saved = C.from_dict(json.loads((pathlib.Path(folder) / "config.json").read_text()))
    return dataclasses.replace(saved.model, heads=())


def run_tokenizer(cfg: C.Config) -> tasks.Tokenizer:
    """The tokenizer of the run: its init source's (a Hugging Face folder's, or the warm-started run's), else bytes."""
    if not cfg.train.init:
        return tasks.ByteTokenizer()
    try:
        return tasks.load_tokenizer(hf_import.resolve_source(cfg.train.init)[1])
    except ValueError as e:
        raise UsageError(f"--init {cfg.train.init}: {e}") from None


def default_out(cfg: C.Config) -> str:
    """The run folder of a run given none: ``runs/TASK-TASK-SEED``."""
    return f"runs/{'-'.join(cfg.train.tasks)}-{cfg.train.seed}"


def _console() -> Console:
    """Messages and the progress bar on stderr, from process 0 only."""
    return Console(stderr=True, quiet=jax.process_index() != 0)


# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class TaskData:
    """One task's encoded splits and what the server needs to know of it."""

    name: str
    kind: str
    description: str
    labels: tuple[str, ...]  # classify: labels; tag: tags
    splits: dict  # split name -> tasks.EncodedSplit
    max_new_tokens: int  # generate: the longest training target, with its EOS

    def meta(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "labels": list(self.labels),
            "max_new_tokens": self.max_new_tokens,
        }

    def head(self) -> C.HeadConfig:
        if self.kind != "regress":
            return C.HeadConfig(self.name, self.kind, len(self.labels))
        values = self.splits["train"].arrays["value"]
        return C.HeadConfig(self.name, self.kind, 0, float(values.mean()), float(max(values.std(), 1e-6)))


@dataclasses.dataclass
class Plan:
    """Everything a run needs, checked before anything is written."""

    config: C.Config  # with heads filled in
    data: list[TaskData]
    mesh: jax.sharding.Mesh
    tokenizer: tasks.Tokenizer = dataclasses.field(default_factory=tasks.ByteTokenizer)


def prepare(cfg: C.Config, log: Callable[[str], None] = print) -> Plan:
    """Resolves tasks, loads and encodes their data, and builds the mesh.

    Raises:
      UsageError: a bad task, file, mixture or mesh.
    """

    try:
        resolved = tasks.resolve(list(cfg.train.tasks))
        mesh = make_mesh(cfg.train.mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = run_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UsageError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )
    data = []
    for task_id, task in enumerate(resolved):
        t0 = time.perf_counter()
        splits_raw = task.load()
        labels = tasks.labels_of(splits_raw)
        splits = {}
        for split in tasks.SPLITS:
            splits[split] = tasks.encode_split(
                task.kind, splits_raw[split], tokenizer, cfg.model.max_len, labels=labels or None, task_id=task_id
            )
        if len(splits["train"]) == 0:
            raise UsageError(f"task {task.name!r} has no training example of at most {cfg.model.max_len} tokens")
        max_new = 0
        if task.kind == "generate":
            # The longest target in training, with its EOS: the task's own length limit.
            max_new = int(splits["train"].arrays["loss_mask"].sum(axis=1).max())
        data.append(TaskData(task.name, task.kind, task.description, labels, splits, max_new))
        sizes = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
        dropped = sum(e.dropped for e in splits.values())
        log(f"task {task.name} ({task.kind}): {sizes}; {dropped} too long; {time.perf_counter() - t0:.1f}s")
    try:
        tasks.mixture_rates(cfg.train.mixture, {d.name: len(d.splits["train"]) for d in data})
    except ValueError as e:
        raise UsageError(str(e)) from None
    unknown = sorted(set(C.parse_weights(cfg.train.loss_weights)) - {d.name for d in data})
    if unknown:
        raise UsageError(f"train.loss_weights names {unknown[0]!r}, which is not among the run's tasks")
    try:
        evaluator.check_selection(cfg.train.best_metric, {d.name: d.kind for d in data})
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=tuple(d.head() for d in data)))
    return Plan(cfg, data, mesh, tokenizer)


def eval_settings(cfg: C.Config) -> C.ServeConfig:
    """The engine evaluation runs through: the run's serving config, with as many slots as a batch (at most 64)."""
    return dataclasses.replace(cfg.serve, max_batch=min(cfg.train.batch_size, 64))


# ---------------------------------------------------------------------------
# The loop


def run(plan: Plan, out: str | os.PathLike, console: Console | None = None) -> dict:
    """Trains (or resumes) the planned run in ``out``; returns the final test metrics.

    Raises:
      UsageError: ``out`` holds another run, or files that are no run.
    """

    console = console or _console()
    cfg, mesh = plan.config, plan.mesh
    folder = RunFolder(out)
    folder.check_resumable(cfg)
    distributed.sync("mtl: run folder checked")  # before process 0 writes into it
    folder.start(cfg, [d.meta() for d in plan.data])
    if jax.process_index() == 0:
        plan.tokenizer.save(folder.path)  # served with the prompts it trained on (nothing for the byte tokenizer)
    by_name = {d.name: d for d in plan.data}
    sizes = {d.name: len(d.splits["train"]) for d in plan.data}
    rates = tasks.mixture_rates(cfg.train.mixture, sizes)
    # Each process draws the global batch's indices (cheap, and the same everywhere) but reads
    # only its own rows of it; the batch's width comes from every row's length, so all agree on it.
    sampler = tasks.MixtureSampler(sizes, rates, cfg.train.batch_size, cfg.train.seed)
    rows = process_rows(cfg.train.batch_size, mesh)  # this process's rows of every global batch
    lengths = {d.name: np.count_nonzero(d.splits["train"].arrays["tokens"], axis=1) for d in plan.data}  # [N]
    console.log(f"mesh {dict(mesh.shape)}; mixture {', '.join(f'{k} {v:.2f}' for k, v in rates.items())}")

    checkpoints = Checkpoints(folder.path / "checkpoints", keep=cfg.train.keep_checkpoints)
    start = 0
    if (latest := checkpoints.latest_step()) is not None:
        with console.status(f"restoring checkpoint {latest}"):
            graphdef, state, shardings = training.abstract_train_state(cfg.model, cfg.train, mesh)
            _, _, meta = checkpoints.restore(latest, state["model"], state["optimizer"])  # fills ``state``
        start = meta["step"]
        folder.truncate_metrics(start, final=start >= cfg.train.steps)
        console.log(f"resumed from step {start}")
    else:
        with console.status(f"initialising the sharded model and optimizer {cfg.train.init or ''}".strip()):
            params = initial_params(cfg, mesh) if cfg.train.init else None  # --init: the pretrained weights
            graphdef, state, shardings = training.create_train_state(cfg.model, cfg.train, mesh, params)
    params = count_params(state["model"])
    console.log(f"model: {params / 1e6:.2f}M parameters")

    step_fns = {}
    weights = C.parse_weights(cfg.train.loss_weights)
    evaluation = evaluator.Evaluator(
        plan.data, mesh, eval_settings(cfg), cfg.train.eval_examples, folder.log, plan.tokenizer
    )
    best = BestCheckpoint(folder.path / "best", cfg.train.best_metric, {d.name: d.kind for d in plan.data})
    with console.status("measuring the matmul peak (for MFU)"):
        peak = perf.mesh_peak(mesh, cfg.model.dtype)
    console.log(f"matmul peak {peak / 1e9:.0f} GFLOP/s ({cfg.model.dtype}, the whole mesh)")
    window = _Window(peak)
    compiled: set[tuple[str, int]] = set()
    meta_base = {"config": C.to_dict(cfg), "tasks": [d.meta() for d in plan.data]}
    last_metrics: dict = {}
    if cfg.train.steps == 0 and not start:  # --steps 0: the initial (imported) model is the run's checkpoint
        checkpoints.save(0, state["model"], state["optimizer"], {**meta_base, "step": 0, "sampler_position": 0})
    progress = _progress(console, cfg.train.steps, start)
    with progress, jax.set_mesh(mesh):
        for step in range(start, cfg.train.steps):
            name, indices = sampler.batch_at(step)  # [B], the global batch
            d = by_name[name]
            batch = trim(d.splits["train"].batch(indices[rows]), longest=int(lengths[name][indices].max()))
            if name not in step_fns:
                progress.console.log(f"compiling the train step for {name}")
                step_fns[name] = training.compile_train_step(
                    graphdef,
                    shardings,
                    mesh,
                    {k: jax.ShapeDtypeStruct((cfg.train.batch_size, *v.shape[1:]), v.dtype) for k, v in batch.items()},
                    task=name,
                    kind=d.kind,
                    weight=weights.get(name, 1.0),
                    uncertainty=cfg.train.loss_weighting == "uncertainty",
                    grad_accum=cfg.train.grad_accum,
                )
            width = batch["tokens"].shape[1]
            window.tokens += int(lengths[name][indices].sum())
            window.flops += perf.train_flops_per_token(cfg.model, width) * cfg.train.batch_size * width
            new_shape = (name, width) not in compiled
            if new_shape:  # it compiles: finish the queued steps first, so only the compile is excluded
                compiled.add((name, width))
                jax.block_until_ready(state)
            t0 = time.perf_counter()
            state, metrics = step_fns[name](state, training.put_batch(batch, mesh, cfg.train.batch_size))
            if new_shape:  # keep the compilation (and this one step) out of the throughput
                jax.block_until_ready(metrics)
                window.excluded += time.perf_counter() - t0
            window.add(name, metrics)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                for record in window.flush(done):
                    folder.log(record)
                    last_metrics[record["task"]] = record
                progress.update(0, completed=done, losses=_losses_text(last_metrics))
            else:
                progress.update(0, completed=done)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                meta = {**meta_base, "step": done, "sampler_position": done}
                checkpoints.save(done, state["model"], state["optimizer"], meta)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                scores = evaluation(nnx.merge(graphdef, state).model, "validation", done, progress.console)
                best.offer(done, state, scores, {**meta_base, "step": done})
    with console.status("evaluating on validation and test splits"), jax.set_mesh(mesh):
        model = nnx.merge(graphdef, state).model
        scores = evaluation(model, "validation", cfg.train.steps, console)
        best.offer(cfg.train.steps, state, scores, {**meta_base, "step": cfg.train.steps})
        test = evaluation(model, "test", cfg.train.steps, console)
    with console.status("finishing the last checkpoint"):
        for manager in (checkpoints, best.checkpoints):
            manager.wait()
            manager.close()
    folder.close()
    return test


def initial_params(cfg: C.Config, mesh: jax.sharding.Mesh) -> nnx.State:
    """The model parameters ``--init`` starts from, on ``mesh``.

    A Hugging Face source is imported (:func:`mtl.hf_import.load`). An mtl run
    gives its newest checkpoint's backbone, and the heads and task embeddings
    of the tasks this run shares with it (same name, kind and classes); the
    other tasks get new heads and a zero task embedding.
    """
    kind, folder = hf_import.resolve_source(cfg.train.init)
    if kind == "hf":
        try:
            return hf_import.load(folder, cfg.model, mesh, seed=cfg.train.seed)[1]
        except ValueError as e:
            raise UsageError(str(e)) from None
    source = C.from_dict(json.loads((pathlib.Path(folder) / "config.json").read_text())).model
    try:
        ckpt_folder, step = find_checkpoint(folder)
    except ValueError as e:
        raise UsageError(f"--init {cfg.train.init}: {e}") from None
    _, old, _ = abstract_state(lambda: MultiTaskModel(source, rngs=nnx.Rngs(0)), mesh)
    Checkpoints(ckpt_folder, read_only=True).restore(step, old)
    _, new, _ = create_sharded(lambda: MultiTaskModel(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), mesh)
    same = {(h.task, h.kind, h.num_classes): i for i, h in enumerate(source.heads)}
    shared = {
        h.task: same[h.task, h.kind, h.num_classes] for h in cfg.model.heads if (h.task, h.kind, h.num_classes) in same
    }
    old_flat = dict(nnx.to_flat_state(old))
    leaves = []
    for path, variable in nnx.to_flat_state(new):
        name = tuple(str(p) for p in path)
        if name[0] in ("task_embed", "task_log_var"):
            value = jnp.zeros_like(variable[...]) if name[0] == "task_embed" else variable[...]
            for i, task in enumerate(cfg.model.task_names):
                if task in shared:
                    value = value.at[i].set(old_flat[path][...][shared[task]])
            variable = variable.replace(jax.device_put(value, variable[...].sharding))
        elif name[0] != "heads" or name[1] in shared:
            variable = variable.replace(old_flat[path][...])
        leaves.append((path, variable))
    return nnx.from_flat_state(leaves)


def trim(batch: dict[str, np.ndarray], multiple: int = 32, longest: int | None = None) -> dict[str, np.ndarray]:
    """Cuts a batch's padding to its longest row, rounded up to ``multiple``.

    A split is encoded at the width of its longest example, but most batches are
    far shorter; trimming them saves most of the padding's compute, at the price
    of one compilation per width (a few per task). When ``batch`` is one
    process's rows, ``longest`` is the global batch's longest row: every
    process must cut to the same width.
    """
    tokens = batch["tokens"]
    if longest is None:
        longest = int((tokens != 0).sum(axis=1).max())  # PAD is 0 and only pads
    width = min(tokens.shape[1], -(-longest // multiple) * multiple)
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


class _Window:
    """Per-task metrics between two log lines; device values are fetched only at flush.

    ``tokens`` counts real (non-padding) tokens, ``flops`` the model FLOPs of
    the padded batches the devices computed; ``excluded`` holds seconds spent
    compiling, which are not training throughput.
    """

    def __init__(self, peak_flops: float):
        self.peak_flops = peak_flops
        self.reset()

    def reset(self):
        self.sums: dict[str, list] = {}
        self.tokens = 0
        self.flops = 0.0
        self.excluded = 0.0
        self.t0 = time.perf_counter()

    def add(self, task: str, metrics) -> None:
        self.sums.setdefault(task, []).append(metrics)

    def flush(self, step: int) -> list[dict]:
        fetched = jax.device_get(self.sums)  # the one host sync of a log interval
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        records = []
        for task, items in sorted(fetched.items()):
            record = {"step": step, "task": task, "steps": len(items)}
            record.update({k: round(float(np.mean([m[k] for m in items])), 6) for k in items[0]})
            record["tokens_per_s"] = round(self.tokens / seconds, 1)
            record["mfu"] = round(self.flops / seconds / self.peak_flops, 4)
            records.append(record)
        self.reset()
        return records


def _losses_text(last: dict) -> str:
    return "  ".join(f"{t} {r['loss']:.3f}" for t, r in sorted(last.items())) + (
        f"  {next(iter(last.values()))['tokens_per_s'] / 1e3:.1f}k tok/s" if last else ""
    )


def _progress(console: Console, total: int, start: int) -> Progress:

    progress = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        console=console,
        disable=console.quiet,  # processes other than 0 show no bar
    )
    progress.add_task("train", total=total, completed=start, losses="")
    return progress


# ---------------------------------------------------------------------------
# Evaluation only, and the task list


def eval_only(
    out: str | os.PathLike, mesh: str | None = None, overrides: Sequence[str] = (), console: Console | None = None
) -> dict[str, dict]:
    """Evaluates the newest checkpoint of run ``out`` on its validation and test splits.

    Only ``mesh`` and the ``overrides`` change the run's own config;
    ``train.eval_examples=0`` evaluates whole splits. The records are appended
    to the run's ``metrics.jsonl``.

    Returns:
      split -> task -> metric -> value.

    Raises:
      UsageError: ``out`` holds no run or no complete checkpoint, or an override is bad.
    """
    console = console or _console()
    saved = pathlib.Path(out) / "config.json"
    if not saved.exists():
        raise UsageError(f"--out {str(out)!r} holds no mtl run to evaluate")
    cfg = C.from_dict(json.loads(saved.read_text()))
    try:
        if mesh is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mesh=mesh))
        for assignment in overrides:
            cfg = C.override(cfg, assignment)
    except ValueError as e:
        raise UsageError(str(e)) from None
    plan = prepare(cfg, log=console.log)
    checkpoints = Checkpoints(pathlib.Path(out) / "checkpoints", read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise UsageError(f"--out {str(out)!r} has no complete checkpoint yet")
    graphdef, params, _ = abstract_state(lambda: MultiTaskModel(plan.config.model, rngs=nnx.Rngs(0)), plan.mesh)
    checkpoints.restore(step, params)
    model = nnx.merge(graphdef, params)
    folder = RunFolder(out)
    evaluation = evaluator.Evaluator(
        plan.data, plan.mesh, eval_settings(cfg), cfg.train.eval_examples, folder.log, plan.tokenizer
    )
    with jax.set_mesh(plan.mesh):
        scores = {split: evaluation(model, split, step, console) for split in ("validation", "test")}
    folder.close()
    return scores


def list_tasks(log: Callable[[str], None] = print) -> None:
    """One line per built-in task: its name, kind, examples in all, and description."""
    for name in tasks.names():
        task = tasks.get(name)
        splits = task.load()
        size = sum(len(s) for s in splits.values())
        log(f"{name:12s} {task.kind:9s} {size:8d}  {task.description}")
