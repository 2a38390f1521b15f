"""Prefill, insertion into decode slots, chunks of decode steps over a KV cache, and per-row sampling.

These are pure functions of (model, arrays); :mod:`mtl.serving.engine` jits them once
per shape and drives them, in the spirit of JetStream:

- :func:`prefill_rows` runs a batch of right-padded prompts (any mix of tasks)
  once, samples each row's first new token and returns a :class:`DecodeState`
  of those rows, plus what every non-generation head answers for them;
- :func:`insert` writes prefilled rows into free slots of the engine's
  :class:`DecodeState` (its cache included);
- :func:`decode_steps` runs up to a chunk of decode steps in one program, each
  feeding every slot's last token and sampling the next (:func:`decode_step`).

Every slot carries its own task, position, sampling parameters, seed and stop
state (``done``, ``remaining``, its stop sequences and last tokens), so requests of different tasks and settings
share one batch without recompiling, and a slot's tokens never depend on its
neighbours. All generation tasks today share the language-model head (tied to
the token embedding), conditioned by the task embedding; a per-task generation
head would be chosen per slot from ``task_ids`` inside the same step.

Serving reads the model through :class:`DecodeWeights`, its parameters laid
out once: one Block's parameters per layer (a scan over the stacked [L, ...]
weights copies every layer's slice on XLA:CPU, every call) and the
language-model head as a [D, V] matrix. :func:`forward` runs the model's own
embedding, Blocks and final norm over those weights, one Block a layer, and
the logits are the model's ``lm_logits`` with the laid-out head: a prefill
attends causally over the prompts and keeps their keys and values, a decode
step writes one token a row into the cache and attends over it (both in
``Attention.__call__``). The cache is the model's :class:`~mtl.layers.KVCache`,
one a layer. ``tests/test_decode.py`` holds both to ``MultiTaskModel.__call__``
over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import cache_bkhs, cache_bks, cache_bksh
from mtl.config import ModelConfig
from mtl.layers import KVCache
from mtl.model import MultiTaskModel, last_position
from sharding import constrain


class Sampling(NamedTuple):
    """Per-row sampling parameters, each [B]. ``temperature == 0`` is greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0: no top-k filter
    top_p: jax.Array  # 1.0 (or more): no nucleus filter
    seed: jax.Array  # uint32: the row's RNG key is derived from it and the position


# Stop sequences a slot matches on device: up to STOP_SEQUENCES of them (OpenAI's limit on stop
# strings), each up to STOP_TOKENS tokens. The engine matches every stop sequence on the host too, so
# longer or further ones still end a request, only not on device.
STOP_SEQUENCES = 4
STOP_TOKENS = 16
_NO_STOP = -2  # a stop row that never matches (tokens are >= 0)
_ANY = -1  # a position before a shorter stop sequence's start: matches any token
_NOTHING_YET = -3  # ``recent`` before a slot has generated that many tokens


def stop_array(stops: Sequence[Sequence[Sequence[int]]], rows: int) -> np.ndarray:
    """[rows, STOP_SEQUENCES, STOP_TOKENS] int32: each row's stop sequences right-aligned, for the device.

    ``stops[r]`` is row r's token sequences (rows past ``len(stops)`` have none);
    sequences that are empty, longer than STOP_TOKENS, or past the first
    STOP_SEQUENCES that fit are left to the host.
    """
    out = np.full((rows, STOP_SEQUENCES, STOP_TOKENS), _NO_STOP, np.int32)
    for r, sequences in enumerate(stops):
        fitting = [s for s in sequences if 1 <= len(s) <= STOP_TOKENS][:STOP_SEQUENCES]
        for j, s in enumerate(fitting):
            out[r, j] = _ANY
            out[r, j, STOP_TOKENS - len(s) :] = s
    return out


def _stopped(stops: jax.Array, recent: jax.Array) -> jax.Array:
    """[B] whether each row's last tokens ``recent`` [B, STOP_TOKENS] end in one of its ``stops``."""
    match = (stops == recent[:, None, :]) | (stops == _ANY)  # [B, STOP_SEQUENCES, STOP_TOKENS]
    return jnp.any(jnp.all(match, axis=-1), axis=-1)


class DecodeState(NamedTuple):
    """Everything a decode slot carries between steps; slots are independent.

    The engine holds one of ``max_batch`` slots; :func:`prefill_rows` returns
    one of its prefill batch's rows, which :func:`insert` copies into slots.
    Every leaf has the slots as its first axis.
    """

    cache: tuple[KVCache, ...]  # one a layer: keys [B, K, H, S], values [B, K, S, H] (int8: and their scales)
    tokens: jax.Array  # [B] the last token, fed at the next step
    positions: jax.Array  # [B] the position ``tokens`` is written at
    task_ids: jax.Array  # [B]
    sampling: Sampling
    done: jax.Array  # [B] bool: EOS or a stop sequence produced, budget spent, or an empty slot
    remaining: jax.Array  # [B] new tokens still allowed
    stops: jax.Array  # [B, STOP_SEQUENCES, STOP_TOKENS] int32, see :func:`stop_array`
    recent: jax.Array  # [B, STOP_TOKENS] the last tokens generated, the newest last


class DecodeWeights(NamedTuple):
    """The parameters decoding reads, laid out once (see the module docstring)."""

    layers: tuple[dict, ...]  # one Block's parameters per layer, without the [L] axis (nnx.to_pure_dict)
    w_dv: jax.Array  # [D, V] the language-model head


def decode_weights(model: MultiTaskModel) -> DecodeWeights:
    """Lays out ``model``'s parameters for :func:`forward` (copies them: jit it with the engine)."""
    _, layers = nnx.split(model.blocks)
    per_layer = tuple(nnx.to_pure_dict(jax.tree.map(lambda a, i=i: a[i], layers)) for i in range(model.cfg.n_layers))
    return DecodeWeights(per_layer, model.lm_head())


def state_axes(state: DecodeState) -> DecodeState:
    """Logical axis names of every leaf: the cache's by its layout, the rest by slot."""
    per_slot = jax.tree.map(lambda a: ("batch",) + (None,) * (a.ndim - 1), state._replace(cache=()))
    scales = lambda c: (cache_bks, cache_bks) if c.quantized else ()  # noqa: E731
    return per_slot._replace(cache=tuple(KVCache(cache_bkhs, cache_bksh, *scales(c)) for c in state.cache))


def kv_dtype(cfg: ModelConfig, setting: str = "") -> jnp.dtype:
    """How the decode cache is stored: ``setting`` (``serve.kv_dtype``), or the model's compute dtype."""
    return jnp.dtype(setting or cfg.dtype)


def empty_cache(
    cfg: ModelConfig, rows: int, zeros=jnp.zeros, dtype=None, length: int | None = None
) -> tuple[KVCache, ...]:
    """A zero decode cache of ``rows`` slots and ``length`` (default ``cfg.max_len``) positions, one
    KVCache a layer, stored as ``dtype`` (default: the model's compute dtype); ``zeros=np.zeros``
    builds it on the host."""
    dtype, length = kv_dtype(cfg) if dtype is None else dtype, length or cfg.max_len
    return tuple(
        KVCache.zeros(rows, cfg.n_kv_heads, cfg.head_dim, length, dtype, zeros=zeros) for _ in range(cfg.n_layers)
    )


def cache_bytes_per_position(cfg: ModelConfig, dtype=None) -> int:
    """Bytes one position of one slot takes in the decode cache (every layer) stored as ``dtype``."""
    dtype = kv_dtype(cfg) if dtype is None else dtype
    return cfg.n_layers * KVCache.bytes_per_position(cfg.n_kv_heads, cfg.head_dim, dtype)


# Sampling.


def _first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first maximum) as two plain reductions: XLA:CPU's
    variadic (value, index) reduce costs several times more."""
    v = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1).astype(jnp.int32)


def _largest_at_least(keys: jax.Array, enough) -> jax.Array:
    """The largest uint32 ``t`` per row with ``enough(t)`` true, ``enough`` ([B, 1] -> [B] bool)
    falling in ``t`` and true at 0: 32 steps of bisection, each one pass over the row."""
    b = keys.shape[0]

    def halve(_, bounds):
        low, high = bounds
        gap = high - low
        mid = low + (gap >> 1) + (gap & 1)  # the upper middle, without overflow
        ok = enough(mid[:, None])
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid - 1)

    start = (jnp.zeros(b, jnp.uint32), jnp.full(b, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, start)[0]


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative numbers have their bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _top_k_filter(scaled: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keeps each row's ``top_k`` largest values (ties at the k-th included); ``top_k == 0`` keeps all.

    The k-th largest is found exactly by bisection over the values' bits, a few
    passes over [B, V] where a sort over the vocabulary costs far more on CPU.
    """
    v = scaled.shape[-1]
    keys = _ordered_bits(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), 1)
    kth = _largest_at_least(keys, lambda t: jnp.sum(keys >= t, axis=-1) >= k)
    keep = (keys >= kth[:, None]) | (top_k <= 0)[:, None]
    return jnp.where(keep, scaled, -jnp.inf)


def _nucleus_filter(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the most probable tokens of each row whose mass first reaches ``top_p`` (at least one,
    ties included); ``top_p >= 1`` keeps all. probs: [B, V], not necessarily normalised."""
    bits = jax.lax.bitcast_convert_type(probs, jnp.uint32)  # probabilities are >= 0: bits keep their order
    target = top_p * jnp.sum(probs, axis=-1)
    cut = _largest_at_least(bits, lambda t: jnp.sum(jnp.where(bits >= t, probs, 0), axis=-1) >= target)
    keep = (bits >= cut[:, None]) | (top_p >= 1)[:, None]
    return jnp.where(keep, probs, 0)


def sample(logits: jax.Array, sampling: Sampling, positions: jax.Array, allowed: jax.Array) -> jax.Array:
    """Draws one token a row. logits: [B, V]; allowed: [V] bool of tokens that may be produced.

    A sampled row scales by its temperature, keeps its ``top_k`` largest
    logits, then the most probable tokens whose mass reaches ``top_p``, and
    draws by inverting the cumulative distribution (in vocabulary order) at one
    uniform number. Its key is ``fold_in(key(seed), position)``: a function of
    the request alone, never of the batch or the slot it shares; each filter
    leaves a row that does not ask for it exactly as it was, so skipping a
    filter no row asks for (a branch on device, not a recompile) changes nothing.
    """
    logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = _first_argmax(logits)
    sampled = sampling.temperature > 0

    def draw():
        scaled = logits / jnp.maximum(sampling.temperature, 1e-6)[:, None]
        scaled = jax.lax.cond(
            jnp.any(sampled & (sampling.top_k > 0)), _top_k_filter, lambda s, _: s, scaled, sampling.top_k
        )
        probs = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # unnormalised
        probs = jax.lax.cond(
            jnp.any(sampled & (sampling.top_p < 1)), _nucleus_filter, lambda p, _: p, probs, sampling.top_p
        )
        cumulative = jnp.cumsum(probs, axis=-1)
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(sampling.seed, positions)
        point = jax.vmap(jax.random.uniform)(keys) * cumulative[:, -1]  # in [0, total mass)
        # The first token with mass whose cumulative mass passes the point. Only tokens with mass
        # are candidates, and the last of them is the fallback: a cumsum computed as a tree need
        # not be monotone to the last bit, and no rounding may draw a filtered or banned token.
        passed = (cumulative > point[:, None]) & (probs > 0)
        last = probs.shape[-1] - 1 - _first_argmax((probs > 0)[:, ::-1].astype(jnp.float32))
        drawn = jnp.where(jnp.any(passed, axis=-1), _first_argmax(passed.astype(jnp.float32)), last)
        return jnp.where(sampled, drawn, greedy)

    # The filters and the draw cost about a tenth of a small model's CPU step: skip them when every
    # row is greedy.
    return jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)


# The model's forward pass over the laid-out weights.


def forward(
    model: MultiTaskModel,
    weights: DecodeWeights,
    tokens: jax.Array,
    task_ids: jax.Array,
    positions: jax.Array,
    cache: tuple[KVCache, ...] | None = None,
) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """``MultiTaskModel.__call__`` one Block a layer, over ``weights``, keeping every layer's cache.

    Args:
      tokens, positions: [B, T]; task_ids: [B].
      cache: none for a prefill (causal attention over ``tokens``); while
        decoding one token a row (T == 1), every layer's cache, into which the
        token is written at its position.

    Returns:
      (the final-normed hidden states [B, T, D], every layer's KVCache: of
      ``tokens`` without a cache, else the updated one).
    """
    block_def = nnx.graphdef(model.blocks)
    x = model.embed(tokens, task_ids, positions)
    kept = []
    caches = (None,) * len(weights.layers) if cache is None else cache
    for index, (layer, layer_cache) in enumerate(zip(weights.layers, caches, strict=True)):
        x, layer_cache = nnx.merge(block_def, layer)(x, positions, layer_cache, index, task_ids)
        kept.append(layer_cache)
    return model.final_norm(x), tuple(kept)


# Prefill and insertion.


def prefill(
    model: MultiTaskModel,
    weights: DecodeWeights,
    tokens: jax.Array,
    lengths: jax.Array,
    task_ids: jax.Array,
    cache_len: int,
    cache_dtype=None,
) -> tuple[jax.Array, tuple[KVCache, ...], jax.Array]:
    """Runs right-padded prompts through the backbone once (:func:`forward`).

    Args:
      tokens: [B, T] prompts, right-padded.
      lengths: [B] real prompt lengths (at least 1).
      task_ids: [B].
      cache_len: S, the cache length to allocate (T <= S).
      cache_dtype: how the returned cache is stored (:meth:`KVCache.stored_as`); None: as computed.

    Returns:
      (hidden states [B, T, D], the rows' decode cache padded to S, the
      language-model logits [B, V] at each prompt's last real token).
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = forward(model, weights, tokens, task_ids, positions)
    last = last_position(hidden, lengths)[:, None]  # [B, 1, D]
    if cache_dtype is not None:
        cache = tuple(c.stored_as(cache_dtype) for c in cache)
    return hidden, tuple(c.padded(cache_len) for c in cache), model.lm_logits(last, weights.w_dv)[:, 0]


def prefill_rows(
    model: MultiTaskModel,
    weights: DecodeWeights,
    tokens: jax.Array,
    lengths: jax.Array,
    task_ids: jax.Array,
    sampling: Sampling,
    max_new: jax.Array,
    allowed: jax.Array,
    eos_id: int | Sequence[int],
    cache_len: int,
    stops: jax.Array | None = None,
    cache_dtype=None,
) -> tuple[DecodeState, jax.Array, dict[str, jax.Array]]:
    """Prefills a batch of prompts of any tasks and samples each row's first new token.

    Args:
      tokens: [P, T] prompts, right-padded to a length bucket.
      lengths, task_ids: [P].
      sampling: per-row settings, each [P].
      max_new: [P] each row's token budget (at least 1).
      eos_id: the id, or ids, that end a generation.
      stops: [P, STOP_SEQUENCES, STOP_TOKENS] (:func:`stop_array`); None: no stop sequences.
      cache_dtype: how the rows' cache is stored (that of the slots they go into); None: the compute dtype.

    Returns:
      (the rows as a DecodeState ready for :func:`insert`, their first tokens
      [P], and ``model.head_outputs`` of every non-generation head by task).
    """
    hidden, cache, logits = prefill(model, weights, tokens, lengths, task_ids, cache_len, cache_dtype)
    heads = model.head_outputs(hidden, lengths)
    first = sample(logits, sampling, lengths - 1, allowed)
    p = tokens.shape[0]
    if stops is None:
        stops = jnp.full((p, STOP_SEQUENCES, STOP_TOKENS), _NO_STOP, jnp.int32)
    recent = jnp.full((p, STOP_TOKENS), _NOTHING_YET, jnp.int32).at[:, -1].set(first)
    rows = DecodeState(
        cache=cache,
        tokens=first,
        positions=lengths,
        task_ids=task_ids,
        sampling=sampling,
        done=_is_eos(first, eos_id) | (max_new <= 1) | _stopped(stops, recent),
        remaining=max_new - 1,
        stops=stops,
        recent=recent,
    )
    return rows, first, heads


def _is_eos(tokens: jax.Array, eos_id: int | Sequence[int]) -> jax.Array:
    """Whether each token ends its generation: one of the (few, static) EOS ids; a model may have several."""
    return jnp.isin(tokens, jnp.asarray(eos_id, jnp.int32))


def insert(state: DecodeState, rows: DecodeState, slots: jax.Array) -> DecodeState:
    """Copies prefilled ``rows`` into the decode ``state`` at ``slots``.

    Args:
      slots: [P] the slot of each row; a slot out of range (``max_batch``)
        drops the row, so a prefill batch may insert any number of its rows.
    """

    def put(whole, part, axes):
        return constrain(whole.at[slots].set(part.astype(whole.dtype), mode="drop"), axes)

    return jax.tree.map(put, state, rows, state_axes(state))


# Decoding.


def decode_forward(
    model: MultiTaskModel,
    weights: DecodeWeights,
    tokens: jax.Array,
    task_ids: jax.Array,
    positions: jax.Array,
    cache: tuple[KVCache, ...],
) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """:func:`forward` and ``lm_logits`` for one token a row, over the decode cache.

    Args:
      tokens, task_ids, positions: [B] each; a row's token is written to its cache at its position.
      cache: every layer's KVCache.

    Returns:
      (the language-model logits [B, V] in f32, the updated cache).
    """
    hidden, cache = forward(model, weights, tokens[:, None], task_ids, positions[:, None], cache)
    return model.lm_logits(hidden, weights.w_dv)[:, 0], cache


def decode_step(
    model: MultiTaskModel,
    weights: DecodeWeights,
    state: DecodeState,
    allowed: jax.Array,
    eos_id: int | Sequence[int],
) -> tuple[DecodeState, jax.Array]:
    """Feeds every slot's last token and samples the next: one new token a slot.

    Slots that are done still compute (shapes stay fixed) but do not advance. A slot is done
    once it produces EOS or one of its stop sequences, or spends its budget.

    Returns:
      (the new state, the [B] tokens sampled; meaningful only for live slots).
    """
    logits, cache = decode_forward(model, weights, state.tokens, state.task_ids, state.positions, state.cache)
    new = sample(logits, state.sampling, state.positions, allowed)  # all generation tasks share the LM head
    live = ~state.done
    recent = jnp.concatenate([state.recent[:, 1:], new[:, None]], axis=1)
    done = state.done | (live & (_is_eos(new, eos_id) | (state.remaining <= 1) | _stopped(state.stops, recent)))
    state = DecodeState(
        cache=cache,
        tokens=jnp.where(live, new, state.tokens),
        positions=jnp.where(live, state.positions + 1, state.positions),
        task_ids=state.task_ids,
        sampling=state.sampling,
        done=done,
        remaining=jnp.where(live, state.remaining - 1, state.remaining),
        stops=state.stops,
        recent=jnp.where(live[:, None], recent, state.recent),
    )
    return state, new


def decode_steps(
    model: MultiTaskModel,
    weights: DecodeWeights,
    state: DecodeState,
    steps: jax.Array,
    stop_after: jax.Array,
    max_steps: int,
    allowed: jax.Array,
    eos_id: int | Sequence[int],
    span: int | None = None,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Runs up to ``steps`` (at most ``max_steps``) decode steps in one program, ending early once
    ``stop_after`` slots live at its start are done, or every slot is.

    With a ``span`` (static: one program each), the steps read and write only
    the cache's first ``span`` positions, copied out before the first step and
    back after the last: a step then costs what the filled part of the cache
    costs, not its whole length. The caller keeps every live slot's positions
    below ``span`` for the steps it asks for; the tokens are those of the
    whole cache (masked positions weigh exactly 0), which ``tests/test_decode.py`` holds.

    One call amortises the dispatch and the host's read-back over the chunk; a
    slot that ends mid-chunk (EOS, a stop sequence, its budget) is done on device and stops
    advancing, and ``stop_after`` lets the chunk end as soon as enough slots are
    free for waiting requests, instead of leaving them idle to the chunk's end.

    Args:
      steps, stop_after: traced counts (one program for all of them); a
        ``stop_after`` above the slots never ends a chunk early.

    Returns:
      (the new state, the [max_steps, B] tokens of each step (rows past the
      steps run are zero), the number of steps run).
    """
    live = ~state.done
    limit = jnp.minimum(steps, max_steps)

    def more(carry):
        i, state, _ = carry
        return (i < limit) & (jnp.sum(state.done & live) < stop_after) & ~jnp.all(state.done)

    def step(carry):
        i, state, tokens = carry
        state, new = decode_step(model, weights, state, allowed, eos_id)
        return i + 1, state, tokens.at[i].set(new)

    whole = state.cache
    if span is not None and span < whole[0].key.shape[-1]:
        state = state._replace(cache=tuple(c.prefix(span) for c in whole))
    tokens = jnp.zeros((max_steps, state.tokens.shape[0]), jnp.int32)
    ran, state, tokens = jax.lax.while_loop(more, step, (jnp.int32(0), state, tokens))
    if state.cache[0].key.shape != whole[0].key.shape:
        state = state._replace(cache=tuple(w.with_prefix(c) for w, c in zip(whole, state.cache, strict=True)))
    return state, tokens, ran
