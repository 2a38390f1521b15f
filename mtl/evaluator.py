"""Evaluation of a model on its tasks, through the same scheduler and engine that serve it.

Used while training (validation and test metrics, the best checkpoint's
choice), by ``train.py --eval-only`` and by benchmarks. The scheduler is built by
:func:`mtl.serving.server.make_scheduler`, so a metric measures exactly what a client of
the server would get: the same prompts, the same greedy decoding, the same
heads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

import tasks
from mtl import config as C
from mtl.serving.requests import Request
from mtl.serving.scheduler import Scheduler
from mtl.serving.server import make_scheduler


def evaluate(
    scheduler: Scheduler, data: Sequence, split: str, limit: int, tokenizer: tasks.Tokenizer | None = None
) -> dict[str, dict[str, float]]:
    """Per-task metrics of the model in ``scheduler`` on ``split``.

    Args:
      scheduler: serves the model, as :func:`mtl.serving.server.make_scheduler` builds it.
      data: the run's tasks (:class:`mtl.trainer.TaskData`: name, kind, labels, splits, max_new_tokens).
      split: ``validation`` or ``test``.
      limit: examples a task, evenly spaced over the split; 0 for all of them.
      tokenizer: the run's; default the byte tokenizer.

    Returns:
      task name -> metric name -> value (``tasks.metrics.metrics_for`` of the task's kind);
      a task with no example in ``split`` is left out.
    """
    tokenizer = tokenizer or tasks.ByteTokenizer()
    results = {}
    for d in data:
        encoded = d.splits[split]
        n = len(encoded) if limit <= 0 else min(limit, len(encoded))
        if n == 0:
            continue
        # Evenly spaced examples: a split's order may follow its source (by language, say).
        picks = np.linspace(0, len(encoded) - 1, n).astype(int)
        prompts = [tasks.prompt_ids(tokenizer, encoded.inputs[i]) for i in picks]
        refs = [encoded.references[i] for i in picks]
        if d.kind == "generate":
            budget = min(d.max_new_tokens, scheduler.engine.cfg.max_len)
            gens = scheduler.generate([Request(d.name, p, max_new_tokens=budget) for p in prompts])
            preds = [tokenizer.decode(g.tokens) for g in gens]
        else:
            answers = scheduler.score([Request(d.name, p) for p in prompts])
            if d.kind == "classify":
                preds = [int(a.values.argmax()) for a in answers]
                refs = [d.labels.index(r) for r in refs]
            elif d.kind == "regress":
                preds = [float(a.values) for a in answers]
            else:
                preds = [
                    tasks.tags_at_word_ends(a.values, encoded.inputs[i], tokenizer) for a, i in zip(answers, picks)
                ]
                refs = [[d.labels.index(t) for t in row] for row in refs]
        metric_fns = tasks.metrics.metrics_for(d.kind)
        results[d.name] = {name: fn(preds, refs) for name, fn in metric_fns.items()}
    return results


class Evaluator:
    """Evaluates a model as it trains; one scheduler and engine, compiled once, serves every evaluation.

    Args:
      data: the run's tasks.
      mesh: the mesh the model lives on.
      settings: the engine's (its ``mesh`` field is not read: the engine runs on ``mesh``).
      limit: examples a task and evaluation (0: all).
      log: called with each evaluation record (``metrics.jsonl`` lines).
      tokenizer: the run's; default the byte tokenizer.
    """

    def __init__(
        self,
        data: Sequence,
        mesh,
        settings: C.ServeConfig,
        limit: int,
        log: Callable[[dict], None],
        tokenizer: tasks.Tokenizer | None = None,
    ):
        self.data, self.mesh, self.settings, self.limit, self.log = data, mesh, settings, limit, log
        self.tokenizer = tokenizer or tasks.ByteTokenizer()
        self.scheduler: Scheduler | None = None

    def __call__(self, model, split: str, step: int, console) -> dict[str, dict[str, float]]:
        if self.scheduler is None:
            self.scheduler = make_scheduler(model, self.mesh, self.settings, self.tokenizer)
        else:
            self.scheduler.engine.params = nnx.state(model)  # a train step donates old buffers: take the current ones
        t0 = time.perf_counter()
        scores = evaluate(self.scheduler, self.data, split, self.limit, self.tokenizer)
        for task, values in scores.items():
            self.log({"step": step, "task": task, "split": split, **{k: round(v, 5) for k, v in values.items()}})
            console.log(f"eval {split} step {step} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        console.log(f"{split} evaluation took {time.perf_counter() - t0:.1f}s")
        return scores


def selection_score(spec: str, kinds: dict[str, str], scores: dict[str, dict[str, float]]) -> float:
    """The number ``train.best_metric`` ranks checkpoints by; higher is better.

    ``mean`` averages each task's main metric (``tasks.metrics.MAIN``, all
    higher-is-better); ``TASK/METRIC`` takes one metric, negated when lower is
    better (an error rate, say). A task with no examples in the split has no
    scores and is left out; NaN when nothing is left, which ranks no checkpoint.
    """
    if spec == "mean":
        values = [scores[t][tasks.metrics.MAIN[kind]] for t, kind in kinds.items() if t in scores]
        return float(np.mean(values)) if values else float("nan")  # no task had examples to score
    task, metric = spec.split("/")
    if task not in scores:
        return float("nan")
    sign = 1.0 if tasks.metrics.HIGHER_IS_BETTER[metric] else -1.0
    return sign * scores[task][metric]


def check_selection(spec: str, kinds: dict[str, str]) -> None:
    """Raises ValueError, naming the bad value, if ``spec`` cannot rank this run's checkpoints."""
    if spec == "mean":
        return
    task, sep, metric = spec.partition("/")
    if not sep or task not in kinds:
        raise ValueError(f"train.best_metric={spec!r} must be mean or TASK/METRIC with TASK one of {', '.join(kinds)}")
    known = tasks.metrics.metrics_for(kinds[task])
    if metric not in known:
        raise ValueError(f"train.best_metric={spec!r}: {task} has the metrics {', '.join(known)}")
