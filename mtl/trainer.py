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

import atexit
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

import sharding
import tasks
from mtl import adapters, disk, distributed, evaluator, hf_import, memory, perf, training
from mtl import cache_dir as cache_dir_module
from mtl import config as C
from mtl.checkpoint import Checkpoints, restore_newest, set_aside
from mtl.checkpoint import find as find_checkpoint
from mtl.checksums import ChecksumError
from mtl.config import UsageError
from mtl.data_progress import rate_text, tokenize_progress
from mtl.model import MultiTaskModel, count_params
from mtl.partition import abstract_state, create_sharded
from mtl.run_folder import BestCheckpoint, RunFolder
from mtl.train_progress import Window, losses_text, make_progress
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
            # A pretrained model's context (8,192 positions for SmolLM2) is far longer than most tasks' rows:
            # unless model.max_len is set, the run takes its tasks' real length (prepare), at most that context.
            hf = hf_import.resolve_source(init)[0] == "hf"
            fit = hf and not _sets(overrides, "model.max_len")
            model = source_model(init, hf_import.NO_LIMIT if fit else hf_import.MAX_LEN)
            if hf and not _sets(overrides, "model.param_dtype"):
                # Master weights in f32 (MaxText's weight_dtype, optax's mixed precision): a bf16 checkpoint
                # still computes in bf16 (model.dtype), but AdamW's small updates are not rounded away.
                model = dataclasses.replace(model, param_dtype="float32")
            cfg = dataclasses.replace(cfg, model=model)
            changes.setdefault("fit_max_len", fit)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
        for assignment in overrides:
            cfg = C.override(cfg, assignment)
        C.validate(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not cfg.train.tasks:
        raise UsageError("--tasks names no task; give at least one, e.g. --tasks g2p,langid")
    return cfg


def _sets(overrides: Sequence[str], key: str) -> bool:
    return any(a.partition("=")[0].strip() == key for a in overrides)


def source_model(init: str, max_len: int = hf_import.MAX_LEN) -> C.ModelConfig:
    """The backbone of an ``--init`` source, without heads (raises ValueError, one line).

    ``max_len`` caps a Hugging Face model's ``max_position_embeddings``; a run's source keeps its own.
    """
    kind, folder = hf_import.resolve_source(init)
    if kind == "hf":
        return hf_import.read_config(folder, max_len)
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


def _warner(console: Console) -> Callable[[str], None]:
    """Prints a warning as one unwrapped line (rich's log would wrap it at the console's width)."""
    return lambda message: console.print(message, soft_wrap=True, highlight=False, markup=False)


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
        mean, std = self.splits["train"].value_stats()
        return C.HeadConfig(self.name, self.kind, 0, mean, max(std, 1e-6))


@dataclasses.dataclass
class Plan:
    """Everything a run needs, checked before anything is written."""

    config: C.Config  # with heads filled in
    data: list[TaskData]
    mesh: jax.sharding.Mesh
    tokenizer: tasks.Tokenizer = dataclasses.field(default_factory=tasks.ByteTokenizer)


def prepare(
    cfg: C.Config,
    log: Callable[[str], None] = print,
    cache_dir: str | os.PathLike | None = None,
    console: Console | None = None,
) -> Plan:
    """Resolves tasks, loads and encodes their data, and builds the mesh.

    A task file is read through the tokenized-data cache (``tasks.cache``)
    under ``cache_dir`` (default :func:`mtl.cache_dir.data_dir`): tokenized
    once, with progress on ``console``, then memory-mapped by every start.

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
        try:
            if task.file is not None:
                labels, splits = _cached_splits(task, tokenizer, cfg.model.max_len, task_id, cache_dir, log, console)
            else:
                splits_raw = task.load()
                labels = tasks.labels_of(splits_raw)
                splits = {
                    split: tasks.encode_split(
                        task.kind, splits_raw[split], tokenizer, cfg.model.max_len, labels or None, task_id
                    )
                    for split in tasks.SPLITS
                }
        except ValueError as e:
            raise UsageError(str(e)) from None
        if len(splits["train"]) == 0:
            raise UsageError(f"task {task.name!r} has no training example of at most {cfg.model.max_len} tokens")
        max_new = 0
        if task.kind == "generate":
            # The longest target in training, with its EOS: the task's own length limit.
            max_new = splits["train"].longest_target()
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
    model = dataclasses.replace(cfg.model, heads=tuple(d.head() for d in data))
    if cfg.train.fit_max_len:
        model = dataclasses.replace(model, max_len=fitted_max_len(data, cfg.model.max_len))
        width = cfg.train.pack_width or max(128, model.max_len)
        log(
            f"max_len {model.max_len}: the tasks' longest row, rounded up to 32 "
            f"(the model allows {cfg.model.max_len}); "
            f"rows {'packed' if cfg.train.pack else 'padded'} to {width if cfg.train.pack else model.max_len} tokens"
        )
    cfg = dataclasses.replace(cfg, model=model)
    check_memory(cfg, mesh, log)
    return Plan(cfg, data, mesh, tokenizer)


def check_memory(cfg: C.Config, mesh: jax.sharding.Mesh, log: Callable[[str], None] = print) -> memory.Estimate:
    """Prints the step's estimated memory a device; raises UsageError, one line, when it cannot fit.

    The widest step is estimated: ``train.batch_size`` rows of the pack width
    (packed rows never outnumber the examples) or of ``model.max_len``.
    """
    width = (cfg.train.pack_width or max(128, cfg.model.max_len)) if cfg.train.pack else cfg.model.max_len
    state = memory.state_bytes(cfg, mesh)
    need = memory.estimate(cfg, cfg.train.batch_size, width, mesh, state)
    budget, source = memory.available(mesh)
    log(f"estimated memory {need.text()}; {budget / memory.GIB:.1f} GiB available ({source})")
    if need.total > budget:
        fits = memory.largest_batch(cfg, width, mesh, budget, state)
        advice = f"the largest that fits is {fits}" if fits else "no batch fits: a larger mesh or a smaller model"
        raise UsageError(
            f"train.batch_size={cfg.train.batch_size} of {width}-token rows needs about {need.total / memory.GIB:.1f} "
            f"GiB a device, more than the {budget / memory.GIB:.1f} GiB available ({source}); {advice} "
            "(or set model.remat=full, train.grad_accum)"
        )
    return need


def fitted_max_len(data: Sequence[TaskData], limit: int) -> int:
    """The longest encoded row of any task and split, rounded up to a multiple of 32, at most ``limit``."""
    longest = max(s.longest for d in data for s in d.splits.values() if len(s))
    longest += 1  # a generation row stops before its EOS, which the served sequence must still have room to emit
    return min(limit, -(-longest // 32) * 32)


def _cached_splits(task, tokenizer, max_len, task_id, cache_dir, log, console) -> tuple[tuple[str, ...], dict]:
    """A task file's splits from the tokenized-data cache, built (with progress) if it is not there yet.

    With the caches off (``--cache-dir off``) the file is tokenized into a temporary folder, removed at exit:
    training still memory-maps it, and every start tokenizes again.
    """
    if cache_dir_module.is_off(cache_dir):
        root = pathlib.Path(tempfile.mkdtemp(prefix="mtl-data-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    else:
        root = cache_dir_module.data_dir(cache_dir)
        try:  # private, as the compiled programs' folder: a planted entry would be trained on
            cache_dir_module.private_folder(root.parent)
            cache_dir_module.private_folder(root)
        except OSError as e:
            raise ValueError(f"the data cache {str(root)!r} cannot be made: {e.strerror}; set --cache-dir") from None
    t0 = time.perf_counter()
    key = tasks.cache.file_key(task.file, tokenizer)
    entry, built = tasks.cache.find(root, key), False
    if entry is None:
        display = tokenize_progress(console or _console(), task.name, task.file.size)
        with display:  # a bad row is named as it is found (the first few), then stops the build
            entry, built = tasks.cache.build_file(task.file, key, tokenizer, root, display.update, log)
    meta = entry.meta
    how = f"built in {time.perf_counter() - t0:.1f}s ({rate_text(meta['rows'], time.perf_counter() - t0)})"
    log(
        f"task {task.name}: {meta['rows']:,} rows, {meta['tokens']:,} tokens, 0 bad rows; "
        f"cache {entry.size / 1e6:,.1f} MB in {entry.path} ({how if built else 'reused'})"
    )
    return tuple(meta["labels"]), entry.splits(max_len, task_id, tokenizer.pad_id)


def eval_settings(cfg: C.Config) -> C.ServeConfig:
    """The engine evaluation runs through: the run's serving config, with as many slots as a batch (at most 64)."""
    return dataclasses.replace(cfg.serve, max_batch=min(cfg.train.batch_size, 64))


# ---------------------------------------------------------------------------
# The loop


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint of ``step``; the same command resumes it."""

    def __init__(self, step: int, signal_name: str, out: pathlib.Path):
        self.step, self.signal_name, self.out = step, signal_name, out
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {step} is saved in {out}")


class Diverged(Exception):
    """A non-finite loss, gradient norm or state stopped the run; no non-finite checkpoint was written."""


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after its current step; the handler only sets a flag.

    On one process the loop reads the flag between steps (a Python attribute: no
    host sync). On several, JAX's preemption service (started with the cluster)
    catches SIGTERM and ``reached_preemption_sync_point`` answers True on every
    process at the same step, so all save the same checkpoint; SIGINT is turned
    into a SIGTERM of this process for the service to spread.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._service = None

    def __enter__(self) -> StopSignals:
        from jax._src import distributed as jax_distributed  # the service's handle; no public accessor

        if jax.process_count() > 1:
            self._service = jax_distributed.global_state.preemption_sync_manager
        handled = (signal.SIGINT,) if self._service is not None else (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._service is not None and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption service listens for SIGTERM

    def local(self) -> bool:
        """Whether a signal came, where this process alone decides (one process; several sync at steps only)."""
        return self._service is None and self.signal_name is not None

    def reached(self, step: int) -> bool:
        """Whether to stop after ``step`` (on several processes: all answer alike at the same step)."""
        if self._service is not None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        return self.signal_name is not None


def run(plan: Plan, out: str | os.PathLike, console: Console | None = None) -> dict:
    """Trains (or resumes) the planned run in ``out``; returns the final test metrics.

    On SIGTERM or SIGINT it finishes the current step, saves a checkpoint of it
    and raises :class:`Preempted`; a non-finite loss or gradient stops it with
    :class:`Diverged`, its checkpoints all finite.

    Raises:
      UsageError: ``out`` holds another run, files that are no run, a run another
        process is training, or checkpoints of which none restores.
      Preempted: stopped by a signal, with a checkpoint of the step it stopped at.
      Diverged: the loss, a gradient or the state became non-finite.
    """
    with StopSignals() as stop:
        return _run(plan, pathlib.Path(out), console or _console(), stop)


def _run(plan: Plan, out: pathlib.Path, console: Console, stop: StopSignals) -> dict:
    cfg, mesh = plan.config, plan.mesh
    folder = RunFolder(out)
    folder.check_resumable(cfg, [d.meta() for d in plan.data])
    if jax.process_index() == 0:  # room for a new checkpoint and a new best beside the ones kept
        _, abstract, _ = training.abstract_train_state(cfg.model, cfg.train, mesh)
        disk.check_writable(out, 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)))
    distributed.sync("mtl: run folder checked")  # before anything (a lock file, checkpoints/) is created in it
    folder.lock()  # a second train.py on this folder stops here, naming this process
    checkpoints = Checkpoints(folder.path / "checkpoints", keep=cfg.train.keep_checkpoints)
    start = 0
    if steps := checkpoints.all_steps():
        with console.status(f"restoring checkpoint {max(steps)}"):
            graphdef, state, shardings = training.abstract_train_state(cfg.model, cfg.train, mesh)

            def restore(step: int) -> dict:
                return checkpoints.restore(step, state["model"], state["optimizer"])[2]  # fills ``state``

            try:
                _, meta, skipped = restore_newest(
                    checkpoints.directory, steps, restore, _warner(console), optimizer=True
                )
            except ValueError as e:
                raise UsageError(f"--out {str(out)!r} cannot be resumed: {e}") from None
        if skipped:  # set aside, so the steps are saved afresh when the run reaches them
            if jax.process_index() == 0:
                for step in skipped:
                    set_aside(checkpoints.directory, step)
            distributed.sync("mtl: damaged checkpoints set aside")
            checkpoints.reload()
        start = meta["step"]
    folder.start(cfg, [d.meta() for d in plan.data])
    if jax.process_index() == 0:
        plan.tokenizer.save(folder.path)  # served with the prompts it trained on (nothing for the byte tokenizer)
    # A run stopped at a step it evaluates at may have stopped mid-evaluation: that evaluation comes again.
    evaluate_again = start < cfg.train.steps and bool(cfg.train.eval_every) and start % cfg.train.eval_every == 0
    if start:
        folder.truncate_metrics(start, evaluated=start >= cfg.train.steps or evaluate_again)
        console.log(f"resumed from step {start}")
    else:
        with console.status(f"initialising the sharded model and optimizer {cfg.train.init or ''}".strip()):
            params = initial_params(cfg, mesh) if cfg.train.init else None  # --init: the pretrained weights
            graphdef, state, shardings = training.create_train_state(cfg.model, cfg.train, mesh, params)
    by_name = {d.name: d for d in plan.data}
    sizes = {d.name: len(d.splits["train"]) for d in plan.data}
    rates = tasks.mixture_rates(cfg.train.mixture, sizes)
    # Each process draws the global batch's indices (cheap, and the same everywhere) but reads
    # only its own rows of it; the batch's shape comes from every example's length, so all agree on it.
    sampler = tasks.MixtureSampler(sizes, rates, cfg.train.batch_size, cfg.train.seed)
    batches = TrainBatches(cfg, plan.data, mesh)
    console.log(f"mesh {dict(mesh.shape)}; mixture {', '.join(f'{k} {v:.2f}' for k, v in rates.items())}")
    params = count_params(state["model"])
    console.log(f"model: {params / 1e6:.2f}M parameters")

    step_fns = {}
    weights = C.parse_weights(cfg.train.loss_weights)
    evaluation = evaluator.Evaluator(
        plan.data, mesh, eval_settings(cfg), cfg.train.eval_examples, folder.log, plan.tokenizer
    )
    kinds = {d.name: d.kind for d in plan.data}
    best = BestCheckpoint(folder.path / "best", cfg.train.best_metric, kinds, _warner(console))
    with console.status("measuring the matmul peak (for MFU)"):
        peak = perf.mesh_peak(mesh, cfg.model.dtype)
    console.log(f"matmul peak {peak / 1e9:.0f} GFLOP/s ({cfg.model.dtype}, the whole mesh)")
    window = Window(peak)
    compiled: set[tuple[str, int, int]] = set()
    meta_base = {"config": C.to_dict(cfg), "tasks": [d.meta() for d in plan.data]}
    last_metrics: dict = {}
    saved = start  # the newest step with a checkpoint

    def save(done: int) -> None:
        """Saves step ``done``, once it is known that no step so far went non-finite."""
        _check_finite(window, state, done, saved, folder)
        checkpoints.save(
            done, state["model"], state["optimizer"], {**meta_base, "step": done, "sampler_position": done}
        )

    if cfg.train.steps == 0 and not start:  # --steps 0: the initial (imported) model is the run's checkpoint
        save(0)
    progress = make_progress(console, cfg.train.steps, start)
    try:
        with progress, jax.set_mesh(mesh):
            if start and evaluate_again:
                scores = evaluation(nnx.merge(graphdef, state).model, "validation", start, progress.console)
                best.offer(start, state, scores, {**meta_base, "step": start})
            for step in range(start, cfg.train.steps):
                name, indices = sampler.batch_at(step)  # [B], the global batch
                d = by_name[name]
                batch, rows, real_tokens = batches(name, indices)
                t_compile = time.perf_counter()  # a step that compiles leaves the ETA from here
                if name not in step_fns:
                    progress.log(f"compiling the train step for {name}")
                    step_fns[name] = training.compile_train_step(
                        graphdef,
                        shardings,
                        mesh,
                        {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()},
                        task=name,
                        kind=d.kind,
                        weight=weights.get(name, 1.0),
                        uncertainty=cfg.train.loss_weighting == "uncertainty",
                        grad_accum=cfg.train.grad_accum,
                    )
                width = batch["tokens"].shape[1]
                new_shape = (name, rows, width) not in compiled
                if new_shape:  # it compiles: finish the queued steps first, so only the compile is excluded
                    compiled.add((name, rows, width))
                    jax.block_until_ready(state)
                t0 = time.perf_counter()
                state, metrics = step_fns[name](state, training.put_batch(batch, mesh, rows))
                if new_shape:  # keep the compilation (and this one step: its time, tokens and FLOPs) out
                    jax.block_until_ready(metrics)
                    window.untimed(time.perf_counter() - t0)
                    progress.untimed(time.perf_counter() - t_compile)
                else:
                    flops = perf.train_flops_per_token(cfg.model, width, trainable=cfg.train.trainable, kind=d.kind)
                    window.timed(real_tokens, flops * rows * width)
                window.add(name, metrics, step + 1)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    for record in window.flush(done):
                        folder.log(record)
                        last_metrics[record["task"]] = record
                    progress.update(completed=done, losses=losses_text(last_metrics))
                    if window.diverged is not None:
                        raise Diverged(_diverged_text(window.diverged, saved, folder))
                else:
                    progress.update(completed=done)
                if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                    with untimed(window, state):
                        save(done)
                    saved = done
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                    with untimed(window, state):
                        _check_finite(window, state, done, saved, folder)  # before evaluating, and saving a best
                        scores = evaluation(nnx.merge(graphdef, state).model, "validation", done, progress.console)
                        best.offer(done, state, scores, {**meta_base, "step": done})
                if stop.reached(done):  # asked once a step: on several processes, a sync point
                    if done == cfg.train.steps:  # its checkpoint is saved: stop before the evaluation
                        raise Preempted(done, stop.signal_name or "SIGTERM", folder.path)
                    if saved != done:
                        save(done)
                        saved = done
                    raise Preempted(done, stop.signal_name or "SIGTERM", folder.path)
        if cfg.train.steps == 0:  # an import (--steps 0) is not evaluated unless asked: train.py --eval-only --out
            console.log(f"no evaluation at step 0; train.py --eval-only --out {folder.path} evaluates the checkpoint")
            return {}
        with console.status("evaluating on validation and test splits"), jax.set_mesh(mesh):
            # The last step's checkpoint is saved: a signal now stops between evaluations,
            # and the same command evaluates again.
            _check_finite(window, state, cfg.train.steps, saved, folder)
            model = nnx.merge(graphdef, state).model
            scores = evaluation(model, "validation", cfg.train.steps, console)
            best.offer(cfg.train.steps, state, scores, {**meta_base, "step": cfg.train.steps})
            if stop.local():
                raise Preempted(cfg.train.steps, stop.signal_name, folder.path)
            test = evaluation(model, "test", cfg.train.steps, console)
    finally:
        with console.status("finishing the last checkpoint"):
            for manager in (checkpoints, best.checkpoints):
                manager.wait()
                manager.close()
        folder.close()
    return test


@contextlib.contextmanager
def untimed(window: Window, state):
    """Leaves a checkpoint or an evaluation out of the throughput, once the queued steps have finished."""
    jax.block_until_ready(state)  # the steps before it are training time
    t0 = time.perf_counter()
    try:
        yield
    finally:
        window.untimed(time.perf_counter() - t0)


def _check_finite(window: Window, state, done: int, saved: int, folder: RunFolder) -> None:
    """Raises Diverged if a step so far skipped a non-finite update, or the state holds a non-finite value."""
    window.check()  # fetches the steps' ``skipped`` flags: the save syncs with the device anyway
    if window.diverged is None and not bool(training.all_finite(state)):
        window.diverged = (done, "", "the model or optimizer state")
    if window.diverged is not None:
        raise Diverged(_diverged_text(window.diverged, saved, folder))


def _diverged_text(diverged: tuple[int, str, str], saved: int, folder: RunFolder) -> str:
    step, task, what = diverged
    where = f" on task {task}" if task else ""
    kept = (
        f"its newest checkpoint, step {saved}, is kept in {folder.path / 'checkpoints'}"
        if saved
        else "no checkpoint was written"
    )
    return (
        f"the run diverged: {what} became non-finite at step {step}{where} (that update was not applied); "
        f"{kept}; lower train.learning_rate or train.grad_clip and start a new --out"
    )


def initial_params(cfg: C.Config, mesh: jax.sharding.Mesh) -> nnx.State:
    """The model parameters ``--init`` starts from, on ``mesh``.

    A Hugging Face source is imported (:func:`mtl.hf_import.load`). An mtl run
    gives its newest checkpoint's backbone, and the heads and task embeddings
    of the tasks this run shares with it (same name, kind and classes), with
    their adapters where both runs have adapters of one rank on a projection;
    the other tasks get new heads, a zero task embedding and fresh adapters.
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
    try:
        Checkpoints(ckpt_folder, read_only=True).restore(step, old)
    except ChecksumError as e:
        raise UsageError(f"--init {cfg.train.init}: checkpoint {ckpt_folder / str(step)} is damaged: {e}") from None
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
        elif adapters.is_adapter_path(name):
            carried = _carried_adapter(variable[...], old_flat.get(path), cfg.model.task_names, shared)
            variable = variable.replace(carried)
        elif name[0] != "heads" or name[1] in shared:
            variable = variable.replace(old_flat[path][...])
        leaves.append((path, variable))
    return nnx.from_flat_state(leaves)


def _carried_adapter(new: jax.Array, old: nnx.Variable | None, names: Sequence[str], shared: dict) -> jax.Array:
    """An adapter stack [L, J, ...] of this run with the rows of the tasks it shares taken from the source's."""
    if old is None or old.shape[:1] + old.shape[2:] != new.shape[:1] + new.shape[2:]:
        return new  # the source has no adapter of this shape here: all start fresh
    rows = [(i, shared[task]) for i, task in enumerate(names) if task in shared]
    if not rows:
        return new
    mine, theirs = (jnp.asarray(r) for r in zip(*rows))
    return jax.device_put(new.at[:, mine].set(old[...][:, theirs]), new.sharding)


class TrainBatches:
    """This process's share of each step's global batch, packed (``train.pack``) or one example a row.

    Packed, the B examples the sampler drew fill R rows of ``pack_width``
    (``tasks.packing``; R rounded up to the devices splitting the batch and to
    ``grad_accum``); unpacked, B rows trimmed to the longest, rounded up to 32
    (:func:`trim`). Either way every process plans the same global batch from
    the drawn indices and loads only its own rows of it.
    """

    def __init__(self, cfg: C.Config, data: Sequence[TaskData], mesh: jax.sharding.Mesh):
        self.pack = cfg.train.pack
        self.width = cfg.train.pack_width or max(128, cfg.model.max_len)
        batch_devices = math.prod(mesh.shape.get(axis, 1) for axis in sharding.RULES["batch"])
        self.multiple = math.lcm(batch_devices, cfg.train.grad_accum)
        self.batch_size = cfg.train.batch_size
        self.mesh = mesh
        self.splits = {d.name: d.splits["train"] for d in data}
        self.rows = process_rows(cfg.train.batch_size, mesh)  # this process's rows of every unpacked batch

    def __call__(self, name: str, indices: np.ndarray) -> tuple[dict[str, np.ndarray], int, int]:
        """(this process's rows of the batch of ``indices``, the global batch's rows, its real tokens)."""
        split = self.splits[name]
        lengths = split.lengths_of(indices)  # [B], the global batch's: every process plans alike
        if not self.pack:
            batch = trim(split.batch(indices[self.rows]), longest=int(lengths.max()))
            return batch, self.batch_size, int(lengths.sum())
        layout = tasks.packing.plan(lengths, self.width)
        rows = tasks.packing.rows_needed(layout, self.multiple)
        here = process_rows(rows, self.mesh)
        return tasks.packing.packed_batch(split, indices, lengths, layout, rows, here), rows, int(lengths.sum())


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


# ---------------------------------------------------------------------------
# Evaluation only, and the task list


def eval_only(
    out: str | os.PathLike,
    mesh: str | None = None,
    overrides: Sequence[str] = (),
    console: Console | None = None,
    cache_dir: str | os.PathLike | None = None,
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
    plan = prepare(cfg, log=console.log, cache_dir=cache_dir, console=console)
    folder = RunFolder(out)
    folder.lock()  # its metric lines would interleave with a training run's
    checkpoints = Checkpoints(pathlib.Path(out) / "checkpoints", read_only=True)
    steps = checkpoints.all_steps()
    if not steps:
        raise UsageError(f"--out {str(out)!r} has no complete checkpoint yet")
    graphdef, params, _ = abstract_state(lambda: MultiTaskModel(plan.config.model, rngs=nnx.Rngs(0)), plan.mesh)
    try:  # the newest checkpoint that restores, as training and serving do
        step, _, _ = restore_newest(
            checkpoints.directory, steps, lambda s: checkpoints.restore(s, params), _warner(console)
        )
    except ValueError as e:
        raise UsageError(f"--out {str(out)!r}: {e}") from None
    model = nnx.merge(graphdef, params)
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
