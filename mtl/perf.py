"""Model FLOPs and the machine's measured matmul peak, for MFU; host allocator tuning.

MFU = (model FLOPs a second) / (the peak measured here, now). The peak is a
measurement, not a datasheet number, so MFU on a laptop CPU and on a GPU mean
the same thing: the share of what the mesh's matmuls reach.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import jax
import jax.numpy as jnp

from mtl.config import ModelConfig


def train_flops_per_token(
    cfg: ModelConfig, seq_len: int, *, trainable: str = "all", kind: str = "generate", conservative: bool = False
) -> float:
    """Forward plus backward matmul FLOPs a token of a train step: the work the step does.

    A weight matrix that trains costs 6 FLOPs a parameter a token (2 forward,
    2 for its input's gradient, 2 for its own gradient); a frozen one 4, since
    the step computes no gradient for it (``train.trainable=adapters``: the
    backbone still runs forward and passes gradients through to the adapters
    below). Counted: the L layers' projections and MLP, every adapter pair
    (trained: 6), the language-model head on a generation step only (the
    blockwise loss makes its gradients in its one pass, nothing recomputed),
    a tag head at every token; the embedding look-up is a gather, no matmul.
    Attention scores and mixing add 12 * L * T * N * H: XLA computes the whole
    T x S square, masked half included, and they have no weights to freeze.
    Rematerialised work is not counted (model FLOPs, not hardware FLOPs).

    ``conservative=True`` counts only what any implementation must do, the
    ``6N + 6 L T N H`` convention, for a generation step with every weight
    training: only the causal half of the attention square.
    """
    d, n, k, h, f, v, layers = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.vocab_size,
        cfg.n_layers,
    )
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    if conservative:
        return 6.0 * layers * per_layer + 6.0 * v * d + 6.0 * layers * seq_len * n * h
    frozen = trainable != "all"
    weight = 4.0 if frozen else 6.0
    shapes = {"q": (d, n * h), "k": (d, k * h), "v": (d, k * h), "o": (n * h, d), "gate": (d, f), "up": (d, f)}
    shapes["down"] = (f, d)
    rank = cfg.adapter_rank if cfg.adapter_rank > 0 else 0
    targets = [t.strip() for t in cfg.adapter_targets.split(",") if t.strip()] if rank else []
    adapter = sum(rank * sum(shapes[t]) for t in targets)
    head = 0.0
    if kind == "generate":
        head = weight * v * d
    elif kind == "tag":
        head = 6.0 * d * max((hd.num_classes for hd in cfg.heads if hd.kind == "tag"), default=0)
    return weight * layers * per_layer + 6.0 * layers * adapter + head + 12.0 * layers * seq_len * n * h


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul on the default device, best of ``repeats``.

    The best, not the mean: on a shared machine a disturbed repeat can only
    read low, and a low peak would inflate MFU.
    """
    a = jnp.ones((size, size), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def mesh_peak(mesh: jax.sharding.Mesh, dtype: str = "float32") -> float:
    """The matmul peak of a whole mesh: one device's, measured, times the devices that add compute.

    Accelerators each bring their own matmul units, so the peak scales with the
    mesh's devices. Virtual CPU devices of one process share that host's cores,
    which one measurement already uses, so on CPU it scales with the processes
    (hosts) instead; processes sharing one machine (a localhost test cluster)
    make it read high and MFU low.
    """
    platform = mesh.devices.flat[0].platform
    size = 2048 if platform == "cpu" else 8192  # large enough to reach an accelerator's peak
    return matmul_peak(dtype, size=size) * peak_multiplier(platform, mesh.devices.size, jax.process_count())


def peak_multiplier(platform: str, devices: int, processes: int) -> int:
    """How many one-device peaks a mesh of ``devices`` over ``processes`` holds (see :func:`mesh_peak`)."""
    return processes if platform == "cpu" else devices


def tune_host_allocator() -> bool:
    """Keeps freed host memory in the process instead of returning it to the OS (glibc only).

    XLA:CPU allocates each step's temporaries afresh, one block of hundreds of
    MB for a training step. glibc serves blocks that large with ``mmap`` and
    unmaps them on free, so every step page-faults its whole working set back
    in: about 100k faults and a sixth of the step time for the small preset on
    2 cores. One arena without ``mmap`` and without trimming reuses the memory
    instead. Call it once at start-up, before JAX starts its threads; the
    price is a resident size that stays at its peak.

    Returns:
      Whether the settings took (False where the C library is not glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # from glibc's malloc.h
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
    return all(mallopt(option, value) == 1 for option, value in settings)
