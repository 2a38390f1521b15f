"""The embedding look-up: a gather (``sharding.vocab_parallel.embed``) against the one-hot matmul it replaced.

    python benchmarks/embed_bench.py

Forward and backward of the look-up alone, at mtl's byte vocabulary (V = 384)
and Qwen's (V = 151,936), printed as times and ratios measured in one run.
"""

import time

import jax
import jax.numpy as jnp

from sharding import vocab_parallel

B, T, D = 2, 128, 256


def one_hot(table, tokens):
    return jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype) @ table  # [B, T, V] @ [V, D]


def timed(fn, *args, repeats=5):
    fn(*args)[1].block_until_ready()  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*args)[1].block_until_ready()
    return (time.perf_counter() - t0) / repeats


def main():
    for v in (384, 151_936):
        table = jax.random.normal(jax.random.key(0), (v, D))
        tokens = jax.random.randint(jax.random.key(1), (B, T), 0, v)
        times = {}
        for name, look_up in (("one-hot matmul", one_hot), ("gather", vocab_parallel.embed)):
            step = jax.jit(jax.value_and_grad(lambda w, t, f=look_up: jnp.sum(f(w, t) ** 2)))
            times[name] = timed(step, table, tokens)
        print(
            f"V={v:>7}: one-hot {times['one-hot matmul'] * 1e3:8.2f} ms, gather {times['gather'] * 1e3:7.2f} ms "
            f"({times['one-hot matmul'] / times['gather']:.1f}x), forward+backward of [{B}, {T}] tokens, D={D}"
        )


if __name__ == "__main__":
    main()
