"""Blockwise, vocabulary-parallel cross-entropy and embedding look-up: ``shard_map`` pieces.

Language-model logits are [B, T, V]: at Qwen's V = 151,936 and 8,192 tokens a
batch they are 5 GB of f32, and a plain loss holds them (and their gradient)
whole. :func:`cross_entropy` never does. It takes the hidden states and the
head and scans over blocks of tokens, each block's logits made, used and
dropped (Levanter's blockwise loss, MaxText's vocabulary tiling, Liger's fused
linear cross-entropy): the largest logits array alive is [block, V/t], a few
tens of MB. Because the loss is a weighted sum, the same pass also makes the
gradients of the hidden states and of the head, so nothing is recomputed.

Under tensor parallelism the head is split over the vocabulary, and each
device keeps its rows and its [block, V/t] logits; only per-token scalars
cross the ``tensor`` axis (Megatron-LM's vocab-parallel loss):

* the row maximum, through ``pmax``;
* the sum of ``exp(logit - max)``, through ``psum``;
* the label's logit, which exactly one vocabulary shard holds, through ``psum``.

The gradient is local too: ``softmax - one_hot`` on each block; the hidden
states' gradient is summed over ``tensor``, the head's over the batch axes.

The embedding look-up (:func:`embed`) is the same idea on the way in: each
device gathers the rows its vocabulary shard holds (zeros for the others) and
one ``psum`` over ``tensor`` completes every token's vector, where a one-hot
matmul would cost a [B, T, V] array and V multiply-adds a token, and a plain
gather on a vocabulary-split table would be left to the partitioner.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sharding.rules import logical_to_spec

_TENSOR = "tensor"
BLOCK_BYTES = 32 * 2**20  # one block's f32 logits: 32 MiB, about 55 tokens at V = 151,936


def cross_entropy(
    hidden: jax.Array, w_dv: jax.Array, labels: jax.Array, weights: jax.Array, *, block_bytes: int = BLOCK_BYTES
) -> tuple[jax.Array, jax.Array]:
    """The weighted next-token loss straight from hidden states, never holding [B, T, V] logits.

    Args:
      hidden: [B, T, D] final hidden states (any float dtype: the compute dtype).
      w_dv: [D, V] the language-model head, sharded by ``('embed', 'vocab')``;
        cast to ``hidden``'s dtype block by block, its gradient kept in its own dtype.
      labels: [B, T] integer ids in ``[0, V)``.
      weights: [B, T] each token's weight (a loss mask over the batch's total, say);
        no gradient flows into them.
      block_bytes: about how many bytes one block's f32 logits may take.

    Returns:
      ``(loss, hits)``, f32 scalars: ``sum(weights * -log softmax(logits)[label])``
      and ``sum(weights * [label's logit is the row's largest])`` (a tie is a hit),
      where ``logits = hidden @ w_dv`` with f32 accumulation.

    Inside ``jax.set_mesh`` it runs as a ``shard_map``: each device takes its rows
    and vocabulary block, and only per-token scalars cross ``tensor``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    b, t, d = hidden.shape
    if mesh.empty:
        specs = None
        v_local = w_dv.shape[1]
    else:
        rows = logical_to_spec(("batch", "length"), (b, t), mesh)
        vocab = logical_to_spec((None, "vocab"), w_dv.shape, mesh)[1]
        specs = (rows, vocab)
        v_local = w_dv.shape[1] // _size(mesh, vocab)
    block = _block_tokens(b * t, v_local, block_bytes)
    return _fused(block, specs, hidden, w_dv, labels, weights.astype(jnp.float32))


def _block_tokens(tokens: int, v_local: int, block_bytes: int) -> int:
    """Tokens a block: as many as ``block_bytes`` of f32 logits hold, a multiple of 8, at most all of them."""
    fit = max(8, block_bytes // (4 * v_local) // 8 * 8)
    return min(fit, -(-tokens // 8) * 8)


def _size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in names]))


def _axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(block, specs, hidden, w_dv, labels, weights):
    return _run(block, specs, hidden, w_dv, labels, weights, with_grads=False)[:2]


def _fused_fwd(block, specs, hidden, w_dv, labels, weights):
    # The loss is a weighted sum, so its gradients are known in the forward pass (Liger's fused linear
    # cross-entropy): one pass over the blocks makes the loss, d/dhidden and d/dw_dv together, and the
    # backward pass only scales them by the incoming cotangent. Called only under differentiation; a
    # plain call (evaluation) runs the loss alone.
    loss, hits, d_hidden, d_w = _run(block, specs, hidden, w_dv, labels, weights, with_grads=True)
    return (loss, hits), (d_hidden, d_w, weights)


def _fused_bwd(block, specs, residuals, cotangents):
    d_hidden, d_w, weights = residuals
    g = cotangents[0]  # the hit count is a metric: no gradient
    return (d_hidden * g.astype(d_hidden.dtype), d_w * g.astype(d_w.dtype), None, jnp.zeros_like(weights))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _run(block, specs, hidden, w_dv, labels, weights, *, with_grads):
    if specs is None:
        return _local(hidden, w_dv, labels, weights, block, None, (), with_grads)
    rows, vocab = specs
    mesh = jax.sharding.get_abstract_mesh()
    vocab_axes = _axes(vocab)
    batch_axes = _axes(rows[0]) + _axes(rows[1])
    row3 = PartitionSpec(rows[0], rows[1], None)
    w_spec = PartitionSpec(None, vocab)
    out_specs = (PartitionSpec(), PartitionSpec()) + ((row3, w_spec) if with_grads else ())
    return jax.shard_map(
        lambda h, w, y, c: _local(h, w, y, c, block, vocab_axes or None, batch_axes, with_grads),
        mesh=mesh,
        in_specs=(row3, w_spec, rows, rows),
        out_specs=out_specs,
    )(hidden, w_dv, labels, weights)


def _local(hidden, w_dv, labels, weights, block, vocab_axes, batch_axes, with_grads):
    """One device's rows [b, T] and vocabulary block [D, v]: the scan over token blocks."""
    b, t, d = hidden.shape
    v = w_dv.shape[1]
    n = b * t
    blocks = -(-n // block)
    pad = blocks * block - n
    # [b, T, D] -> [n, D] -> [blocks, block, D]; padding tokens weigh 0.
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(blocks, block, d)
    y = jnp.pad(labels.reshape(n), (0, pad)).reshape(blocks, block)
    c = jnp.pad(weights.reshape(n), (0, pad)).reshape(blocks, block)
    offset = 0
    if vocab_axes is not None:
        offset = jax.lax.axis_index(vocab_axes) * v
    w = w_dv.astype(hidden.dtype)
    columns = jnp.arange(v)

    def logits_of(h_i):
        return jnp.dot(h_i, w, preferred_element_type=jnp.float32)  # [block, v]

    def body(d_w, xs):
        h_i, y_i, c_i = xs
        logits = logits_of(h_i)
        top = jnp.max(logits, axis=-1)  # [block]
        if vocab_axes is not None:
            top = jax.lax.pmax(top, vocab_axes)
        exp = jnp.exp(logits - top[:, None])
        sum_exp = exp.sum(-1)
        local = y_i - offset
        is_label = columns[None, :] == local[:, None]  # [block, v]: at most one True a row, on one device
        label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
        if vocab_axes is not None:
            sum_exp = jax.lax.psum(sum_exp, vocab_axes)
            label_logit = jax.lax.psum(label_logit, vocab_axes)
        nll = jnp.log(sum_exp) + top - label_logit
        hit = (label_logit >= top).astype(jnp.float32)
        out = (jnp.sum(c_i * nll), jnp.sum(c_i * hit))
        if not with_grads:
            return d_w, out
        # d loss / d logits = weight * (softmax - one_hot), on this device's vocabulary block.
        g = (exp / sum_exp[:, None] - is_label) * c_i[:, None]  # [block, v] f32
        g = g.astype(hidden.dtype)
        d_h = jnp.dot(g, w.T, preferred_element_type=jnp.float32)  # [block, D]
        if vocab_axes is not None:
            d_h = jax.lax.psum(d_h, vocab_axes)
        d_w = d_w + jnp.dot(h_i.T, g, preferred_element_type=jnp.float32)  # [D, v]
        return d_w, (*out, d_h)

    d_w0 = None
    if with_grads:
        d_w0 = jnp.zeros((d, v), jnp.float32)
        varying = (vocab_axes or ()) + batch_axes  # the sum differs by device along these axes
        if varying:
            d_w0 = jax.lax.pcast(d_w0, varying, to="varying")
    d_w, outs = jax.lax.scan(body, d_w0, (h, y, c))
    loss, hits = outs[0].sum(), outs[1].sum()
    if batch_axes:
        loss, hits = jax.lax.psum(loss, batch_axes), jax.lax.psum(hits, batch_axes)
    if not with_grads:
        return loss, hits
    d_hidden = outs[2].reshape(blocks * block, d)[:n].reshape(b, t, d).astype(hidden.dtype)
    if batch_axes:
        d_w = jax.lax.psum(d_w, batch_axes)
    return loss, hits, d_hidden, d_w.astype(w_dv.dtype)


def embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """The rows of ``table`` at ``tokens``: [V, D] and [B, T] -> [B, T, D], a gather, not a one-hot matmul.

    Args:
      table: [V, D], sharded by the logical names ``('vocab', 'embed')``.
      tokens: [B, T] integer ids in ``[0, V)``.

    Inside ``jax.set_mesh`` with the vocabulary split over ``tensor`` it runs
    as a ``shard_map`` (the width is gathered first, as FSDP gathers every
    weight before use); elsewhere it is ``jnp.take``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jnp.take(table, tokens, axis=0)
    spec = logical_to_spec(("vocab", "embed"), table.shape, mesh)
    if spec[0] is None:
        return jnp.take(table, tokens, axis=0)
    rows = logical_to_spec(("batch", "length"), tokens.shape, mesh)
    return jax.shard_map(
        _local_embed,
        mesh=mesh,
        in_specs=(PartitionSpec(spec[0], None), rows),
        out_specs=PartitionSpec(rows[0], rows[1], None),
    )(table, tokens)


def _local_embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """One vocabulary block's rows at ``tokens`` ([v, D], [b, T] -> [b, T, D]), summed over the blocks."""
    block = table.shape[0]
    local = tokens - jax.lax.axis_index(_TENSOR) * block
    held = (local >= 0) & (local < block)
    rows = jnp.take(table, jnp.clip(local, 0, block - 1), axis=0)
    return jax.lax.psum(jnp.where(held[..., None], rows, jnp.zeros((), table.dtype)), _TENSOR)
