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

import tasks
from mtl import config as C
from mtl import training
from mtl.checkpoint import Checkpoints
from mtl.engine import Engine, Request
from sharding import make_mesh


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


# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class TaskData:
    """One task's encoded splits and what the server needs to know of it."""

    name: str
    kind: str
    description: str
    labels: tuple[str, ...]
    splits: dict  # split name -> tasks.EncodedSplit
    max_new_tokens: int

    def meta(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "labels": list(self.labels),
            "max_new_tokens": self.max_new_tokens,
        }


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
    data, heads = [], []
    for task_id, task in enumerate(resolved):
        if task.kind not in ("generate", "classify"):
            raise UsageError(f"task {task.name!r} is a {task.kind} task, which this version cannot train yet")
        t0 = time.perf_counter()
        splits_raw = task.load()
        labels = tasks.labels_of(splits_raw) if task.kind == "classify" else ()
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
        heads.append(C.HeadConfig(task.name, task.kind, len(labels)))
        sizes = ", ".join(f"{s} {len(e)}" for s, e in splits.items())
        dropped = sum(e.dropped for e in splits.values())
        log(f"task {task.name} ({task.kind}): {sizes}; {dropped} too long; {time.perf_counter() - t0:.1f}s")
    try:
        tasks.mixture_rates(cfg.train.mixture, {d.name: len(d.splits["train"]) for d in data})
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=tuple(heads)))
    return Plan(cfg, data, mesh)


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(engine, plan: Plan, split: str, limit: int) -> dict[str, dict[str, float]]:
    """Per-task metrics of the model in ``engine`` on the first ``limit`` examples of ``split``."""

    tokenizer = tasks.ByteTokenizer()
    results = {}
    for d in plan.data:
        encoded = d.splits[split]
        n = min(limit, len(encoded))
        if n == 0:
            continue
        # Evenly spaced examples: a split's order may follow its source (by language, say).
        picks = np.linspace(0, len(encoded) - 1, n).astype(int)
        prompts = [tasks.prompt_ids(tokenizer, encoded.inputs[i]) for i in picks]
        refs = [encoded.references[i] for i in picks]
        metric_fns = tasks.metrics.metrics_for(d.kind)
        if d.kind == "classify":
            answers = engine.score([Request(d.name, p) for p in prompts])
            preds = [int(a.values.argmax()) for a in answers]
            golds = [d.labels.index(r) for r in refs]
            results[d.name] = {name: fn(preds, golds) for name, fn in metric_fns.items()}
        else:
            budget = min(d.max_new_tokens, engine.cfg.max_len)
            gens = engine.generate([Request(d.name, p, max_new_tokens=budget) for p in prompts])
            preds = [tokenizer.decode(g.tokens) for g in gens]
            results[d.name] = {name: fn(preds, refs) for name, fn in metric_fns.items()}
    return results


def make_engine(model, mesh, max_batch: int):

    tokenizer = tasks.ByteTokenizer()
    return Engine(
        model,
        mesh,
        max_batch=max_batch,
        allowed_tokens=allowed_tokens(tokenizer, model.cfg.vocab_size),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )


def allowed_tokens(tokenizer, vocab_size: int) -> np.ndarray:
    """Tokens generation may produce: the tokenizer's, less PAD, BOS and SEP."""
    allowed = np.arange(vocab_size) < tokenizer.vocab_size
    allowed[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.sep_id]] = False
    return allowed


# ---------------------------------------------------------------------------
# The run folder


class RunFolder:
    """``config.json``, ``tasks.json``, ``metrics.jsonl`` and ``checkpoints/``."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.metrics_path = self.path / "metrics.jsonl"

    def check_resumable(self, cfg) -> None:
        """Raises UsageError if the folder holds a run of another model or data."""

        saved = self.path / "config.json"
        if not saved.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise UsageError(f"--out {str(self.path)!r} is not empty and holds no mtl run")
            return
        old = C.from_dict(json.loads(saved.read_text()))
        # These may change between a run and its resumption; nothing else may.
        free = {"steps", "mesh", "log_every", "eval_every", "eval_examples", "checkpoint_every", "keep_checkpoints"}
        changed = [
            f"model.{k}" for k, v in dataclasses.asdict(cfg.model).items() if dataclasses.asdict(old.model)[k] != v
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

        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / "config.json", C.dumps(cfg))
        _write_atomic(self.path / "tasks.json", json.dumps([d.meta() for d in data], indent=2))

    def truncate_metrics(self, step: int, final: bool) -> None:
        """Drops metric lines a run resumed at ``step`` logs again.

        That is every line after ``step`` and, when ``step`` ends the run, its
        final evaluation, which the resumed run repeats.
        """
        if not self.metrics_path.exists():
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


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------
# The loop


def run(plan: Plan, out: str | os.PathLike, console=None) -> dict:
    """Trains (or resumes) the planned run in ``out``; returns the final test metrics."""

    console = console or Console(stderr=True)
    cfg, mesh = plan.config, plan.mesh
    folder = RunFolder(out)
    folder.check_resumable(cfg)
    folder.start(cfg, plan.data)
    by_name = {d.name: d for d in plan.data}
    sizes = {d.name: len(d.splits["train"]) for d in plan.data}
    rates = tasks.mixture_rates(cfg.train.mixture, sizes)
    sampler = tasks.MixtureSampler(
        sizes,
        rates,
        cfg.train.batch_size,
        cfg.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
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
    params = sum(x.size for x in jax.tree.leaves(state["model"]))
    console.log(f"model: {params / 1e6:.2f}M parameters")

    step_fns = {}
    fault_step = int(os.environ.get("MTL_KILL_AFTER_STEP", "0"))
    evaluator = Evaluator(plan, folder, graphdef)
    window = _Window()
    meta_base = {"config": C.to_dict(cfg), "tasks": [d.meta() for d in plan.data]}
    last_metrics: dict = {}
    progress = _progress(console, cfg.train.steps, start)
    with progress, jax.set_mesh(mesh):
        for step in range(start, cfg.train.steps):
            name, indices = sampler.batch_at(step)
            d = by_name[name]
            batch = trim(d.splits["train"].batch(indices))
            if name not in step_fns:
                progress.console.log(f"compiling the train step for {name}")
                step_fns[name] = training.compile_train_step(graphdef, shardings, mesh, batch, task=name, kind=d.kind)
            window.tokens += int(np.count_nonzero(batch["tokens"]))
            state, metrics = step_fns[name](state, training.put_batch(batch, mesh))
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
                evaluator(state, "validation", done, progress.console)
    with console.status("evaluating on validation and test splits"), jax.set_mesh(mesh):
        evaluator(state, "validation", cfg.train.steps, console)
        test = evaluator(state, "test", cfg.train.steps, console)
    with console.status("finishing the last checkpoint"):
        checkpoints.wait()
        checkpoints.close()
    return test


def trim(batch: dict[str, np.ndarray], multiple: int = 32) -> dict[str, np.ndarray]:
    """Cuts a batch's padding to its longest row, rounded up to ``multiple``.

    A split is encoded at the width of its longest example, but most batches are
    far shorter; trimming them saves most of the padding's compute, at the price
    of one compilation per width (a few per task).
    """
    tokens = batch["tokens"]
    longest = int((tokens != 0).sum(axis=1).max())  # PAD is 0 and only pads
    width = min(tokens.shape[1], -(-longest // multiple) * multiple)
    return {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}


class Evaluator:
    """Evaluates the current train state; one engine, compiled once, serves every evaluation."""

    def __init__(self, plan: Plan, folder: RunFolder, graphdef):
        self.plan, self.folder, self.graphdef = plan, folder, graphdef
        self.engine = None

    def __call__(self, state, split: str, step: int, console) -> dict[str, dict[str, float]]:

        model = nnx.merge(self.graphdef, state).model
        if self.engine is None:
            self.engine = make_engine(model, self.plan.mesh, max_batch=min(self.plan.config.train.batch_size, 64))
        else:
            self.engine.params = nnx.state(model)  # the step donates old buffers: always take the current ones
        t0 = time.perf_counter()
        scores = evaluate(self.engine, self.plan, split, self.plan.config.train.eval_examples)
        for task, values in scores.items():
            record = {"step": step, "task": task, "split": split, **{k: round(v, 5) for k, v in values.items()}}
            self.folder.log(record)
            console.log(f"eval {split} step {step} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        console.log(f"{split} evaluation took {time.perf_counter() - t0:.1f}s")
        return scores


class _Window:
    """Per-task metric sums between two log lines; device values fetched only at flush."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: dict[str, list] = {}
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, task: str, metrics) -> None:
        self.sums.setdefault(task, []).append(metrics)

    def flush(self, step: int) -> list[dict]:

        fetched = jax.device_get(self.sums)  # the one host sync of a log interval
        seconds = time.perf_counter() - self.t0
        records = []
        for task, items in sorted(fetched.items()):
            keys = [k for k in items[0] if k != "target_tokens"]
            record = {"step": step, "task": task, "steps": len(items)}
            record.update({k: round(float(np.mean([m[k] for m in items])), 6) for k in keys})
            record["tokens_per_s"] = round(self.tokens / seconds, 1)
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
    )
    progress.add_task("train", total=total, completed=start, losses="")
    return progress


# ---------------------------------------------------------------------------


def list_tasks() -> None:

    for name in tasks.names():
        task = tasks.get(name)
        splits = task.load()
        size = sum(len(s) for s in splits.values())
        print(f"{name:12s} {task.kind:9s} {size:8d}  {task.description}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--list-tasks" in argv:
        list_tasks()
        return 0
    try:
        cfg = resolve_config(argv)
        args = build_parser().parse_args(argv)
        out = args.out or f"runs/{'-'.join(cfg.train.tasks)}-{cfg.train.seed}"
        plan = prepare(cfg)
        RunFolder(out).check_resumable(plan.config)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    test = run(plan, out)
    print(json.dumps({"out": str(out), "test": test}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
