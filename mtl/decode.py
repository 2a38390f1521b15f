"""Prefill, insertion into decode slots, the decode step over a KV cache, and per-row sampling.

These are pure functions of (model, arrays); :mod:`mtl.engine` jits them once
per shape and drives them, in the spirit of JetStream:

- :func:`prefill_rows` runs a batch of right-padded prompts (any mix of tasks)
  once, samples each row's first new token and returns a :class:`DecodeState`
  of those rows, plus what every non-generation head answers for them;
- :func:`insert` writes prefilled rows into free slots of the engine's
  :class:`DecodeState` (its cache included);
- :func:`decode_step` feeds every slot's last token and samples the next.

Every slot carries its own task, position, sampling parameters, seed and stop
state (``done``, ``remaining``), so requests of different tasks and settings
share one batch without recompiling, and a slot's tokens never depend on its
neighbours. All generation tasks today share the language-model head (tied to
the token embedding), conditioned by the task embedding; a per-task generation
head would be chosen per slot from ``task_ids`` inside the same step.
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
    seed: jax.Array  # uint32: the row's RNG key is derived from it and the position


class DecodeState(NamedTuple):
    """Everything a decode slot carries between steps; slots are independent.

    The engine holds one of ``max_batch`` slots; :func:`prefill_rows` returns
    one of its prefill batch's rows, which :func:`insert` copies into slots.
    """

    cache: KVCache  # [L, B, S, K, H] each
    tokens: jax.Array  # [B] the last token, fed at the next step
    positions: jax.Array  # [B] the position ``tokens`` is written at
    task_ids: jax.Array  # [B]
    sampling: Sampling
    done: jax.Array  # [B] bool: EOS produced, budget spent, or an empty slot
    remaining: jax.Array  # [B] new tokens still allowed


def state_axes(state: DecodeState) -> DecodeState:
    """Logical axis names of every leaf: the cache by CACHE_AXES, the rest by slot."""
    return jax.tree.map(lambda a: CACHE_AXES if a.ndim == 5 else ("batch",), state)


def sample(logits: jax.Array, sampling: Sampling, positions: jax.Array, allowed: jax.Array) -> jax.Array:
    """Draws one token a row. logits: [B, V]; allowed: [V] bool of tokens that may be produced.

    The key of a row is ``fold_in(key(seed), position)``: a function of the
    request alone, never of the batch or the slot it shares.
    """
    logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
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

    # The sort and the draws cost about a third of a small model's CPU step: skip them
    # when every row is greedy (a branch on device, not a recompile).
    return jax.lax.cond(jnp.any(sampling.temperature > 0), draw, lambda: greedy)


def prefill(model: MultiTaskModel, tokens: jax.Array, lengths: jax.Array, task_ids: jax.Array, cache_len: int):
    """Runs right-padded prompts through the backbone once.

    Args:
      tokens: [B, T] prompts, right-padded.
      lengths: [B] real prompt lengths (at least 1).
      task_ids: [B].
      cache_len: S, the cache length to allocate (T <= S).

    Returns:
      (hidden states [B, T, D], the KVCache padded to S, the language-model
      logits [B, V] at each prompt's last real token).
    """
    hidden, kv = model(tokens, task_ids)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = model.lm_logits(last)[:, 0]
    pad = ((0, 0), (0, 0), (0, cache_len - tokens.shape[1]), (0, 0), (0, 0))
    cache = KVCache(*(constrain(jnp.pad(a, pad), CACHE_AXES) for a in kv))
    return hidden, cache, logits


def prefill_rows(
    model: MultiTaskModel,
    tokens: jax.Array,
    lengths: jax.Array,
    task_ids: jax.Array,
    sampling: Sampling,
    max_new: jax.Array,
    allowed: jax.Array,
    eos_id: int,
    cache_len: int,
) -> tuple[DecodeState, jax.Array, dict[str, jax.Array]]:
    """Prefills a batch of prompts of any tasks and samples each row's first new token.

    Args:
      tokens: [P, T] prompts, right-padded to a length bucket.
      lengths, task_ids: [P].
      sampling: per-row settings, each [P].
      max_new: [P] each row's token budget (at least 1).

    Returns:
      (the rows as a DecodeState ready for :func:`insert`, their first tokens
      [P], and ``model.head_outputs`` of every non-generation head by task).
    """
    hidden, cache, logits = prefill(model, tokens, lengths, task_ids, cache_len)
    heads = model.head_outputs(hidden, lengths)
    first = sample(logits, sampling, lengths - 1, allowed)
    rows = DecodeState(
        cache=cache,
        tokens=first,
        positions=lengths,
        task_ids=task_ids,
        sampling=sampling,
        done=(first == eos_id) | (max_new <= 1),
        remaining=max_new - 1,
    )
    return rows, first, heads


def insert(state: DecodeState, rows: DecodeState, slots: jax.Array) -> DecodeState:
    """Copies prefilled ``rows`` into the decode ``state`` at ``slots``.

    Args:
      slots: [P] the slot of each row; a slot out of range (``max_batch``)
        drops the row, so a prefill batch may insert any number of its rows.
    """

    def put(whole, part):
        if whole.ndim == 5:  # [L, B, S, K, H]: slots are the second axis
            return constrain(whole.at[:, slots].set(part.astype(whole.dtype), mode="drop"), CACHE_AXES)
        return whole.at[slots].set(part.astype(whole.dtype), mode="drop")

    return jax.tree.map(put, state, rows)


def decode_step(
    model: MultiTaskModel, state: DecodeState, allowed: jax.Array, eos_id: int
) -> tuple[DecodeState, jax.Array]:
    """Feeds every slot's last token and samples the next: one new token a slot.

    Slots that are done still compute (shapes stay fixed) but do not advance.

    Returns:
      (the new state, the [B] tokens sampled; meaningful only for live slots).
    """
    hidden, cache = model(state.tokens[:, None], state.task_ids, state.positions[:, None], state.cache)
    logits = model.lm_logits(hidden)[:, 0]  # [B, V]; all generation tasks share the LM head
    new = sample(logits, state.sampling, state.positions, allowed)
    live = ~state.done
    done = state.done | (live & ((new == eos_id) | (state.remaining <= 1)))
    state = DecodeState(
        cache=KVCache(*(constrain(a, CACHE_AXES) for a in cache)),
        tokens=jnp.where(live, new, state.tokens),
        positions=jnp.where(live, state.positions + 1, state.positions),
        task_ids=state.task_ids,
        sampling=state.sampling,
        done=done,
        remaining=jnp.where(live, state.remaining - 1, state.remaining),
    )
    return state, new
