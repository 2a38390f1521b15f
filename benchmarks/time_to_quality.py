"""Time to a trained model: wall-clock minutes on this machine until the small preset reaches quality marks.

    python benchmarks/time_to_quality.py                          # packed against unpacked, to both marks
    python benchmarks/time_to_quality.py --cap-minutes 20 --json out.json

Two runs of the ``small`` preset on the demo mixture (g2p and langid), one with
``train.pack=false`` (one example a row, trimmed) and one packed, train side by
side, taking turns ``--eval-every`` steps at a time so that load on a shared
machine falls on both alike. After each turn a run is evaluated on the
validation splits (``--eval-examples`` a task, the same examples every time);
its clock holds only its own training time (compilation included, evaluation
not: that is reported apart). A run stops when it has reached both marks
(g2p exact match ``--g2p`` and langid accuracy ``--langid``), at ``--steps``,
or when its training clock passes ``--cap-minutes``; the report says which
marks each run reached, when, and the ratio of the two times.

Both runs draw the same examples for the same steps and make the same updates
(packing changes only the layout; ``tests/test_tasks_packing.py``), so they
reach a mark at about the same step and the ratio of times is the ratio of
step times over the steps it took. The learning-rate schedule spans
``--steps`` (default 3000, five times the preset's 600: the marks need more
training than the five-minute demo). Results: docs/training_bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl import perf  # noqa: E402

MARKS = (("g2p", "exact_match"), ("langid", "accuracy"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="the schedule's length and the most steps a run takes")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (a turn)")
    p.add_argument("--eval-examples", type=int, default=256, help="validation examples a task and evaluation")
    p.add_argument("--g2p", type=float, default=0.40, help="the g2p exact-match mark")
    p.add_argument("--langid", type=float, default=0.75, help="the langid accuracy mark")
    p.add_argument("--cap-minutes", type=float, default=30.0, help="stop a run once its training clock passes this")
    p.add_argument("--modes", default="unpacked,packed", help="which runs: unpacked, packed or both")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return p.parse_args(argv)


class Run:
    """One training run, stepped a turn at a time, with its own clock and evaluations."""

    def __init__(self, plan, pack: bool, steps: int, eval_examples: int):
        import jax

        import tasks
        from mtl import evaluator, trainer, training

        self.name = "packed" if pack else "unpacked"
        cfg = plan.config
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pack=pack, steps=steps))
        self.plan, self.mesh = plan, plan.mesh
        sizes = {d.name: len(d.splits["train"]) for d in plan.data}
        rates = tasks.mixture_rates(self.cfg.train.mixture, sizes)
        self.sampler = tasks.MixtureSampler(sizes, rates, self.cfg.train.batch_size, self.cfg.train.seed)
        self.batches = trainer.TrainBatches(self.cfg, plan.data, self.mesh)
        self.graphdef, self.state, self.shardings = training.create_train_state(
            self.cfg.model, self.cfg.train, self.mesh
        )
        self.kinds = {d.name: d.kind for d in plan.data}
        self.evaluate = evaluator.Evaluator(
            plan.data, self.mesh, trainer.eval_settings(self.cfg), eval_examples, lambda record: None
        )
        self.step_fns: dict = {}
        self.done = 0
        self.train_s = self.eval_s = 0.0
        self.real_tokens = 0
        self.history: list[dict] = []
        self.reached: dict[str, dict] = {}
        self._jax, self._training = jax, training

    def turn(self, steps: int) -> None:
        jax, training = self._jax, self._training
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            for step in range(self.done, min(self.done + steps, self.cfg.train.steps)):
                name, indices = self.sampler.batch_at(step)
                batch, rows, real = self.batches(name, indices)
                if name not in self.step_fns:
                    self.step_fns[name] = training.compile_train_step(
                        self.graphdef, self.shardings, self.mesh, batch, task=name, kind=self.kinds[name]
                    )
                self.state, _ = self.step_fns[name](self.state, training.put_batch(batch, self.mesh, rows))
                self.real_tokens += real
                self.done = step + 1
            jax.block_until_ready(self.state)
        self.train_s += time.perf_counter() - t0

    def score(self, marks: dict[str, float], console) -> dict:
        from flax import nnx

        t0 = time.perf_counter()
        with self._jax.set_mesh(self.mesh):
            scores = self.evaluate(nnx.merge(self.graphdef, self.state).model, "validation", self.done, console)
        self.eval_s += time.perf_counter() - t0
        values = {task: scores[task][metric] for task, metric in MARKS}
        record = {"step": self.done, "train_minutes": self.train_s / 60, **values}
        self.history.append(record)
        for task, _ in MARKS:
            if task not in self.reached and values[task] >= marks[task]:
                self.reached[task] = {"step": self.done, "train_minutes": self.train_s / 60}
        return record

    def finished(self, cap_minutes: float) -> bool:
        return len(self.reached) == len(MARKS) or self.done >= self.cfg.train.steps or self.train_s / 60 >= cap_minutes


class _Quiet:
    def log(self, *args, **kwargs):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    perf.tune_host_allocator()  # as train.py does, before JAX starts its threads

    import jax

    from mtl import trainer

    marks = {"g2p": args.g2p, "langid": args.langid}
    cfg = trainer.configure("small", tasks="g2p,langid")
    plan = trainer.prepare(cfg, log=lambda _: None)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs = [Run(plan, mode == "packed", args.steps, args.eval_examples) for mode in modes]
    print(
        f"{os.cpu_count()} cores; jax {jax.__version__}; small preset, batch {cfg.train.batch_size}, schedule "
        f"{args.steps} steps; marks: g2p exact match {args.g2p}, langid accuracy {args.langid} "
        f"({args.eval_examples} validation examples); cap {args.cap_minutes} training minutes a run",
        flush=True,
    )
    started = time.perf_counter()
    while not all(run.finished(args.cap_minutes) for run in runs):
        for run in runs:
            if run.finished(args.cap_minutes):
                continue
            run.turn(args.eval_every)
            r = run.score(marks, _Quiet())
            print(
                f"{run.name:<9} step {r['step']:>5}  {r['train_minutes']:6.2f} train min  "
                f"g2p exact match {r['g2p']:.3f}  langid accuracy {r['langid']:.3f}  "
                f"({run.real_tokens / run.train_s:.0f} real tokens/s)",
                flush=True,
            )
    print(f"\nwall clock of the whole benchmark: {(time.perf_counter() - started) / 60:.1f} min")
    report = {"args": vars(args), "runs": {}}
    for run in runs:
        report["runs"][run.name] = {
            "steps": run.done,
            "train_minutes": run.train_s / 60,
            "eval_minutes": run.eval_s / 60,
            "real_tokens_per_s": run.real_tokens / run.train_s,
            "reached": run.reached,
            "history": run.history,
        }
        marks_text = ", ".join(
            f"{task} at step {v['step']} after {v['train_minutes']:.2f} min" for task, v in run.reached.items()
        )
        missing = [task for task, _ in MARKS if task not in run.reached]
        last = run.history[-1]
        print(
            f"{run.name:<9} {marks_text or 'no mark reached'}"
            + (
                f"; not reached: {', '.join(missing)} (last: g2p {last['g2p']:.3f}, langid {last['langid']:.3f} "
                f"at step {run.done}, {run.train_s / 60:.2f} min)"
                if missing
                else ""
            )
        )
    by_name = report["runs"]
    if {"packed", "unpacked"} <= set(by_name):
        for task, _ in MARKS:
            a, b = by_name["unpacked"]["reached"].get(task), by_name["packed"]["reached"].get(task)
            if a and b:
                ratio = a["train_minutes"] / b["train_minutes"]
                report.setdefault("ratio", {})[task] = ratio
                print(f"time to the {task} mark: unpacked/packed = {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
