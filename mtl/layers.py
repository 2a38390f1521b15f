"""The backbone's layers: RMSNorm, rotary positions, grouped-query attention with its KV cache, the gated MLP.

Every parameter carries logical axis names in its ``logical_axes`` metadata;
``sharding.RULES`` turns them into mesh axes. Key activations are constrained
by logical names too (``mtl.act_btd`` and its kin), which is a no-op outside a
mesh. Attention runs over a whole sequence (training, prefill) or, one token a
row, over the model's one cache layout (:class:`KVCache`, decoding).

The pretrained families are options of these layers (``ModelConfig``'s
architecture fields): query/key/value biases, RMSNorm on query and key heads,
Gemma's (1 + w) norms and norms around attention and MLP, a GELU gate, rotary
scaling, and local sliding-window layers interleaved with global ones, each
with its rotary base. Every option's default is mtl's own backbone.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from mtl import act_btd, act_btf, act_btkh, act_btnh, adapters, cache_bkhs, cache_bks, cache_bksh
from mtl.config import ModelConfig
from sharding import constrain

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    """A parameter created with logical axis names, unsharded until the caller places it.

    The names live in our own ``logical_axes`` metadata rather than Flax's
    ``out_sharding``, which Flax reads as mesh axes whenever a mesh is set.
    """
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def contract(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` computed as one 2-D matmul.

    The spec must contract the trailing axes of ``x`` with the leading axes of
    ``w`` and keep the rest in order (``'BTD,DNH->BTNH'``, ``'BTNH,NHD->BTD'``).
    Flattened this way the backward pass runs about twice as fast on XLA:CPU,
    which lowers many-axis dot products to slower loops; on accelerators it
    changes nothing. Sharding survives the reshapes: only major axes merge.
    """
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n = sum(axis in w_axes for axis in x_axes)
    if x_axes[len(x_axes) - n :] != w_axes[:n] or out != x_axes[: len(x_axes) - n] + w_axes[n:]:
        raise ValueError(f"contract({spec!r}) needs x's trailing axes contracted with w's leading ones")
    lead, free = x.shape[: x.ndim - n], w.shape[n:]
    inner = math.prod(w.shape[:n])
    y = x.reshape(-1, inner) @ w.reshape(inner, -1)
    return y.reshape(*lead, *free)


def normal(stddev: float):
    return jax.nn.initializers.normal(stddev)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, times ``offset + scale`` (Gemma's norms: offset 1, scale starting at 0)."""

    def __init__(self, dim: int, eps: float, param_dtype, offset: float = 0.0, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.ones if offset == 0 else jax.nn.initializers.constant(1.0 - offset)
        self.scale = param(rngs, init, (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in f32 whatever the compute dtype: the mean of squares
        # loses too much in bf16.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (y * (scale + self.offset if self.offset else scale)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary positions (rotate-half form). x: [B, T, N, H]; positions: [B, T]."""
    return rotate(x, *rope_angles(positions, inverse_frequencies(x.shape[-1], theta), x.dtype))


def inverse_frequencies(head_dim: int, theta: float, scaling: str = "") -> np.ndarray:
    """The rotary angle per position of each pair of a head's dimensions: f32 [H/2].

    ``scaling`` (``ModelConfig.rope_scaling``) stretches the angles as
    transformers does: ``linear:F`` divides every frequency by F; Llama 3's
    ``llama3:F,LOW,HIGH,ORIGINAL_LEN`` divides the low frequencies by F, keeps
    the high ones and blends those between.
    """
    half = head_dim // 2
    inv_freq = (1.0 / theta ** (np.arange(half, dtype=np.float32) / np.float32(half))).astype(np.float32)
    kind, _, numbers = scaling.partition(":")
    if kind == "linear":
        return (inv_freq / np.float32(numbers)).astype(np.float32)
    if kind == "llama3":
        factor, low, high, original = (float(v) for v in numbers.split(","))
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rope_angles(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The sine and cosine of every position's rotary angles: [B, T] and [H/2] -> two [B, T, 1, H/2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    # Computed once here, not inside every consumer: XLA would otherwise fuse
    # sin and cos into each rotation and evaluate them once per head.
    sin, cos = jax.lax.optimization_barrier((jnp.sin(angles), jnp.cos(angles)))
    return sin[:, :, None, :].astype(dtype), cos[:, :, None, :].astype(dtype)


@jax.custom_vjp
def rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the halves of x's last axis by the angles of ``sin`` and ``cos``.

    A rotation's gradient is the rotation back, one fused pass; autodiff of
    the concatenation would split, negate and add the halves in several.
    Positions are not differentiated.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_forward(x, sin, cos):
    return rotate(x, sin, cos), (sin, cos)


def _rotate_backward(saved, d_out):
    sin, cos = saved
    return rotate(d_out, -sin, cos), None, None


rotate.defvjp(_rotate_forward, _rotate_backward)


def _query_rows(x: jax.Array, k: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, M, H]: each kv head's G query heads as rows, row m at position m // G."""
    return rearrange(x, "B T (K G) H -> B K (T G) H", K=k)


def _from_query_rows(x: jax.Array, t: int) -> jax.Array:
    """[B, K, M, H] -> [B, T, N, H], the inverse of ``_query_rows``."""
    return rearrange(x, "B K (T G) H -> B T (K G) H", T=t)


def _attention_forward(query, key, value, window, segment_ids, scale):
    t = query.shape[1]
    rows_q = _query_rows(query, key.shape[2])  # [B, K, M, H], M = T*G
    key_t, value_t = (rearrange(a, "B S K H -> B K S H") for a in (key, value))
    logits = jnp.einsum("BKMH,BKSH->BKMS", rows_q, key_t, preferred_element_type=jnp.float32) * scale
    row_position = jnp.arange(rows_q.shape[2]) // (rows_q.shape[2] // t)  # [M]: the query position of each row
    seen = attention_mask(row_position, jnp.arange(key.shape[1]), window, segment_ids, segment_ids)  # [(B,) M, S]
    if seen.ndim == 3:
        seen = seen[:, None]  # [B, 1, M, S]
    probs = jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1).astype(value.dtype)  # [B, K, M, S]
    rows_out = jnp.einsum("BKMS,BKSH->BKMH", probs, value_t)
    return _from_query_rows(rows_out, t), (rows_q, key_t, value_t, probs, rows_out)


def attention_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    window: jax.Array | int | None = None,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
) -> jax.Array:
    """Which keys each query sees: causal, within ``window``, and in its own segment.

    Args:
      query_positions: [M] indices in the row of the queries (any repeated rows of a kv head's query heads).
      key_positions: [S] indices in the row of the keys.
      window: a local layer's sliding window (keys up to and including the query's own); None: all.
      query_segments, key_segments: [B, T] and [B, S] segment ids of a packed row (its examples
        1, 2, ..., padding 0); None: one sequence a row. The query side is given per position and
        repeated here to the M query rows.

    Returns:
      bool [M, S], or [B, M, S] with segments. Within a segment, index distances are position
      distances, so the window needs no segment-relative positions.
    """
    distance = query_positions[:, None] - key_positions[None, :]  # [M, S]
    seen = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    if query_segments is None:
        return seen
    rows = query_segments[:, query_positions]  # [B, M]: each query row's segment
    return seen & (rows[:, :, None] == key_segments[:, None, :])  # [B, M, S]


def causal_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    window: jax.Array | int | None = None,
    scale: float = 0.0,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal grouped-query attention: [B, T, N, H] queries over [B, T, K, H] keys and values.

    Computes what ``jax.nn.dot_product_attention(..., is_causal=True)`` does
    (query head n reads kv head n // G, logits and softmax in f32) in about
    two thirds of its time, forward and backward, on XLA:CPU: each kv head's G query
    heads are stacked as the rows of one [T*G, S] score matrix a (batch, kv
    head), so every product is a plain batched matmul and no score-sized
    tensor is transposed; the backward pass is written out to keep it so.

    Args:
      query, key, value: as above.
      window: a local layer's sliding window: a query sees the ``window`` keys
        up to and including its own position (a banded mask); None: all of them.
      scale: the logits' scale; 0: ``H ** -0.5``.
      segment_ids: [B, T] int, a packed row's example of each token (1, 2, ...;
        padding 0): a query sees only keys of its own segment. None: one
        sequence a row.
    """
    return _causal_attention(query, key, value, window, segment_ids, scale or query.shape[-1] ** -0.5)


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    window: jax.Array | int | None = None,
    scale: float = 0.0,
    segment_ids: jax.Array | None = None,
    kind: str | None = None,
) -> jax.Array:
    """What :func:`causal_attention` computes, through ``jax.nn.dot_product_attention``.

    ``kind='cudnn'`` is cuDNN's fused flash attention on a GPU
    (bfloat16 or float16 only); ``'xla'`` (or None) is XLA's own, which runs
    anywhere and is what tests compare on the CPU. A plain causal mask is
    passed as ``is_causal`` and a constant window as ``local_window_size``,
    which cuDNN computes without a mask tensor; segments (and a window that
    is a traced per-layer value) go in as a boolean [B, 1, T, S] mask, which
    cuDNN reads as a bias.
    """
    t, s = query.shape[1], key.shape[1]
    scale = scale or query.shape[-1] ** -0.5
    static_window = window is None or isinstance(window, int)
    mask = None
    if segment_ids is not None or not static_window:
        mask = attention_mask(jnp.arange(t), jnp.arange(s), None if static_window else window, segment_ids, segment_ids)
        mask = mask[:, None] if mask.ndim == 3 else mask[None, None]  # [B or 1, 1, T, S]
    local = (window - 1, 0) if static_window and window is not None else None
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, is_causal=True, local_window_size=local, implementation=kind
    )


def attention_kind(setting: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The attention a model runs, ``ModelConfig.attention`` resolved on this platform.

    ``auto`` is cuDNN's flash attention on a GPU where it applies (bfloat16 or
    float16, head size a multiple of 8 up to 128), else mtl's own
    :func:`causal_attention`, which measures fastest on XLA:CPU
    (docs/training_bench.md). TPUs keep mtl's own as well: a splash-attention
    kernel is not wired in yet.
    """
    if setting != "auto":
        return setting
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0:
        return "cudnn" if head_dim <= 128 else "mtl"
    return "mtl"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal_attention(query, key, value, window, segment_ids, scale):
    return _attention_forward(query, key, value, window, segment_ids, scale)[0]


def _attention_backward(scale, saved, d_out):
    rows_q, key_t, value_t, probs, rows_out = saved
    t = d_out.shape[1]
    d_rows = _query_rows(d_out, key_t.shape[1])  # [B, K, M, H]
    # Softmax backward: dL = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O),
    # a reduction over H instead of over the scores. The logits' scale is folded in here.
    delta = jnp.sum(d_rows.astype(jnp.float32) * rows_out.astype(jnp.float32), axis=-1, keepdims=True)
    d_probs = jnp.einsum("BKMH,BKSH->BKMS", d_rows, value_t, preferred_element_type=jnp.float32)
    d_logits = (probs.astype(jnp.float32) * (d_probs - delta) * scale).astype(probs.dtype)  # [B, K, M, S]
    # Key and value gradients as [B, K, H, S]: their products over M then take both operands untransposed.
    d_value = jnp.einsum("BKHM,BKMS->BKHS", rearrange(d_rows, "B K M H -> B K H M"), probs)
    d_key = jnp.einsum("BKHM,BKMS->BKHS", rearrange(rows_q, "B K M H -> B K H M"), d_logits)
    d_query = jnp.einsum("BKMS,BKSH->BKMH", d_logits, key_t)
    d_key, d_value = (rearrange(a, "B K H S -> B S K H") for a in (d_key, d_value))
    return _from_query_rows(d_query, t), d_key, d_value, None, None  # window and segments are not differentiated


_causal_attention.defvjp(_attention_forward, _attention_backward)


def quantize(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """int8 values and their f32 scales, abs-max over ``axis`` (MaxText's KVQuant): ``x ~ values * scale``.

    The scale is each slice's largest magnitude over 127 (a zero slice gets 0
    and stores zeros), so every value rounds to within half a scale step.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127
    values = jnp.round(x / jnp.where(scale > 0, scale, 1)).clip(-127, 127).astype(jnp.int8)
    return values, jnp.squeeze(scale, axis)


class KVCache(NamedTuple):
    """One layer's keys and values, the model's one cache layout: keys [B, K, H, S], values [B, K, S, H].

    Laid out so that both products of :func:`cached_attention` read the cache
    in place, each summing over its middle axis: a step transposes nothing of
    the cache (``docs/serving.md`` measures the layouts on XLA:CPU).

    A float cache holds the values themselves. An int8 cache holds them
    quantized with one f32 scale a position and kv head (abs-max over H,
    :func:`quantize`): 2 (H + 4) bytes a position and kv head against 4 H for
    bfloat16; attention applies the scales to its logits and probabilities,
    never dequantizing the cache.
    """

    key: jax.Array
    value: jax.Array
    key_scale: jax.Array | None = None  # [B, K, S] an int8 cache's scales, else None
    value_scale: jax.Array | None = None  # [B, K, S]

    @classmethod
    def zeros(cls, rows: int, kv_heads: int, head_dim: int, length: int, dtype, zeros=jnp.zeros) -> KVCache:
        """An empty cache of ``rows`` rows and ``length`` positions stored as ``dtype`` (a float dtype
        or int8, ``config.KV_DTYPES``; ``zeros=np.zeros`` builds it on the host)."""
        dtype = jnp.dtype(dtype)
        key, value = zeros((rows, kv_heads, head_dim, length), dtype), zeros((rows, kv_heads, length, head_dim), dtype)
        if dtype != jnp.int8:
            return cls(key, value)
        return cls(key, value, zeros((rows, kv_heads, length), np.float32), zeros((rows, kv_heads, length), np.float32))

    @staticmethod
    def bytes_per_position(kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one position of one row takes in one layer's cache stored as ``dtype``."""
        dtype = jnp.dtype(dtype)
        scales = 2 * kv_heads * 4 if dtype == jnp.int8 else 0
        return 2 * kv_heads * head_dim * dtype.itemsize + scales

    @classmethod
    def of_sequence(cls, key: jax.Array, value: jax.Array) -> KVCache:
        """The cache of a sequence's [B, T, K, H] keys and values, at positions 0 to T-1 (in their dtype)."""
        return cls(
            constrain(rearrange(key, "B T K H -> B K H T"), cache_bkhs),
            constrain(rearrange(value, "B T K H -> B K T H"), cache_bksh),
        )

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def stored_as(self, dtype) -> KVCache:
        """This (float) cache stored as ``dtype``: cast, or quantized to int8 with its scales."""
        dtype = jnp.dtype(dtype)
        if dtype != jnp.int8:
            return KVCache(self.key.astype(dtype), self.value.astype(dtype))
        key, key_scale = quantize(self.key, axis=2)  # [B, K, H, S] over H
        value, value_scale = quantize(self.value, axis=3)  # [B, K, S, H] over H
        return KVCache(key, value, constrain(key_scale, cache_bks), constrain(value_scale, cache_bks))

    def padded(self, length: int) -> KVCache:
        """The same cache with room for ``length`` positions (zeros after the filled ones)."""
        pad = (0, length - self.key.shape[-1])
        scales = [None if s is None else constrain(jnp.pad(s, ((0, 0), (0, 0), pad)), cache_bks) for s in self[2:]]
        return KVCache(
            constrain(jnp.pad(self.key, ((0, 0), (0, 0), (0, 0), pad)), cache_bkhs),
            constrain(jnp.pad(self.value, ((0, 0), (0, 0), pad, (0, 0))), cache_bksh),
            *scales,
        )

    def write(self, key: jax.Array, value: jax.Array, positions: jax.Array) -> KVCache:
        """Writes one token a row: its [B, 1, K, H] key and value at ``positions`` [B]."""
        rows = jnp.arange(key.shape[0])
        key, value = key[:, 0], value[:, 0]  # [B, K, H]
        scales = self[2:]
        if self.quantized:
            (key, key_scale), (value, value_scale) = quantize(key, axis=2), quantize(value, axis=2)  # scales [B, K]
            scales = (
                constrain(self.key_scale.at[rows, :, positions].set(key_scale), cache_bks),
                constrain(self.value_scale.at[rows, :, positions].set(value_scale), cache_bks),
            )
        return KVCache(
            constrain(self.key.at[rows, :, :, positions].set(key.astype(self.key.dtype)), cache_bkhs),
            constrain(self.value.at[rows, :, positions].set(value.astype(self.value.dtype)), cache_bksh),
            *scales,
        )

    def prefix(self, length: int) -> KVCache:
        """Positions 0 to ``length`` - 1 (a copy): what a decode step over shorter rows reads."""
        scales = (None if s is None else s[..., :length] for s in self[2:])  # [B, K, S]
        return KVCache(self.key[..., :length], self.value[:, :, :length], *scales)

    def with_prefix(self, part: KVCache) -> KVCache:
        """This cache with its first positions replaced by ``part`` (of :meth:`prefix`'s shape)."""
        n = part.key.shape[-1]
        return KVCache(
            constrain(self.key.at[..., :n].set(part.key), cache_bkhs),
            constrain(self.value.at[:, :, :n].set(part.value), cache_bksh),
            *(None if s is None else constrain(s.at[..., :n].set(p), cache_bks) for s, p in zip(self[2:], part[2:])),
        )


def cached_attention(
    query: jax.Array, cache: KVCache, positions: jax.Array, window: jax.Array | int | None = None, scale: float = 0.0
) -> jax.Array:
    """One query token a row over a KV cache: [B, 1, N, H] queries; row b attends to positions 0 to ``positions[b]``.

    A local layer's ``window`` keeps only the last ``window`` of those
    positions, as :func:`causal_attention` does; ``scale`` 0 is ``H ** -0.5``.

    Query head n reads kv head n // G, as in ``jax.nn.dot_product_attention``,
    with logits and softmax in f32 and masked logits a large negative number.
    Both products are broadcast multiplies summed over the cache's middle axis
    (keys over H, values over S), not batched matmuls: with only G query rows a
    (row, kv head), a matmul costs per product, while XLA:CPU sums these in one
    vectorised pass over the cache (3x faster with the engine's reductions).
    An int8 cache's key scales multiply the logits, its value scales the
    probabilities: [B, K, S] each, far fewer than the cache's values.
    """
    f32 = jnp.float32
    h, s = cache.key.shape[2:]
    rows = _query_rows(query, cache.key.shape[1]).astype(f32)  # [B, K, M, H], M = G: one token a row
    logits = jnp.sum(rows[..., None] * cache.key.astype(f32)[:, :, None], axis=3)  # [B, K, M, S]
    if cache.quantized:
        logits = logits * cache.key_scale[:, :, None, :]
    logits = logits * f32(scale or h**-0.5)
    distance = positions[:, None] - jnp.arange(s)  # [B, S]
    seen = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    logits = jnp.where(seen[:, None, None, :], logits, -0.7 * jnp.finfo(f32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    if cache.quantized:
        probs = probs * cache.value_scale[:, :, None, :]
    out = jnp.sum(probs[..., None] * cache.value.astype(f32)[:, :, None], axis=3)  # [B, K, M, H]
    return _from_query_rows(out.astype(query.dtype), 1)  # [B, 1, N, H]


class Attention(nnx.Module):
    """Grouped-query self-attention: ``causal_attention`` over a sequence, ``cached_attention`` while decoding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.w_dnh = param(rngs, normal(d**-0.5), (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.w_dkh_key = param(rngs, normal(d**-0.5), (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.w_dkh_value = param(rngs, normal(d**-0.5), (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        # Residual branches start small so a deep stack begins near identity.
        out_std = (n * h) ** -0.5 / (2 * cfg.n_layers) ** 0.5
        self.w_nhd = param(rngs, normal(out_std), (n, h, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            zeros = jax.nn.initializers.zeros
            self.b_nh = param(rngs, zeros, (n, h), ("heads", "head_dim"), pd)
            self.b_kh_key = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
            self.b_kh_value = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.query_norm = RMSNorm(h, cfg.norm_eps, pd, cfg.norm_offset, rngs=rngs)
            self.key_norm = RMSNorm(h, cfg.norm_eps, pd, cfg.norm_offset, rngs=rngs)
        # Static settings, as tuples (a module's plain attributes are hashed with its graph).
        self.inv_freq = tuple(inverse_frequencies(h, cfg.rope_theta, cfg.rope_scaling).tolist())
        self.local_inv_freq = tuple(inverse_frequencies(h, cfg.rope_local_theta or cfg.rope_theta).tolist())
        self.local_layers = tuple(t == "L" for t in cfg.layer_types)  # empty: every layer global
        self.window = cfg.sliding_window
        self.scale = cfg.attn_scale or h**-0.5
        self.dtype = jnp.dtype(cfg.dtype)
        qkv_out = {"q": (n * h, "heads"), "k": (k * h, "kv_heads"), "v": (k * h, "kv_heads")}
        shapes = {name: (d, o, "embed", axis) for name, (o, axis) in qkv_out.items()}
        adapters.attach(self, cfg, rngs, {**shapes, "o": (n * h, d, "heads", "embed")})
        self.kind = attention_kind(cfg.attention, cfg.dtype, h)  # resolved once, on the platform that builds it

    def layer_settings(self, layer: jax.Array | int | None) -> tuple[jax.Array, jax.Array | int | None]:
        """This layer's rotary frequencies [H/2] and sliding window (None: global), by its index in the stack.

        Local and global layers differ only in these two, so a scan over the
        stacked layers picks them by its (traced) index; a stack of one kind
        needs no index.
        """
        global_freq = jnp.asarray(self.inv_freq, jnp.float32)
        if not any(self.local_layers):
            return global_freq, None
        local_freq = jnp.asarray(self.local_inv_freq, jnp.float32)
        if all(self.local_layers):
            return local_freq, self.window
        if layer is None:
            raise ValueError("a stack of local and global layers needs each layer's index")
        if isinstance(layer, int):
            return (local_freq, self.window) if self.local_layers[layer] else (global_freq, None)
        local = jnp.asarray(self.local_layers)[layer]
        return jnp.where(local, local_freq, global_freq), jnp.where(local, self.window, jnp.iinfo(jnp.int32).max)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        layer: jax.Array | int | None = None,
        task_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Attends causally over the sequence, or, decoding, over a cache.

        Args:
          x: [B, T, D] activations.
          positions: [B, T] absolute positions of the tokens in ``x``.
          cache: while decoding one token a row (T == 1), this layer's cache;
            the row's key and value are written at ``positions[:, 0]`` and it
            attends to the cache's positions up to that one.
          layer: this layer's index in the stack; needed only where local and
            global layers are interleaved.
          task_ids: [B] each row's task; needed only with adapters (``mtl.adapters``).
          segment_ids: [B, T] a packed row's example of each token (training;
            see ``tasks.packing``): attention stays within each segment.

        Returns:
          The [B, T, D] output and a KVCache: of ``x``'s T tokens without a
          cache (what a prefill keeps; training drops it), else the updated cache.
        """
        dt = self.dtype
        query = contract("BTD,DNH->BTNH", x, self.w_dnh[...].astype(dt))
        key = contract("BTD,DKH->BTKH", x, self.w_dkh_key[...].astype(dt))
        value = contract("BTD,DKH->BTKH", x, self.w_dkh_value[...].astype(dt))
        query = adapters.apply(self, "q", x, query, task_ids)
        key = adapters.apply(self, "k", x, key, task_ids)
        value = adapters.apply(self, "v", x, value, task_ids)
        if hasattr(self, "b_nh"):
            query = query + self.b_nh[...].astype(dt)
            key = key + self.b_kh_key[...].astype(dt)
            value = value + self.b_kh_value[...].astype(dt)
        if hasattr(self, "query_norm"):
            query, key = self.query_norm(query), self.key_norm(key)
        inv_freq, window = self.layer_settings(layer)
        sin, cos = rope_angles(positions, inv_freq, dt)
        query = constrain(rotate(query, sin, cos), act_btnh)
        key = constrain(rotate(key, sin, cos), act_btkh)
        value = constrain(value, act_btkh)

        if cache is None:
            if self.kind == "mtl":
                out = causal_attention(query, key, value, window, self.scale, segment_ids)
            else:
                out = fused_attention(query, key, value, window, self.scale, segment_ids, self.kind)
            cache = KVCache.of_sequence(key, value)
        else:
            cache = cache.write(key, value, positions[:, 0])
            out = cached_attention(query, cache, positions[:, 0], window, self.scale)
        out = constrain(out, act_btnh)
        projected = contract("BTNH,NHD->BTD", out, self.w_nhd[...].astype(dt))
        return adapters.apply(self, "o", out, projected, task_ids), cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``, whose backward pass recomputes the sigmoid in one fused pass.

    Autodiff would keep sigmoid(gate) and silu(gate) as extra [B, T, F]
    tensors and read them back in separate passes; on XLA:CPU these
    memory-bound passes cost more than recomputing one exponential.
    """
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(saved, d_hidden):
    gate, up = saved
    sig = jax.nn.sigmoid(gate)
    d_gate = d_hidden * up * sig * (1 + gate * (1 - sig))  # d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))
    return d_gate, d_hidden * gate * sig


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class MLP(nnx.Module):
    """Gated feed-forward: (act(x W_gate) * x W_up) W_down; act is silu (SwiGLU) or tanh-approximated GELU (Gemma)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.w_df_gate = param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        self.w_df_up = param(rngs, normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        self.w_fd = param(rngs, normal(f**-0.5 / (2 * cfg.n_layers) ** 0.5), (f, d), ("mlp", "embed"), pd)
        self.activation = cfg.mlp_activation
        self.dtype = jnp.dtype(cfg.dtype)
        shapes = {"gate": (d, f, "embed", "mlp"), "up": (d, f, "embed", "mlp"), "down": (f, d, "mlp", "embed")}
        adapters.attach(self, cfg, rngs, shapes)

    def __call__(self, x: jax.Array, task_ids: jax.Array | None = None) -> jax.Array:
        """[B, T, D] -> [B, T, D]; ``task_ids`` [B] picks each row's adapters, where there are any."""
        dt = self.dtype
        gate = contract("BTD,DF->BTF", x, self.w_df_gate[...].astype(dt))
        up = contract("BTD,DF->BTF", x, self.w_df_up[...].astype(dt))
        gate = adapters.apply(self, "gate", x, gate, task_ids)
        up = adapters.apply(self, "up", x, up, task_ids)
        gated = swiglu(gate, up) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True) * up
        hidden = constrain(gated, act_btf)
        down = contract("BTF,FD->BTD", hidden, self.w_fd[...].astype(dt))
        return adapters.apply(self, "down", hidden, down, task_ids)


class Block(nnx.Module):
    """A pre-norm Transformer layer; with ``sandwich_norms`` (Gemma 3) the attention and MLP outputs are normed too."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, pd, cfg.norm_offset, rngs=rngs)  # noqa: E731
        self.attention_norm = norm()
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.sandwich_norms:
            self.post_attention_norm = norm()
            self.post_mlp_norm = norm()

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        layer: jax.Array | int | None = None,
        task_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """[B, T, D] -> [B, T, D], and this layer's KVCache (see ``Attention.__call__``)."""
        attended, cache = self.attention(
            self.attention_norm(x), positions, cache, layer, task_ids, segment_ids=segment_ids
        )
        if hasattr(self, "post_attention_norm"):
            attended = self.post_attention_norm(attended)
        x = constrain(x + attended, act_btd)
        mixed = self.mlp(self.mlp_norm(x), task_ids)
        if hasattr(self, "post_mlp_norm"):
            mixed = self.post_mlp_norm(mixed)
        x = constrain(x + mixed, act_btd)
        return x, cache
