"""A train step's memory on one device, estimated before anything compiles, and the memory there is.

The weights and optimizer state are exact: the train state is traced, not
built (:func:`mtl.training.abstract_train_state`), and each array counts its
own shard on the mesh. Gradients are one more copy of what trains. The
activations are a model of what the backward pass keeps, by ``model.remat``,
per token and layer, plus one layer's working set and the blockwise loss's
block of logits; checked against XLA's ``memory_analysis`` of compiled steps
in tests/test_memory.py and by a SmolLM2-135M step (1.0x to 1.35x of XLA's figure, on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from mtl import config as C

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes one device holds for a train step."""

    weights: int
    optimizer: int
    gradients: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations

    def text(self) -> str:
        parts = ("weights", "optimizer", "gradients", "activations")
        return f"{self.total / GIB:.2f} GiB a device (" + ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}" for name in parts
        ) + ")"


def per_device_bytes(tree) -> int:
    """Bytes of device 0's shards of every array of ``tree`` (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def state_bytes(cfg: C.Config, mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """(weights, optimizer state) bytes a device holds, from the traced train state."""
    from mtl import training  # the model core; imported here so that ``estimate`` can be given the numbers

    _, abstract, _ = training.abstract_train_state(cfg.model, cfg.train, mesh)
    return per_device_bytes(abstract["model"]), per_device_bytes(abstract["optimizer"])


def estimate(
    cfg: C.Config, rows: int, width: int, mesh: jax.sharding.Mesh, state: tuple[int, int] | None = None
) -> Estimate:
    """The memory of one train step of ``rows`` x ``width`` tokens (the global batch) on one device.

    Args:
      state: (weights, optimizer) bytes from :func:`state_bytes`, when already known.
    """
    m = cfg.model
    weights, optimizer = state if state is not None else state_bytes(cfg, mesh)
    # AdamW keeps two moments of each trained parameter, in its dtype: a gradient is half of that.
    gradients = optimizer // 2
    batch_devices = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
    tensor = mesh.shape.get("tensor", 1)
    local_rows = max(1, -(-rows // (batch_devices * cfg.train.grad_accum)))
    tokens = local_rows * width
    b = np.dtype(m.dtype).itemsize if m.dtype != "bfloat16" else 2
    d, f = m.d_model, m.d_ff // tensor
    q, kv = m.n_heads * m.head_dim // tensor, max(1, m.n_kv_heads // tensor) * m.head_dim
    heads = max(1, m.n_heads // tensor)
    square = heads * width * 4  # a token's row of the attention probabilities, f32
    # XLA:CPU's compiled steps keep about as much under any remat policy (measured: docs/sharding.md), so on
    # the CPU the estimate does not count on it.
    remat = m.remat if mesh.devices.flat[0].platform != "cpu" else "none"
    kept = {  # what a layer keeps for the backward pass, a token
        # inputs, norms, projections, rotated q and k, attention out, MLP halves, SwiGLU, the norms' f32 copies
        "none": (6 * d + 3 * q + 3 * kv + 4 * f) * b + 2 * d * 4 + square,
        "dots": (2 * d + 2 * q + 2 * kv + 3 * f) * b,
        "full": d * b,
    }[remat]
    working = (10 * d + 4 * q + 4 * kv + 6 * f) * b + 2 * square  # one layer's forward and backward, live
    v = m.vocab_size // tensor
    from sharding.vocab_parallel import BLOCK_BYTES

    loss = tokens * d * 4 + d * v * 4 + 3 * min(BLOCK_BYTES, tokens * v * 4)  # d_hidden, d_head, a block
    activations = tokens * (m.n_layers * kept + working) + loss
    return Estimate(weights, optimizer, gradients, int(activations))


def available(mesh: jax.sharding.Mesh) -> tuple[int, str]:
    """(bytes one device may use, where that figure comes from).

    An accelerator: its allocator's limit. CPU: the host's available memory
    (``MemAvailable``) shared by this process's devices of the mesh.
    """
    device = mesh.devices.flat[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    local = sum(1 for dev in mesh.devices.flat if dev.process_index == jax.process_index())
    return host_available() // max(local, 1), "the host's available memory"


def host_available() -> int:
    """MemAvailable of /proc/meminfo; elsewhere the free physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_batch(cfg: C.Config, width: int, mesh: jax.sharding.Mesh, budget: int, state=None) -> int:
    """The most rows of ``width`` tokens a step may have within ``budget`` bytes a device (0: none fits)."""
    state = state if state is not None else state_bytes(cfg, mesh)
    step = math.lcm(math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp")), cfg.train.grad_accum)
    lo, hi = 0, step
    while estimate(cfg, hi, width, mesh, state).total <= budget:
        lo, hi = hi, hi * 2
        if hi > 2**24:
            return lo
    while hi - lo > step:  # the largest multiple of ``step`` that fits, by bisection
        mid = (lo + hi) // 2 // step * step
        if estimate(cfg, mid, width, mesh, state).total <= budget:
            lo = mid
        else:
            hi = mid
    return lo
