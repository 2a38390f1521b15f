"""The backbone and heads: shapes, attention against a naive reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl.layers import Attention, rope
from mtl.model import MultiTaskModel
from tests.helpers import tiny_model_config


def naive_attention(x, attn: Attention, positions, theta):
    """Causal GQA written out with numpy: repeat kv heads, mask, softmax."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (
        np.asarray(w[...], np.float64) for w in (attn.w_dnh, attn.w_dkh_key, attn.w_dkh_value, attn.w_nhd)
    )
    q = np.einsum("btd,dnh->btnh", x, wq)
    k = np.einsum("btd,dkh->btkh", x, wk)
    v = np.einsum("btd,dkh->btkh", x, wv)
    q = np.asarray(rope(jnp.asarray(q, jnp.float32), positions, theta), np.float64)
    k = np.asarray(rope(jnp.asarray(k, jnp.float32), positions, theta), np.float64)
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = x.shape[1]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", weights, v)
    return np.einsum("btnh,nhd->btd", out, wo)


def test_attention_matches_naive_reference():
    cfg = tiny_model_config()
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out, cache = attn(x, positions)
    expected = naive_attention(x, attn, positions, cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    assert cache.key.shape == (2, cfg.n_kv_heads, cfg.head_dim, 9)
    assert cache.value.shape == (2, cfg.n_kv_heads, 9, cfg.head_dim)


def test_attention_over_its_cache_matches_naive_reference():
    # The decode branch: the first 8 tokens prefilled into a cache of 12, then the 9th token alone.
    cfg = tiny_model_config()
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    _, cache = attn(x[:, :8], positions[:, :8])
    out, cache = attn(x[:, 8:], positions[:, 8:], cache.padded(12))
    expected = naive_attention(x, attn, positions, cfg.rope_theta)[:, 8:]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    _, whole = attn(x, positions)
    np.testing.assert_allclose(cache.key[..., :9], whole.key, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.value[:, :, 9:], 0)


def test_rope_preserves_norm_and_is_relative():
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    rotated = rope(x, pos, 10_000.0)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # The dot product of two rotated vectors depends only on their distance.
    q, k = x[:, :1], x[:, 1:2]
    a = (rope(q, jnp.array([[3]]), 1e4) * rope(k, jnp.array([[1]]), 1e4)).sum()
    b = (rope(q, jnp.array([[7]]), 1e4) * rope(k, jnp.array([[5]]), 1e4)).sum()
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_model_shapes():
    cfg = tiny_model_config()
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.ones((3, 11), jnp.int32)
    hidden = model(tokens, jnp.array([0, 1, 2]))
    assert hidden.shape == (3, 11, cfg.d_model)
    assert model.lm_logits(hidden).shape == (3, 11, cfg.vocab_size)
    assert model.classify_logits("lang", hidden, jnp.array([11, 3, 1])).shape == (3, 5)
    assert set(model.heads) == {"lang"}


def test_task_embedding_changes_the_output():
    cfg = tiny_model_config()
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(1, 9)[None]
    a = model(tokens, jnp.array([0]))
    b = model(tokens, jnp.array([2]))
    assert not np.allclose(a, b, atol=1e-3)


def test_classifier_reads_the_last_real_position():
    cfg = tiny_model_config()
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 7, 8, 3, 0, 0], [1, 7, 8, 3, 9, 9]])
    hidden = model(tokens, jnp.array([1, 1]))
    logits = model.classify_logits("lang", hidden, jnp.array([4, 4]))
    # Causal attention: what follows position 3 cannot change its logits.
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_tied_or_not(tied):
    # Logits against numpy from the hidden states and the head's weights: the embedding's
    # transpose when tied, the model's own [D, V] matrix when not.
    cfg = tiny_model_config(tie_embeddings=tied)
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    assert hasattr(model, "w_dv") is (not tied)
    hidden = model(jnp.array([[1, 40, 41, 3]]), jnp.array([0]))
    embed_vd = np.asarray(model.embed_vd[...], np.float64)
    w_dv = embed_vd.T if tied else np.asarray(model.w_dv[...], np.float64)
    expected = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), w_dv)
    logits = model.lm_logits(hidden)
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, cfg.vocab_size)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    if not tied:  # the untied head is not the embedding
        assert not np.allclose(expected, np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), embed_vd))
    # The head laid out once (as serving keeps it) gives the same logits.
    np.testing.assert_array_equal(model.lm_logits(hidden, model.lm_head()), logits)
