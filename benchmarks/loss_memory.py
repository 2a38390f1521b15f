"""Peak host memory of training a tiny Qwen2-shaped model with Qwen's 151,936-token vocabulary.

    python benchmarks/loss_memory.py                        # this checkout
    python benchmarks/loss_memory.py --code OLD_CHECKOUT    # the same script against another checkout of mtl
    python benchmarks/loss_memory.py --folder HF_FOLDER --batch 35 --seq-len 128   # that model's shapes instead

One child process a run (``--child``): it builds the model (width 64, 2 layers,
V = 151,936, tied embeddings, f32), compiles mtl's generation train step for a
batch of ``--batch`` x ``--seq-len`` tokens, runs ``--steps`` steps and prints its
peak resident memory (``VmHWM``) and the step's compiled scratch memory. A
plain loss holds [B, T, V] f32 logits and their gradient (64 x 32 x 151,936 x 4
bytes = 1.16 GiB each); the blockwise loss holds one block of them. With
``--folder`` the model has a Hugging Face folder's shapes (random weights: they
change no memory), and the child prints ``mtl.memory``'s estimate beside the
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    sys.path.insert(0, args.code)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import dataclasses

    import jax
    import numpy as np

    from mtl import config as C
    from mtl import training
    from sharding import make_mesh

    model = dataclasses.replace(
        C.tiny().model,
        vocab_size=151_936,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=192,
        max_len=args.seq_len,
        qkv_bias=True,
        scale_embeddings=False,
        heads=(C.HeadConfig("lm", "generate"),),
    )
    if args.folder:
        from mtl import hf_import

        model = dataclasses.replace(
            hf_import.read_config(args.folder, args.seq_len), param_dtype="float32", heads=model.heads
        )
    train = dataclasses.replace(C.tiny().train, steps=args.steps + 1)
    mesh = make_mesh("data=1", jax.devices()[:1])
    estimate = None
    if hasattr(C, "Config") and os.path.exists(os.path.join(args.code, "mtl", "memory.py")):
        from mtl import memory

        estimate = memory.estimate(C.Config(model=model, train=train), args.batch, args.seq_len, mesh).total
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq_len
    batch = {
        "tokens": rng.integers(0, model.vocab_size, (b, t)).astype(np.int32),
        "targets": rng.integers(0, model.vocab_size, (b, t)).astype(np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "task_id": np.zeros(b, np.int32),
    }
    graphdef, state, shardings = training.create_train_state(model, train, mesh)
    with jax.set_mesh(mesh):
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="lm", kind="generate")
        compiled = step.lower(state, training.put_batch(batch, mesh)).compile()
        scratch = compiled.memory_analysis().temp_size_in_bytes
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, training.put_batch(batch, mesh))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    peak = int(status["VmHWM"].split()[0]) * 1024
    result = {"peak_rss": peak, "scratch": scratch, "loss": float(metrics["loss"]), "step_s": times}
    print(json.dumps({**result, "estimate": estimate}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", default=HERE, help="the mtl checkout to measure (default: this one)")
    p.add_argument("--folder", help="a Hugging Face model folder whose shapes to train (default: the tiny Qwen2)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--code", args.code, "--batch", str(args.batch)]
    cmd += ["--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    cmd += ["--folder", args.folder] if args.folder else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=args.code)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    shape = f"{args.folder}'s shapes" if args.folder else "V = 151,936"
    if result.get("estimate"):
        print(f"mtl.memory's estimate: {result['estimate'] / gib:.2f} GiB")
    print(
        f"{args.code}: batch {args.batch} x {args.seq_len}, {shape}: peak RSS {result['peak_rss'] / gib:.2f} GiB, "
        f"compiled scratch {result['scratch'] / gib:.2f} GiB, loss {result['loss']:.4f}, "
        f"step {', '.join(f'{s:.2f}' for s in result['step_s'])} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
