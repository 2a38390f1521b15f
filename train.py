"""Train one multi-task model on a device mesh: ``python train.py --help``.

The command line and the run folder are described in CONTRACT.md. From Python
(a notebook, a benchmark), build a plan and run it::

    import train
    plan = train.prepare(train.resolve_config(["--preset", "tiny"]))
    train.run(plan, "runs/tiny")

This module is the glue between ``tasks`` (data, sampler, metrics) and ``mtl``
(model, train step, engine, checkpoints): the model package never imports the
data package, so the loop that joins them lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboardX import SummaryWriter

import evaluate
import tasks
from mtl import config as C
from mtl import distributed, perf, training
from mtl.checkpoint import Checkpoints
from mtl.model import MultiTaskModel, count_params
from mtl.partition import abstract_state
from sharding import make_mesh
from sharding.mesh import process_rows


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2, nothing written."""


# ---------------------------------------------------------------------------
# Command line and configuration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a sharded multi-task Transformer on built-in tasks and task files."
    )
    p.add_argument("--preset", default="tiny", help="model/training size: tiny, small or base (default: tiny)")
    p.add_argument("--tasks", help="comma-separated built-in task names and/or NAME=PATH task files")
    p.add_argument("--mixture", help="temperature:T, proportional:K, uniform, or weights:a=1,b=3")
    p.add_argument("--mesh", help="mesh axes and sizes, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--steps", type=int, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, help="global batch size (examples a step)")
    p.add_argument("--seed", type=int, help="seed of the initialisation and the data order")
    p.add_argument("--out", help="run folder; the same command with the same --out resumes")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field by its dotted name"
    )
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    p.add_argument("--eval-only", action="store_true", help="evaluate the newest checkpoint in --out and exit")
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="join a multi-process run whose process 0 listens at HOST:PORT (env MTL_COORDINATOR)",
    )
    p.add_argument("--num-processes", metavar="N", help="processes in the run (env MTL_NUM_PROCESSES; 1: no cluster)")
    p.add_argument("--process-id", metavar="I", help="this process's index, 0 to N-1 (env MTL_PROCESS_ID)")
    return p


def resolve_config(argv: Sequence[str]):
    """The run's :class:`mtl.config.Config` from command-line arguments."""

    args = build_parser().parse_args(argv)
    try:
        cfg = C.preset(args.preset)
        train_changes = {
            "tasks": tuple(s.strip() for s in args.tasks.split(",") if s.strip()) if args.tasks else None,
            "mixture": args.mixture,
            "mesh": args.mesh,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
        }
        train_changes = {k: v for k, v in train_changes.items() if v is not None}
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_changes))
        for assignment in args.set:
            cfg = C.override(cfg, assignment)
        C.validate(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not cfg.train.tasks:
        raise UsageError("--tasks names no task; give at least one, e.g. --tasks g2p,langid")
    return cfg


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

    config: object  # mtl.config.Config, with heads filled in
    data: list[TaskData]
    mesh: object  # jax.sharding.Mesh


def prepare(cfg, log=print) -> Plan:
    """Resolves tasks, loads and encodes their data, and builds the mesh.

    Raises:
      UsageError: a bad task, file, mixture or mesh.
    """

    try:
        resolved = tasks.resolve(list(cfg.train.tasks))
        mesh = make_mesh(cfg.train.mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = tasks.ByteTokenizer()
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
        evaluate.check_selection(cfg.train.best_metric, {d.name: d.kind for d in data})
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=tuple(d.head() for d in data)))
    return Plan(cfg, data, mesh)


# ---------------------------------------------------------------------------
# The run folder


class RunFolder:
    """``config.json``, ``tasks.json``, ``metrics.jsonl`` and ``checkpoints/``."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._board = None  # TensorBoard writer, opened on the first record

    def check_resumable(self, cfg) -> None:
        """Raises UsageError if the folder holds a run of another model or data."""

        saved = self.path / "config.json"
        if not saved.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise UsageError(f"--out {str(self.path)!r} is not empty and holds no mtl run")
            return
        old = C.from_dict(json.loads(saved.read_text()))
        # These may change between a run and its resumption; nothing else may.
        # (Remat, unrolling and micro-batching compute the same update another way.)
        free = {"steps", "mesh", "log_every", "eval_every", "eval_examples", "checkpoint_every", "keep_checkpoints"}
        free |= {"grad_accum"}
        free_model = {"remat", "scan_unroll"}
        changed = [
            f"model.{k}"
            for k, v in dataclasses.asdict(cfg.model).items()
            if k not in free_model and dataclasses.asdict(old.model)[k] != v
        ]
        changed += [
            f"train.{k}"
            for k, v in dataclasses.asdict(cfg.train).items()
            if k not in free and dataclasses.asdict(old.train)[k] != v
        ]
        if changed:
            raise UsageError(
                f"--out {str(self.path)!r} holds a run with different {', '.join(changed)}; "
                "use a new --out to start afresh"
            )

    def start(self, cfg, data: list[TaskData]) -> None:

        if jax.process_index() != 0:
            return  # one writer in a multi-process run
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / "config.json", C.dumps(cfg))
        _write_atomic(self.path / "tasks.json", json.dumps([d.meta() for d in data], indent=2))

    def truncate_metrics(self, step: int, final: bool) -> None:
        """Drops metric lines a run resumed at ``step`` logs again.

        That is every line after ``step`` and, when ``step`` ends the run, its
        final evaluation, which the resumed run repeats.
        """
        if jax.process_index() != 0 or not self.metrics_path.exists():
            return
        records = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        kept = [
            json.dumps(r) for r in records if r["step"] < step or (r["step"] == step and not (final and "split" in r))
        ]
        _write_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:

        if jax.process_index() != 0:
            return  # one writer in a multi-process run
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        """The same numbers as TensorBoard scalars: ``train/TASK/loss``, ``validation/TASK/accuracy``, ..."""
        if self._board is None:
            self._board = SummaryWriter(str(self.path / "tensorboard"), flush_secs=10)
        section = record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "task", "split", "steps") or not isinstance(value, (int, float)):
                continue
            tag = f"throughput/{key}" if key in ("tokens_per_s", "mfu") else f"{section}/{record['task']}/{key}"
            self._board.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------
# The loop


def run(plan: Plan, out: str | os.PathLike, console=None) -> dict:
    """Trains (or resumes) the planned run in ``out``; returns the final test metrics."""

    console = console or _console()
    cfg, mesh = plan.config, plan.mesh
    folder = RunFolder(out)
    folder.check_resumable(cfg)
    distributed.sync("mtl: run folder checked")  # before process 0 writes into it
    folder.start(cfg, plan.data)
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
        with console.status("initialising the sharded model and optimizer"):
            graphdef, state, shardings = training.create_train_state(cfg.model, cfg.train, mesh)
    params = count_params(state["model"])
    console.log(f"model: {params / 1e6:.2f}M parameters")

    step_fns = {}
    weights = C.parse_weights(cfg.train.loss_weights)
    fault_step = int(os.environ.get("MTL_KILL_AFTER_STEP", "0"))
    evaluator = evaluate.Evaluator(plan.data, mesh, min(cfg.train.batch_size, 64), cfg.train.eval_examples, folder.log)
    best = BestCheckpoint(folder.path / "best", cfg.train.best_metric, {d.name: d.kind for d in plan.data})
    with console.status("measuring the matmul peak (for MFU)"):
        peak = perf.mesh_peak(mesh, cfg.model.dtype)
    console.log(f"matmul peak {peak / 1e9:.0f} GFLOP/s ({cfg.model.dtype}, the whole mesh)")
    window = _Window(peak)
    compiled: set[tuple[str, int]] = set()
    meta_base = {"config": C.to_dict(cfg), "tasks": [d.meta() for d in plan.data]}
    last_metrics: dict = {}
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
            if done == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                scores = evaluator(nnx.merge(graphdef, state).model, "validation", done, progress.console)
                best.offer(done, state, scores, {**meta_base, "step": done})
    with console.status("evaluating on validation and test splits"), jax.set_mesh(mesh):
        model = nnx.merge(graphdef, state).model
        scores = evaluator(model, "validation", cfg.train.steps, console)
        best.offer(cfg.train.steps, state, scores, {**meta_base, "step": cfg.train.steps})
        test = evaluator(model, "test", cfg.train.steps, console)
    with console.status("finishing the last checkpoint"):
        for manager in (checkpoints, best.checkpoints):
            manager.wait()
            manager.close()
    folder.close()
    return test


class BestCheckpoint:
    """``best/``: the checkpoint whose validation metrics rank highest by ``train.best_metric``.

    Its meta records the score, so a resumed run keeps comparing against it.
    """

    def __init__(self, path: pathlib.Path, spec: str, kinds: dict[str, str]):
        self.spec, self.kinds = spec, kinds
        self.checkpoints = Checkpoints(path, keep=1)
        step = self.checkpoints.latest_step()
        self.score = -np.inf if step is None else self.checkpoints.read_meta(step)["score"]

    def offer(self, step: int, state, scores: dict, meta: dict) -> None:
        score = evaluate.selection_score(self.spec, self.kinds, scores)
        if score > self.score and step not in self.checkpoints.all_steps():
            self.score = score
            meta = {**meta, "score": score, "best_metric": self.spec}
            self.checkpoints.save(step, state["model"], state["optimizer"], meta)


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


def _progress(console, total: int, start: int):

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


def eval_only(out: str, argv: Sequence[str], console: Console) -> dict:
    """Evaluates the newest checkpoint of run ``out`` on its validation and test splits.

    Only ``--mesh`` and ``--set`` apply; the rest of the config is the run's own.
    ``--set train.eval_examples=0`` evaluates whole splits.
    """
    saved = pathlib.Path(out) / "config.json"
    if not saved.exists():
        raise UsageError(f"--out {out!r} holds no mtl run to evaluate")
    args = build_parser().parse_args(argv)
    cfg = C.from_dict(json.loads(saved.read_text()))
    try:
        if args.mesh is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mesh=args.mesh))
        for assignment in args.set:
            cfg = C.override(cfg, assignment)
    except ValueError as e:
        raise UsageError(str(e)) from None
    plan = prepare(cfg, log=console.log)
    checkpoints = Checkpoints(pathlib.Path(out) / "checkpoints", read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise UsageError(f"--out {out!r} has no complete checkpoint yet")
    graphdef, params, _ = abstract_state(lambda: MultiTaskModel(plan.config.model, rngs=nnx.Rngs(0)), plan.mesh)
    checkpoints.restore(step, params)
    model = nnx.merge(graphdef, params)
    folder = RunFolder(out)
    evaluator = evaluate.Evaluator(
        plan.data, plan.mesh, min(cfg.train.batch_size, 64), cfg.train.eval_examples, folder.log
    )
    with jax.set_mesh(plan.mesh):
        return {split: evaluator(model, split, step, console) for split in ("validation", "test")}


def list_tasks() -> None:

    for name in tasks.names():
        task = tasks.get(name)
        splits = task.load()
        size = sum(len(s) for s in splits.values())
        print(f"{name:12s} {task.kind:9s} {size:8d}  {task.description}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before JAX starts its threads: reuse the step's host scratch instead of
    # mapping it afresh every step (1.1-1.25x on CPU; docs/training_bench.md).
    perf.tune_host_allocator()
    if "--list-tasks" in argv:
        list_tasks()
        return 0
    try:
        # Before anything touches a device: joining a cluster changes what the devices are.
        args = build_parser().parse_args(argv)
        if cluster := distributed.settings(args.coordinator, args.num_processes, args.process_id):
            distributed.join(cluster)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    first = jax.process_index() == 0  # the process that reports
    if "--eval-only" in argv:
        argv = [a for a in argv if a != "--eval-only"]
        args = build_parser().parse_args(argv)
        try:
            if not args.out:
                raise UsageError("--eval-only needs --out, the run folder to evaluate")
            scores = eval_only(args.out, argv, _console())
        except UsageError as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            return 2
        if first:
            print(json.dumps(scores))
        return 0
    try:
        cfg = resolve_config(argv)
        args = build_parser().parse_args(argv)
        out = args.out or f"runs/{'-'.join(cfg.train.tasks)}-{cfg.train.seed}"
        plan = prepare(cfg, log=print if first else lambda *_: None)
        RunFolder(out).check_resumable(plan.config)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    test = run(plan, out)
    if first:
        print(json.dumps({"out": str(out), "test": test}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
