"""Prefill, the decode step over a KV cache, and per-row sampling.

These are pure functions of (model, arrays); :mod:`mtl.engine` jits them once
per shape and drives them. Every row carries its own task, position, sampling
parameters and seed, so requests of different tasks and settings share one
batch without recompiling, and a row's tokens do not depend on its neighbours.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl.layers import KVCache
from mtl.model import MultiTaskModel
from sharding import constrain

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class Sampling(NamedTuple):
    """Per-row sampling parameters, each [B]. ``temperature == 0`` is greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: no top-k filter
    top_p: jax.Array  # 1.0: no nucleus filter
    seed: jax.Array


class DecodeState(NamedTuple):
    """Everything the decode loop carries between steps; rows are independent."""

    cache: KVCache  # [L, B, S, K, H] each
    tokens: jax.Array  # [B] the last token, fed at the next step
    positions: jax.Array  # [B] the position ``tokens`` is written at
    task_ids: jax.Array  # [B]
    sampling: Sampling
    done: jax.Array  # [B] bool: EOS produced or budget spent
    remaining: jax.Array  # [B] new tokens still allowed
    output: jax.Array  # [B, M] generated tokens
    count: jax.Array  # [B] tokens written to ``output``


def sample(logits: jax.Array, sampling: Sampling, positions: jax.Array, allowed: jax.Array) -> jax.Array:
    """Draws one token a row. logits: [B, V]; allowed: [V] bool of tokens that may be produced.

    The key of a row is ``fold_in(key(seed), position)``: a function of the
    request alone, never of the batch it shares.
    """
    logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(sampling.temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, v), v)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Nucleus: keep the shortest prefix whose mass reaches top_p (at least one).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(before < sampling.top_p[:, None], axis=-1), 1)
    threshold = jnp.maximum(jnp.take_along_axis(ordered, (keep - 1)[:, None], axis=-1), kth)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(sampling.seed, positions)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(sampling.temperature > 0, drawn, greedy).astype(jnp.int32)


def prefill(model: MultiTaskModel, tokens: jax.Array, lengths: jax.Array, task_ids: jax.Array, cache_len: int):
    """Runs right-padded prompts through the backbone once.

    Args:
      tokens: [B, T] prompts, right-padded.
      lengths: [B] real prompt lengths (at least 1).
      task_ids: [B].
      cache_len: S, the cache length to allocate (T <= S).

    Returns:
      (hidden [B, D] at each prompt's last real token, the KVCache padded to S,
      the language-model logits [B, V] at that token).
    """
    hidden, kv = model(tokens, task_ids)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.lm_logits(last)[:, 0]
    pad = ((0, 0), (0, 0), (0, cache_len - tokens.shape[1]), (0, 0), (0, 0))
    cache = KVCache(*(constrain(jnp.pad(a, pad), CACHE_AXES) for a in kv))
    return last[:, 0], cache, logits


def start(
    model: MultiTaskModel,
    tokens: jax.Array,
    lengths: jax.Array,
    task_ids: jax.Array,
    sampling: Sampling,
    max_new: jax.Array,
    allowed: jax.Array,
    eos_id: int,
    cache_len: int,
    out_len: int,
) -> DecodeState:
    """Prefills prompts and samples each row's first new token."""
    _, cache, logits = prefill(model, tokens, lengths, task_ids, cache_len)
    first = sample(logits, sampling, lengths - 1, allowed)
    output = jnp.zeros((tokens.shape[0], out_len), jnp.int32).at[:, 0].set(first)
    done = (first == eos_id) | (max_new <= 1)
    return DecodeState(
        cache=cache,
        tokens=first,
        positions=lengths,
        task_ids=task_ids,
        sampling=sampling,
        done=done,
        remaining=max_new - 1,
        output=output,
        count=jnp.ones_like(lengths),
    )


def decode_step(model: MultiTaskModel, state: DecodeState, allowed: jax.Array, eos_id: int) -> DecodeState:
    """Feeds every row's last token and samples the next: one new token a row.

    Rows that are done still compute (shapes stay fixed) but write nothing.
    """
    hidden, cache = model(state.tokens[:, None], state.task_ids, state.positions[:, None], state.cache)
    logits = model.lm_logits(hidden)[:, 0]  # [B, V]
    new = sample(logits, state.sampling, state.positions, allowed)
    live = ~state.done
    rows = jnp.arange(new.shape[0])
    slot = jnp.minimum(state.count, state.output.shape[1] - 1)
    output = state.output.at[rows, slot].set(jnp.where(live, new, state.output[rows, slot]))
    done = state.done | (live & ((new == eos_id) | (state.remaining <= 1)))
    return DecodeState(
        cache=KVCache(*(constrain(a, CACHE_AXES) for a in cache)),
        tokens=jnp.where(live, new, state.tokens),
        positions=jnp.where(live, state.positions + 1, state.positions),
        task_ids=state.task_ids,
        sampling=state.sampling,
        done=done,
        remaining=jnp.where(live, state.remaining - 1, state.remaining),
        output=output,
        count=state.count + live.astype(jnp.int32),
    )
