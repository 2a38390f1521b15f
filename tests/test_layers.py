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


def test_quantize_rounds_each_value_to_within_half_a_step():
    x = inputs((B, T, K, H), seed=3)[0].at[0, 1, 0].set(0.0)  # a zero slice stores zeros
    values, scale = layers.quantize(x, axis=3)
    assert values.dtype == jnp.int8 and scale.shape == (B, T, K)
    np.testing.assert_allclose(scale, jnp.max(jnp.abs(x), axis=3) / 127, rtol=1e-6)
    error = jnp.abs(values * scale[..., None] - x)
    assert bool(jnp.all(error <= scale[..., None] / 2 * (1 + 1e-5)))
    assert int(jnp.max(jnp.abs(values))) == 127 and bool(jnp.all(values[0, 1, 0] == 0))


@pytest.mark.parametrize("kv_heads", [K, 1])
def test_int8_cached_attention_applies_its_scales(kv_heads):
    # The int8 cache's attention equals f32 attention over the dequantized cache (the scales are folded
    # into logits and probabilities, not multiplied into the cache), and is close to the f32 cache's.
    query, key, value = inputs((B, 1, N, H), (B, T, kv_heads, H), (B, T, kv_heads, H), seed=1)
    positions = jnp.array([3, T - 1])
    exact = layers.KVCache.of_sequence(key, value)
    cache = exact.stored_as(jnp.int8)
    assert cache.quantized and cache.key.dtype == cache.value.dtype == jnp.int8
    assert cache.key_scale.shape == cache.value_scale.shape == (B, kv_heads, T)
    dequantized = layers.KVCache(cache.key * cache.key_scale[:, :, None], cache.value * cache.value_scale[..., None])
    got = layers.cached_attention(query, cache, positions)
    np.testing.assert_allclose(got, layers.cached_attention(query, dequantized, positions), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, layers.cached_attention(query, exact, positions), atol=0.02)


def test_an_int8_cache_writes_and_pads_with_its_scales():
    key, value = inputs((B, T, K, H), (B, T, K, H))
    full = layers.KVCache.of_sequence(key, value).stored_as(jnp.int8)
    cache = layers.KVCache.of_sequence(key[:, :5], value[:, :5]).stored_as(jnp.int8).padded(T)
    assert cache.key_scale.shape == (B, K, T) and bool(jnp.all(cache.key_scale[..., 5:] == 0))
    positions = jnp.array([5, 7])
    rows = jnp.arange(B)
    cache = cache.write(key[rows, positions][:, None], value[rows, positions][:, None], positions)
    for b, p in enumerate(positions.tolist()):
        for name in ("key", "key_scale"):
            np.testing.assert_array_equal(getattr(cache, name)[b, ..., p], getattr(full, name)[b, ..., p])
        for name in ("value", "value_scale"):
            np.testing.assert_array_equal(getattr(cache, name)[b, :, p], getattr(full, name)[b, :, p])
    assert layers.KVCache.bytes_per_position(K, H, jnp.int8) == 2 * K * (H + 4)
    assert layers.KVCache.bytes_per_position(K, H, jnp.bfloat16) == 2 * K * H * 2


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


SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], np.int32)  # [B, T]


def plain_attention(query, key, value, window, segment_ids):
    """Every query head over its kv head's keys, with a mask written out position by position."""
    seen = np.zeros((B, T, T), bool)  # [B, T, S]
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                in_window = window is None or t - s < int(window)
                seen[b, t, s] = in_window and (segment_ids is None or segment_ids[b, t] == segment_ids[b, s])
    groups = query.shape[2] // key.shape[2]
    key, value = (jnp.repeat(a, groups, axis=2) for a in (key, value))  # [B, S, N, H]
    logits = jnp.einsum("BTNH,BSNH->BNTS", query, key) * query.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(seen[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, value)


@pytest.mark.parametrize("kind, window", [("mtl", None), ("mtl", "traced"), ("xla", 3), ("xla", "traced")])
def test_attention_within_segments_and_window_matches_plain_attention(kind, window):
    """Packed rows: each path (mtl's own, jax.nn.dot_product_attention's XLA one) against the plain mask."""
    query, key, value = inputs((B, T, N, H), (B, T, K, H), (B, T, K, H))
    w = jnp.int32(3) if window == "traced" else window  # a per-layer window picked inside a scan is traced
    if kind == "mtl":
        fast = lambda q, k, v: layers.causal_attention(q, k, v, w, 0.0, jnp.asarray(SEGMENTS))  # noqa: E731
    else:
        fast = lambda q, k, v: layers.fused_attention(q, k, v, w, 0.0, jnp.asarray(SEGMENTS), "xla")  # noqa: E731
    reference = lambda q, k, v: plain_attention(q, k, v, 3 if window else None, SEGMENTS)  # noqa: E731
    assert_same_value_and_grads(fast, reference, (query, key, value))


def test_fused_attention_without_segments_matches_causal_attention():
    query, key, value = inputs((B, T, N, H), (B, T, K, H), (B, T, K, H))
    np.testing.assert_allclose(
        layers.fused_attention(query, key, value, None, 0.0, None, "xla"),
        layers.causal_attention(query, key, value),
        rtol=1e-5,
        atol=1e-5,
    )


def test_attention_kind_picks_cudnn_only_on_a_gpu_in_half_precision():
    assert layers.attention_kind("auto", "bfloat16", 64, platform="gpu") == "cudnn"
    assert layers.attention_kind("auto", "float32", 64, platform="gpu") == "mtl"  # cuDNN's flash: 16-bit only
    assert layers.attention_kind("auto", "bfloat16", 64, platform="cpu") == "mtl"
    assert layers.attention_kind("xla", "float32", 64, platform="cpu") == "xla"
