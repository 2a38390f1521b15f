"""What checkpoint checksums cost: restore and save with and without them, in one process.

    flock /work/bench.lock python benchmarks/checkpoint_bench.py                 # the base preset's state
    python benchmarks/checkpoint_bench.py --preset small --repeats 5 --json out.json

It saves one train state (model and AdamW moments) of the preset on one device
without digests and times computing them apart; then it restores it without
verification and times ``mtl.checksums.verify`` on the restored arrays apart
(the same calls ``Checkpoints.restore`` makes). Timed apart, the two parts are
not lost in the noise of a shared machine. The files sit in the page cache after
the first read, so a restore is as fast as it gets and the share of
verification as large as it gets. Prints the medians and the shares; the goal
(issue 26) is verification under 10% of the restore time. Results:
docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import sharding  # noqa: E402
from mtl import checksums, training  # noqa: E402
from mtl import config as C  # noqa: E402
from mtl.checkpoint import Checkpoints  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", choices=sorted(C.PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    cfg = C.preset(args.preset)
    mesh = sharding.make_mesh("", jax.devices()[:1])
    _, state, _ = training.create_train_state(cfg.model, cfg.train, mesh)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    times = {"restore_unverified": [], "verify": [], "save_without_digests": [], "digests": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = Checkpoints(tmp, keep=args.repeats + 2)
        digests = checksums.tree_digests
        checksums.tree_digests = lambda tree: {}  # the save as it was before checksums
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            checkpoints.save(step, state["model"], state["optimizer"], {"step": step})
            checkpoints.wait()
            times["save_without_digests"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            recorded = {item: digests(nnx.to_pure_dict(state[item])) for item in ("model", "optimizer")}
            times["digests"].append(time.perf_counter() - t0)
        checksums.tree_digests = digests
        verify = checksums.verify
        checksums.verify = lambda *a: None  # the restore as it was before checksums
        _, target, _ = training.abstract_train_state(cfg.model, cfg.train, mesh)
        checkpoints.restore(1, target["model"], target["optimizer"])  # warm: the files in the page cache
        for _ in range(args.repeats):
            _, target, _ = training.abstract_train_state(cfg.model, cfg.train, mesh)
            t0 = time.perf_counter()
            checkpoints.restore(1, target["model"], target["optimizer"])
            jax.block_until_ready(jax.tree.leaves(target))
            times["restore_unverified"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for item in ("model", "optimizer"):  # what restore adds: the same call on the same arrays
                verify(nnx.to_pure_dict(target[item]), recorded[item], item)
            times["verify"].append(time.perf_counter() - t0)
        checksums.verify = verify
        checkpoints.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "preset": args.preset,
        "state_bytes": nbytes,
        "median_s": median,
        "verification_share_of_restore": median["verify"] / (median["restore_unverified"] + median["verify"]),
        "digest_share_of_save": median["digests"] / (median["save_without_digests"] + median["digests"]),
        "runs": times,
        "devices": str(jax.devices()[0]),
    }
    print(f"{args.preset}: train state {nbytes / 1e9:.2f} GB on {result['devices']}")
    for k, v in median.items():
        print(f"  {k:22s} {v:7.2f} s (median of {args.repeats})")
    print(f"  verification: {100 * result['verification_share_of_restore']:.1f}% of the restore time")
    print(f"  digests:      {100 * result['digest_share_of_save']:.1f}% of the save time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
