"""mtl.layers against plain references: the hand-written backward passes against autodiff, the cached
attention against XLA's, the KV cache's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl import layers

B, T, N, K, H, F = 2, 12, 6, 2, 8, 20


def inputs(*shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


def assert_same_value_and_grads(fast, reference, args):
    cotangent = jax.random.normal(jax.random.key(9), jax.eval_shape(reference, *args).shape)

    def loss(f):
        return lambda *a: jnp.sum(f(*a) * cotangent)

    argnums = tuple(range(len(args)))
    np.testing.assert_allclose(fast(*args), reference(*args), rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(fast), argnums)(*args)
    want = jax.grad(loss(reference), argnums)(*args)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 1e-3  # a real gradient to compare
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [K, N, 1])
def test_causal_attention_matches_dot_product_attention(kv_heads):
    query, key, value = inputs((B, T, N, H), (B, T, kv_heads, H), (B, T, kv_heads, H))
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    assert_same_value_and_grads(layers.causal_attention, reference, (query, key, value))


def test_rope_matches_the_rotate_half_formula():
    (x,) = inputs((B, T, N, H))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) + jnp.array([[0], [5]])

    def reference(x):
        half = H // 2
        inv_freq = 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
        angles = positions[..., None] * inv_freq
        sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
        x1, x2 = x[..., :half], x[..., half:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    assert_same_value_and_grads(lambda x: layers.rope(x, positions, 10_000.0), reference, (x,))


def test_swiglu_matches_silu_times_up():
    gate, up = inputs((B, T, F), (B, T, F))
    assert_same_value_and_grads(layers.swiglu, lambda g, u: jax.nn.silu(g) * u, (gate, up))


@pytest.mark.parametrize("kv_heads", [K, N, 1])
def test_cached_attention_matches_dot_product_attention(kv_heads):
    # One query token a row over a cache of T positions, each row seeing positions 0 to its own.
    query, key, value = inputs((B, 1, N, H), (B, T, kv_heads, H), (B, T, kv_heads, H), seed=1)
    positions = jnp.array([3, T - 1])
    cache = layers.KVCache.of_sequence(key, value)
    assert cache.key.shape == (B, kv_heads, H, T) and cache.value.shape == (B, kv_heads, T, H)
    got = layers.cached_attention(query, cache, positions)
    want = jax.nn.dot_product_attention(query, key, value, key_value_seq_lengths=positions + 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kv_cache_write_and_padding():
    key, value = inputs((B, T, K, H), (B, T, K, H))
    cache = layers.KVCache.of_sequence(key[:, :5], value[:, :5]).padded(T)
    np.testing.assert_array_equal(cache.key[..., 5:], 0)
    positions = jnp.array([5, 7])  # where each row writes its next token
    rows = jnp.arange(B)
    cache = cache.write(key[rows, positions][:, None], value[rows, positions][:, None], positions)
    for b, p in enumerate(positions.tolist()):
        np.testing.assert_array_equal(cache.key[b, :, :, p], key[b, p])
        np.testing.assert_array_equal(cache.value[b, :, p], value[b, p])
    np.testing.assert_array_equal(cache.key[0, :, :, :6], jnp.moveaxis(key[0, :6], 0, -1))
    np.testing.assert_array_equal(cache.key[0, :, :, 6:], 0)
