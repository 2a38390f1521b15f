"""Vocabulary-parallel cross-entropy and embedding look-up: ``shard_map`` pieces.

Language-model logits are [B, T, V] and, under tensor parallelism, split over
the vocabulary. Left to the automatic partitioner, the label look-up of a
plain cross-entropy (a gather along the split axis) all-gathers the whole
logits array onto every device. Here each device keeps its [B/d, T, V/t]
block and only per-token scalars cross the ``tensor`` axis (Megatron-LM's
vocab-parallel loss):

* the row maximum, through ``pmax``;
* the sum of ``exp(logit - max)``, through ``psum``;
* the label's logit, which exactly one vocabulary shard holds, through ``psum``.

The backward pass is local too: ``softmax - one_hot`` on each block.

The embedding look-up (:func:`embed`) is the same idea on the way in: each
device gathers the rows its vocabulary shard holds (zeros for the others) and
one ``psum`` over ``tensor`` completes every token's vector, where a one-hot
matmul would cost a [B, T, V] array and V multiply-adds a token, and a plain
gather on a vocabulary-split table would be left to the partitioner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sharding.rules import logical_to_spec

_TENSOR = "tensor"


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood, and whether the label is the arg max.

    Args:
      logits: [B, T, V], sharded by the logical names ``('batch', 'length', 'vocab')``.
      labels: [B, T] integer ids in ``[0, V)``.

    Returns:
      ``(nll, top)``, both [B, T] f32: ``-log softmax(logits)[label]``, and 1
      where the label's logit is the row's largest (a tie counts as a hit).

    Inside ``jax.set_mesh`` with the vocabulary split over ``tensor`` it runs
    as a ``shard_map``; elsewhere the same arithmetic runs unsharded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local(logits.astype(jnp.float32), labels, None)
    spec = logical_to_spec(("batch", "length", "vocab"), logits.shape, mesh)
    if spec[2] is None:  # the vocabulary is whole on every device: nothing to save
        return _local(logits.astype(jnp.float32), labels, None)
    row_spec = PartitionSpec(spec[0], spec[1])
    return jax.shard_map(
        lambda x, y: _local(x.astype(jnp.float32), y, _TENSOR),
        mesh=mesh,
        in_specs=(spec, row_spec),
        out_specs=(row_spec, row_spec),
    )(logits, labels)


def _local(logits: jax.Array, labels: jax.Array, axis: str | None) -> tuple[jax.Array, jax.Array]:
    """The loss on one [b, T, v] vocabulary block; ``axis`` names the mesh axis that splits V."""
    block = logits.shape[-1]
    offset = 0 if axis is None else jax.lax.axis_index(axis) * block
    # The max only shifts the exponent; its gradient cancels, so none flows through it.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    if axis is not None:
        top = jax.lax.pmax(top, axis)
    sum_exp = jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)
    local = labels - offset
    held = (local >= 0) & (local < block)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, block - 1)[..., None], axis=-1)[..., 0]
    label_logit = jnp.where(held, picked, 0.0)
    if axis is not None:
        sum_exp = jax.lax.psum(sum_exp, axis)
        label_logit = jax.lax.psum(label_logit, axis)
    nll = jnp.log(sum_exp) + top - label_logit
    return nll, (label_logit >= top).astype(jnp.float32)


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
