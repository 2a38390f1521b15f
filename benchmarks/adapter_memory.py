"""Bytes of parameters and optimizer state one device holds, training everything or adapters only.

    python benchmarks/adapter_memory.py --preset base --mesh data=2,fsdp=2,tensor=2 --tasks 4 --rank 8

Traced, not run (``mtl.training.abstract_train_state``): every figure is the
shard shapes the mesh gives each array, so a 315M-parameter preset is measured
in seconds without allocating it. ``--devices N`` sets the virtual CPU devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_device_bytes(tree) -> int:
    """Bytes of device 0's shards of every array of ``tree`` (ShapeDtypeStructs with shardings)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--tasks", type=int, default=4, help="generation tasks, each with its own adapter")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from mtl import config as C
    from mtl import training
    from sharding import make_mesh

    cfg = C.preset(args.preset)
    heads = tuple(C.HeadConfig(f"t{i}", "generate") for i in range(args.tasks))
    mesh = make_mesh(args.mesh, jax.devices())
    print(f"preset {args.preset}, {args.tasks} tasks, mesh {dict(mesh.shape)}; MB on one device")
    print(f"{'model':<36}{'trainable':<11}{'params':>10}{'optimizer':>11}{'total':>10}")
    for rank, trainable in ((0, "all"), (args.rank, "all"), (args.rank, "adapters")):
        model = dataclasses.replace(cfg.model, heads=heads, adapter_rank=rank, adapter_targets=args.targets)
        train = dataclasses.replace(cfg.train, trainable=trainable)
        _, abstract, _ = training.abstract_train_state(model, train, mesh)
        params, optimizer = per_device_bytes(abstract["model"]), per_device_bytes(abstract["optimizer"])
        name = f"rank {rank} ({args.targets})" if rank else "no adapters"
        print(
            f"{name:<36}{trainable:<11}{params / 1e6:>10.2f}{optimizer / 1e6:>11.2f}{(params + optimizer) / 1e6:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
