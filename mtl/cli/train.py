"""``train.py``: train one multi-task model on a device mesh (``python train.py --help``; docs/contract.md).

Parses its arguments once, builds the run's config, and calls
:mod:`mtl.trainer`; a user mistake becomes one line ``train.py: error: ...``
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

import jax

from mtl import config as C
from mtl import disk, distributed, perf, trainer
from mtl.cache_dir import HELP as CACHE_DIR_HELP
from mtl.cache_dir import enable_compilation_cache
from mtl.config import UsageError
from mtl.run_folder import RunFolder

DIVERGED = 3  # exit status of a run stopped by a non-finite loss, gradient or state (2 is bad usage)


def out_of_memory(error: BaseException) -> str | None:
    """XLA's first line if ``error`` (or a cause) is its RESOURCE_EXHAUSTED: a shape that cannot be allocated."""
    while error is not None:
        if str(error).startswith("RESOURCE_EXHAUSTED"):
            return str(error).splitlines()[0][:200]
        error = error.__cause__ or error.__context__
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a sharded multi-task Transformer on built-in tasks and task files.",
        epilog=set_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--init",
        metavar="SOURCE",
        help="start from a pretrained model: a Hugging Face folder, hf:ORG/NAME, a .gguf file, or an mtl run folder "
        "(warm start)",
    )
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_DIR_HELP)
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


def set_fields_help(preset: str = "tiny") -> str:
    """The fields ``--set`` accepts, with the ``preset``'s values (``--help``'s epilog)."""
    cfg = C.preset(preset)
    lines = [f"--set fields (SECTION.FIELD=VALUE), with the {preset} preset's values:"]
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for field in dataclasses.fields(values):
            if field.name == "heads":
                continue  # filled in from the tasks
            value = getattr(values, field.name)
            shown = ",".join(value) if isinstance(value, tuple) else value
            lines.append(f"  {section.name}.{field.name}={shown}")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> C.Config:
    """The run's config from parsed arguments (raises UsageError)."""
    return trainer.configure(
        args.preset,
        tasks=args.tasks,
        mixture=args.mixture,
        mesh=args.mesh,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        overrides=args.set,
        init=args.init,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Before JAX starts its threads: reuse the step's host scratch instead of
    # mapping it afresh every step (1.1-1.25x on CPU; docs/training_bench.md).
    perf.tune_host_allocator()
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").addFilter(disk.QuietDiskErrors())  # a full disk is one line below, not pages
    disk.quiet_abandoned_writes()
    try:
        if args.list_tasks:
            trainer.list_tasks()
            return 0
        _join_cluster(args)  # before anything touches a device: joining a cluster changes what the devices are
        enable_compilation_cache(args.cache_dir, log=lambda line: print(f"train.py: {line}", file=sys.stderr))
        first = jax.process_index() == 0  # the process that reports
        if args.eval_only:
            if not args.out:
                raise UsageError("--eval-only needs --out, the run folder to evaluate")
            scores = trainer.eval_only(args.out, mesh=args.mesh, overrides=args.set, cache_dir=args.cache_dir)
            if first:
                print(json.dumps(scores))
            return 0
        cfg = config_from_args(args)
        out = args.out or trainer.default_out(cfg)
        RunFolder(out).check_path()  # before the data is read
        plan = trainer.prepare(cfg, log=print if first else lambda *_: None, cache_dir=args.cache_dir)
        RunFolder(out).check_resumable(plan.config, [d.meta() for d in plan.data])  # before the model is built
        test = trainer.run(plan, out)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except trainer.Preempted as e:
        print(f"train.py: {e}; run the same command to resume", file=sys.stderr)
        return 128 + 15  # as a process ended by SIGTERM: what schedulers expect
    except trainer.Diverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return DIVERGED
    except KeyboardInterrupt:  # Ctrl-C before training started (after, the run saves and stops on its own)
        print("train.py: interrupted before training started", file=sys.stderr)
        return 128 + 2
    except Exception as e:
        if reason := disk.disk_error(e):
            where = f"--out {args.out!r}" if args.out else "the run folder"
            message = f"{where} cannot be written: {reason}; make room and run the same command"
        elif reason := out_of_memory(e):  # what the memory estimate did not foresee
            message = f"the run does not fit in the devices' memory ({reason}); lower train.batch_size or the model"
        else:
            raise
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    if first:
        print(json.dumps({"out": str(out), "test": test}))
    return 0


def _join_cluster(args: argparse.Namespace) -> None:
    try:
        if cluster := distributed.settings(args.coordinator, args.num_processes, args.process_id):
            distributed.join(cluster)
    except ValueError as e:  # a malformed cluster, or one that cannot be reached
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
