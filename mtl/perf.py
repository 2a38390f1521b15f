"""Model FLOPs and the machine's measured matmul peak, for MFU.

MFU = (model FLOPs a second) / (the peak measured here, now). The peak is a
measurement, not a datasheet number, so MFU on a laptop CPU and on a GPU mean
the same thing: the share of what this device's matmuls reach.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from mtl.config import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward plus backward FLOPs a token: 6 per weight-matrix parameter, plus attention.

    Matmul parameters: the L layers' projections and MLP, and the vocabulary
    matrix twice (the one-hot embedding and the logits are both matmuls here).
    Attention scores and mixing add 12 * L * T * N * H (causal masking not
    discounted, as XLA computes the full square).
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
    matmul_params = layers * per_layer + 2 * v * d
    return 6.0 * matmul_params + 12.0 * layers * seq_len * n * h


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on the default device, best of ``repeats``."""
    a = jnp.ones((size, size), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
