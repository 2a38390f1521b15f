"""Does one multi-task model match single-task models at equal compute?

Trains one model on all the tasks for ``--steps`` steps, and one single-task
model per task for the steps that task gets in the multi-task mixture
(``round(steps * rate)``), so the single-task models together train exactly as
many steps as the multi-task one. Every model then answers the same test
examples; the table compares each task's metrics side by side.

    python benchmarks/multitask_quality.py --steps 1200 --out docs/multitask_quality.md

Takes about 20 minutes on 2 CPU cores with the small preset and 1200 steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tasks  # noqa: E402
from mtl import trainer  # noqa: E402
from tasks.metrics import HIGHER_IS_BETTER, MAIN  # noqa: E402


def train_model(base, task_names, steps, out, log):
    cfg = trainer.configure(**base, tasks=task_names, steps=steps)
    plan = trainer.prepare(cfg, log=lambda *_: None)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    test = trainer.run(plan, out)
    log(f"{'+'.join(task_names)}: {steps} steps in {time.perf_counter() - t0:.0f}s")
    return test


def table(single, multi, sizes, steps_of, total) -> str:
    lines = [
        "| task | train size | single-task steps | metric | single-task | multi-task | multi-task gain |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for task in sorted(sizes, key=sizes.get):
        for metric, value in single[task].items():
            m = multi[task][metric]
            better = (m - value) * (1 if HIGHER_IS_BETTER[metric] else -1)
            name = f"**{metric}**" if metric == MAIN[tasks.get(task).kind] else metric
            lines.append(
                f"| {task} | {sizes[task]:,} | {steps_of[task]} | {name} | {value:.4f} | {m:.4f} | "
                f"{'+' if better >= 0 else '−'}{abs(m - value):.4f} |"
            )
    lines.append(f"\nMulti-task: {total} steps over all tasks; the single-task models' steps add up to the same.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="g2p,langid,valence,hyphenate")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=1200, help="multi-task steps; the single-task ones add up to this")
    p.add_argument("--mixture", default="temperature:2")
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--runs", default="runs/multitask_quality", help="where the models' run folders go")
    p.add_argument("--out", default="docs/multitask_quality.md")
    args = p.parse_args(argv)

    names = args.tasks.split(",")
    # Evaluate only at the end, on eval_examples evenly spaced test examples a task.
    overrides = ["train.eval_every=0", f"train.eval_examples={args.eval_examples}"]
    base = {"preset": args.preset, "mixture": args.mixture, "overrides": overrides}
    sizes = {n: len(tasks.get(n).load()["train"]) for n in names}
    rates = tasks.mixture_rates(args.mixture, sizes)
    steps_of = {n: max(1, round(args.steps * rates[n])) for n in names}
    runs = pathlib.Path(args.runs)
    t0 = time.perf_counter()
    multi = train_model(base, names, args.steps, runs / "multi", print)
    single = {n: train_model(base, [n], steps_of[n], runs / n, print)[n] for n in names}
    minutes = (time.perf_counter() - t0) / 60

    command = "python benchmarks/multitask_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = [
        "# Multi-task against single-task models at equal compute",
        "",
        f"Made by `{command.strip()}` in {minutes:.0f} minutes on this machine "
        f"(preset `{args.preset}`, mixture `{args.mixture}`, test metrics on {args.eval_examples} "
        "evenly spaced test examples a task, greedy decoding). Main metric of each kind in bold.",
        "",
        table(single, multi, sizes, steps_of, args.steps),
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps({"multi": multi, "single": single, "steps": steps_of, "sizes": sizes}, indent=1),
        "```",
    ]
    pathlib.Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
