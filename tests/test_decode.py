"""KV-cache decoding against full recomputation, sampling, and the engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import config as C
from mtl import decode
from mtl.model import MultiTaskModel
from mtl.serving.engine import length_buckets, slots_that_fit
from mtl.serving.requests import Request
from sharding import make_mesh
from tests.helpers import randomise_adapters, scheduler_over, tiny_model_config

CFG = tiny_model_config(max_len=32)
ALLOWED = np.arange(CFG.vocab_size) >= 2  # PAD and BOS never produced
EOS = 2


def make_model(seed=0, adapter_rank=0):
    """The tiny model; with ``adapter_rank`` its per-task adapters are random (each task computes otherwise)."""
    if adapter_rank:
        model = MultiTaskModel(dataclasses.replace(CFG, adapter_rank=adapter_rank), rngs=nnx.Rngs(seed))
        return randomise_adapters(model, seed + 1)
    return MultiTaskModel(CFG, rngs=nnx.Rngs(seed))


def test_cached_decoding_equals_full_recomputation():
    # The serving path (prefill and decode steps over DecodeWeights and the KV cache, the model's
    # Blocks one by one) against MultiTaskModel.__call__ on the whole sequence, an independent path
    # (a scan, causal_attention); f32, so 1e-4 covers summation order.
    model = make_model()
    weights = decode.decode_weights(model)
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    lengths = jnp.array([5, 3])
    tokens = jnp.array([p + [0] * (5 - len(p)) for p in prompts])
    task_ids = jnp.array([0, 2])
    hidden, cache, logits = decode.prefill(model, weights, tokens, lengths, task_ids, cache_len=16)
    expected_hidden = model(tokens, task_ids)
    np.testing.assert_allclose(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    last = jnp.take_along_axis(expected_hidden, (lengths - 1)[:, None, None], axis=1)
    np.testing.assert_allclose(logits, model.lm_logits(last)[:, 0], rtol=1e-5, atol=1e-5)
    assert [c.key.shape for c in cache] == [(2, CFG.n_kv_heads, CFG.head_dim, 16)] * CFG.n_layers
    assert [c.value.shape for c in cache] == [(2, CFG.n_kv_heads, 16, CFG.head_dim)] * CFG.n_layers
    continuation = np.array([[60, 61, 62, 63], [70, 71, 72, 73]])
    for t in range(continuation.shape[1]):
        positions = lengths + t
        logits, cache = decode.decode_forward(
            model, weights, jnp.asarray(continuation[:, t]), task_ids, positions, cache
        )
        for row, prompt in enumerate(prompts):
            full = jnp.array([prompt + continuation[row, : t + 1].tolist()])
            expected = model(full, task_ids[row : row + 1])
            np.testing.assert_allclose(logits[row], model.lm_logits(expected)[0, -1], rtol=1e-4, atol=1e-4)


def test_a_chunk_of_steps_equals_single_steps():
    model = make_model()
    weights = decode.decode_weights(model)
    tokens = jnp.array([[1, 40, 41, 3], [1, 50, 3, 0]])
    lengths, task_ids = jnp.array([4, 3]), jnp.array([0, 2])
    sampled = sampling(2, temperature=0.9, top_k=7, top_p=0.8, seed=5)
    no_eos = np.arange(CFG.vocab_size) > EOS  # lengths follow the budgets exactly
    rows, _, _ = decode.prefill_rows(
        model, weights, tokens, lengths, task_ids, sampled, jnp.array([9, 3]), no_eos, EOS, 16
    )
    one, single = rows, []
    for _ in range(6):
        one, new = decode.decode_step(model, weights, one, no_eos, EOS)
        single.append(new)
    chunk, tokens, ran = decode.decode_steps(model, weights, rows, jnp.int32(6), jnp.int32(3), 8, no_eos, EOS)
    assert ran == 6
    np.testing.assert_array_equal(tokens[:6], jnp.stack(single))
    np.testing.assert_array_equal(tokens[6:], 0)
    np.testing.assert_array_equal(chunk.positions, one.positions)
    np.testing.assert_array_equal(chunk.done, [False, True])  # the second row's budget of 3 is spent
    np.testing.assert_array_equal(chunk.positions, [4 + 6, 3 + 2])
    # Told to end once one slot is done, the chunk stops at the step the second row's budget runs out.
    early, tokens, ran = decode.decode_steps(model, weights, rows, jnp.int32(6), jnp.int32(1), 8, no_eos, EOS)
    assert ran == 2
    np.testing.assert_array_equal(tokens[:2], jnp.stack(single[:2]))
    np.testing.assert_array_equal(tokens[2:], 0)
    np.testing.assert_array_equal(early.positions, [4 + 2, 3 + 2])


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.05), ("int8", 0.05)])
def test_a_cache_stored_smaller_decodes_close_to_the_f32_cache(dtype, tolerance):
    # Six decode steps over a cache stored as bfloat16 or int8 (per-head scales) against the f32 cache:
    # logits within ``tolerance`` of the f32 path's largest logit (measured: about 0.4% for either).
    model = make_model()
    weights = decode.decode_weights(model)
    tokens = jnp.array([[1, 40, 41, 42, 43], [1, 50, 51, 0, 0]])
    lengths, task_ids = jnp.array([5, 3]), jnp.array([0, 2])
    _, exact, _ = decode.prefill(model, weights, tokens, lengths, task_ids, cache_len=16)
    _, small, _ = decode.prefill(model, weights, tokens, lengths, task_ids, cache_len=16, cache_dtype=dtype)
    assert all(c.key.dtype == jnp.dtype(dtype) and c.key.shape == e.key.shape for c, e in zip(small, exact))
    assert all(c.quantized == (dtype == "int8") for c in small)
    feed = jnp.array([[60, 61, 62, 63, 64, 65], [70, 71, 72, 73, 74, 75]])
    for t in range(feed.shape[1]):
        want, exact = decode.decode_forward(model, weights, feed[:, t], task_ids, lengths + t, exact)
        got, small = decode.decode_forward(model, weights, feed[:, t], task_ids, lengths + t, small)
        assert float(jnp.max(jnp.abs(got - want))) <= tolerance * float(jnp.max(jnp.abs(want)))
        assert small[0].key.dtype == jnp.dtype(dtype)
    expected = {"float32": 4, "bfloat16": 2, "int8": 1}[dtype] * 2 * CFG.n_kv_heads * CFG.head_dim
    expected += 2 * CFG.n_kv_heads * 4 if dtype == "int8" else 0
    assert decode.cache_bytes_per_position(CFG, dtype) == CFG.n_layers * expected


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_span_decodes_what_the_whole_cache_does(dtype):
    # Steps that read only the cache's first 16 of 32 positions give the same tokens, positions and
    # cache as steps over all 32 (greedy and sampled rows), and leave the positions past the span alone.
    model = make_model()
    weights = decode.decode_weights(model)
    tokens = jnp.array([[1, 40, 41, 3], [1, 50, 3, 0], [1, 60, 0, 0]])
    lengths, task_ids = jnp.array([4, 3, 2]), jnp.array([0, 2, 0])
    drawn = sampling(3, temperature=0.9, seed=5)._replace(temperature=jnp.array([0.0, 0.9, 0.0]))
    no_eos = np.arange(CFG.vocab_size) > EOS
    rows, _, _ = decode.prefill_rows(
        model, weights, tokens, lengths, task_ids, drawn, jnp.array([12, 12, 4]), no_eos, EOS, 32, None, dtype
    )
    whole = decode.decode_steps(model, weights, rows, jnp.int32(11), jnp.int32(9), 12, no_eos, EOS)
    spanned = decode.decode_steps(model, weights, rows, jnp.int32(11), jnp.int32(9), 12, no_eos, EOS, span=16)
    np.testing.assert_array_equal(spanned[1], whole[1])  # every token of every step
    assert int(spanned[2]) == int(whole[2]) == 11
    np.testing.assert_array_equal(spanned[0].positions, whole[0].positions)
    np.testing.assert_array_equal(spanned[0].done, whole[0].done)
    for got, want in zip(spanned[0].cache, whole[0].cache, strict=True):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.key[..., 16:], 0)  # the last write was at position 4 + 10
        np.testing.assert_array_equal(got.value[:, :, 16:], 0)


def test_a_stop_sequence_ends_its_slot_on_device():
    # Rows with no stop run 12 steps; given a stop sequence that their text reaches, a row is done
    # on device at the step that completes it and stops advancing, and a chunk told to end once one slot
    # is done ends there.
    model = make_model()
    weights = decode.decode_weights(model)
    tokens = jnp.array([[1, 40, 41, 3], [1, 50, 3, 0]])
    lengths, task_ids = jnp.array([4, 3]), jnp.array([0, 2])
    drawn = sampling(2, temperature=1.0, seed=5)  # sampled: a random model's greedy text repeats one token
    no_eos = np.arange(CFG.vocab_size) > EOS
    budget = jnp.array([13, 13])
    rows, first, _ = decode.prefill_rows(model, weights, tokens, lengths, task_ids, drawn, budget, no_eos, EOS, 32)
    _, free, ran = decode.decode_steps(model, weights, rows, jnp.int32(12), jnp.int32(3), 12, no_eos, EOS)
    assert ran == 12
    run = [first[0], *free[:, 0]]  # row 0's 13 tokens
    stop = tuple(int(t) for t in run[3:5])
    end = next(i for i in range(1, 13) if tuple(run[i - 1 : i + 1]) == stop)  # the token completing it
    stops = decode.stop_array([[(999, 998, 997), stop], []], 2)
    rows, _, _ = decode.prefill_rows(model, weights, tokens, lengths, task_ids, drawn, budget, no_eos, EOS, 32, stops)
    chunk, tokens_run, ran = decode.decode_steps(model, weights, rows, jnp.int32(12), jnp.int32(3), 12, no_eos, EOS)
    assert ran == 12
    np.testing.assert_array_equal(tokens_run[:end, 0], free[:end, 0])
    np.testing.assert_array_equal(chunk.done, [True, True])  # row 1: its budget is spent
    np.testing.assert_array_equal(chunk.positions, [4 + end, 3 + 12])  # row 0 stopped advancing
    np.testing.assert_array_equal(chunk.remaining, [13 - 1 - end, 0])
    early, _, ran = decode.decode_steps(model, weights, rows, jnp.int32(12), jnp.int32(1), 12, no_eos, EOS)
    assert ran == end and bool(early.done[0])
    # A stop sequence of one token that the prefill's first token completes: done at once.
    stops = decode.stop_array([[(int(first[0]),)], [(int(first[1]) + 1,)]], 2)
    rows, _, _ = decode.prefill_rows(model, weights, tokens, lengths, task_ids, drawn, budget, no_eos, EOS, 32, stops)
    np.testing.assert_array_equal(rows.done, [True, first[1] + 1 == first[1]])


def test_stop_array_right_aligns_what_fits_and_leaves_the_rest_to_the_host():
    long = tuple(range(10, 10 + decode.STOP_TOKENS + 1))
    array = decode.stop_array([[(5, 6), long, (), (7,)], []], 3)
    assert array.shape == (3, decode.STOP_SEQUENCES, decode.STOP_TOKENS)
    np.testing.assert_array_equal(array[0, 0, -3:], [-1, 5, 6])
    np.testing.assert_array_equal(array[0, 1, -2:], [-1, 7])
    assert (array[0, 2:] == -2).all() and (array[1:] == -2).all()


def greedy_by_recomputation(model, prompt, task_id, steps):
    seq = list(prompt)
    for _ in range(steps):
        hidden = model(jnp.array([seq]), jnp.array([task_id]))
        logits = np.where(ALLOWED, np.asarray(model.lm_logits(hidden))[0, -1], -np.inf)
        seq.append(int(logits.argmax()))
        if seq[-1] == EOS:
            break
    return seq[len(prompt) :]


def make_engine(model, max_batch=4, mesh=None):
    """A scheduler over an engine for ``model`` (its ``engine`` holds the device state and traces)."""
    mesh = mesh or make_mesh("data=1", jax.devices()[:1])
    return scheduler_over(model, mesh, max_batch=max_batch, allowed_tokens=ALLOWED, eos_id=EOS, pad_id=0)


@pytest.mark.parametrize("adapter_rank", [0, 4])
def test_engine_greedy_matches_recomputation_alone_and_in_a_mixed_batch(adapter_rank):
    # With adapters every row's task has its own: the target's output must not depend on its neighbours'.
    model = make_model(adapter_rank=adapter_rank)
    engine = make_engine(model)
    target = Request(task="spell", prompt=[1, 40, 41, 3], max_new_tokens=10)
    expected = greedy_by_recomputation(model, target.prompt, 0, 10)
    alone = engine.generate([target])[0]
    others = [
        Request(task="echo", prompt=[1] + list(range(60, 80)) + [3], max_new_tokens=5, temperature=1.0, seed=3),
        Request(task="spell", prompt=[1, 90, 3], max_new_tokens=7, temperature=0.7, top_k=5, seed=1),
        Request(task="echo", prompt=[1, 5, 6, 7, 3], max_new_tokens=12, top_p=0.5),
    ]
    crowded = engine.generate([others[0], target, *others[1:]])[1]
    assert alone.tokens == crowded.tokens
    stopped = bool(expected) and expected[-1] == EOS
    assert alone.tokens == (expected[:-1] if stopped else expected)
    assert alone.finish_reason == ("stop" if stopped else "length")


def test_engine_on_a_sharded_mesh_matches_one_device():
    model = make_model(seed=3)
    requests = [Request(task="spell", prompt=[1, 40 + i, 41, 3], max_new_tokens=6) for i in range(8)]
    one = make_engine(model, max_batch=8).generate(requests)
    engine = make_engine(model, max_batch=8, mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    sharded = engine.generate(requests)
    assert [g.tokens for g in one] == [g.tokens for g in sharded]
    # The decode cache, per layer keys [B, K, H, S] and values [B, K, S, H]: slots over data and fsdp,
    # kv heads over tensor.
    for layer in engine.engine.state.cache:
        assert layer.key.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
        assert layer.value.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)


def test_engine_classify_returns_distributions():
    engine = make_engine(make_model())
    scores = engine.score([Request(task="lang", prompt=[1, 9, 3]), Request(task="lang", prompt=[1, 9, 9, 9, 9, 3])])
    for s in scores:
        assert s.values.shape == (5,)
        np.testing.assert_allclose(s.values.sum(), 1.0, rtol=1e-5)
    assert not np.allclose(scores[0].values, scores[1].values)


def test_max_new_tokens_is_honoured():
    engine = make_engine(make_model())
    for n in (1, 3, 9):
        g = engine.generate([Request(task="spell", prompt=[1, 44, 3], max_new_tokens=n, temperature=1.0)])[0]
        assert len(g.tokens) <= n
        if g.finish_reason == "length":
            assert len(g.tokens) == n


def sampling(b, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    return decode.Sampling(
        jnp.full(b, temperature), jnp.full(b, top_k, jnp.int32), jnp.full(b, top_p), jnp.full(b, seed, jnp.uint32)
    )


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    allowed = jnp.ones(4, bool)
    positions = jnp.arange(512)
    greedy = decode.sample(logits, sampling(512, temperature=0.0), positions, allowed)
    assert (greedy == 0).all()
    top1 = decode.sample(logits, sampling(512, top_k=1), positions, allowed)
    assert (top1 == 0).all()
    top2 = np.asarray(decode.sample(logits, sampling(512, top_k=2), positions, allowed))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(decode.sample(logits, sampling(512, top_p=0.7), positions, allowed))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    free = np.asarray(decode.sample(logits, sampling(512), positions, allowed))
    assert abs((free == 0).mean() - 0.5) < 0.08 and (free == 3).any()
    banned = decode.sample(logits, sampling(512, temperature=0.0), positions, jnp.array([False, True, True, True]))
    assert (banned == 1).all()
    some = jnp.array([True, False, True, False])
    drawn = np.asarray(decode.sample(logits, sampling(512, temperature=2.0), positions, some))
    assert set(drawn.tolist()) == {0, 2}  # sampled rows never draw a banned token


def test_sampling_depends_on_seed_and_position_only():
    # Uniform logits: every token is as likely, so a new random key shows as a new token
    # (two keys give the same one with probability 1/50).
    v, rows = 50, 64
    logits = jnp.zeros((rows, v))
    allowed = jnp.ones(v, bool)

    def draws(seeds, positions):
        seeds, positions = np.broadcast_to(seeds, rows), np.broadcast_to(positions, rows)
        return np.asarray(
            decode.sample(
                logits, sampling(rows)._replace(seed=jnp.asarray(seeds, jnp.uint32)), jnp.asarray(positions), allowed
            )
        )

    same = draws(7, 3)
    assert (same == same[0]).all()  # one seed and position: one token, in every slot
    by_seed, by_position = draws(np.arange(rows), 3), draws(7, np.arange(rows))
    assert len(set(by_seed)) > 25 and len(set(by_position)) > 25  # either one changes the token
    assert by_seed[7] == by_position[3] == same[0]
    # A row's token is its own: its neighbours' seeds and positions change nothing.
    seeds, positions = np.arange(rows) % 5, np.arange(rows) % 3
    mixed = draws(seeds, positions)
    alone = [int(draws(s, p)[0]) for s, p in zip(seeds[:15], positions[:15])]
    assert mixed[:15].tolist() == alone
    np.testing.assert_array_equal(mixed, mixed[np.arange(rows) % 15])  # (seed, position) repeats every 15 rows


def test_top_k_keeps_exactly_the_k_largest():
    # Bisection over the values' bits against a sort, with ties, negatives and banned (-inf) entries.
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(6, 40)), 1).astype(np.float32)
    x[1, 5:] = -np.inf
    x[2] = 0.0
    top_k = np.array([1, 3, 7, 0, 40, 100], np.int32)
    kept = np.asarray(decode._top_k_filter(jnp.asarray(x), jnp.asarray(top_k)))
    for row, k in enumerate(top_k):
        kth = -np.inf if k == 0 else np.sort(x[row])[::-1][min(k, 40) - 1]
        np.testing.assert_array_equal(kept[row], np.where(x[row] >= kth, x[row], -np.inf))


def test_a_row_draws_the_same_whatever_its_neighbours_ask():
    # Filters run only when some row asks for them; a row that does not ask is left exactly as it was.
    logits = jax.random.normal(jax.random.key(1), (64, 50))
    positions = jnp.arange(64)
    allowed = jnp.ones(50, bool)
    plain = sampling(64, temperature=0.8, seed=3)
    alone = decode.sample(logits, plain, positions, allowed)
    crowd = plain._replace(top_k=plain.top_k.at[1::2].set(3), top_p=plain.top_p.at[1::2].set(0.5))
    mixed = decode.sample(logits, crowd, positions, allowed)
    np.testing.assert_array_equal(alone[::2], mixed[::2])
    assert not np.array_equal(alone[1::2], mixed[1::2])


def test_length_buckets():
    assert length_buckets(128) == (16, 32, 64, 128)
    assert length_buckets(96) == (16, 32, 64, 96)


def test_no_retrace_after_warm_up():
    engine = make_engine(make_model(), max_batch=4)
    warm = [Request(task="spell", prompt=[1, 40, 3]), Request(task="lang", prompt=[1, 40, 3])]
    engine.generate(warm[:1])
    engine.score(warm[1:])
    assert engine.engine.traces == {"prefill": 1, "insert": 1, "step": 1}
    rng = np.random.default_rng(0)
    for i in range(12):  # mixed tasks, lengths within the first bucket, sampling settings, batch sizes
        n = int(rng.integers(1, 7))
        reqs = [
            Request(
                task=str(rng.choice(["spell", "echo"])),
                prompt=[1] + rng.integers(4, 200, int(rng.integers(1, 14))).tolist() + [3],
                max_new_tokens=int(rng.integers(1, 12)),
                temperature=float(rng.choice([0.0, 0.8])),
                top_k=int(rng.integers(0, 5)),
                top_p=float(rng.choice([1.0, 0.9])),
                seed=i,
            )
            for _ in range(n)
        ]
        engine.generate(reqs)
        engine.score([Request(task="lang", prompt=[1, 5 + i, 3])] * n)
    assert engine.engine.traces == {"prefill": 1, "insert": 1, "step": 1}


def test_engine_spans_give_the_whole_caches_tokens_without_recompiling():
    # max_len 256: decode spans of 128 and 256 positions, both compiled at warm-up. Rows that cross
    # position 128 mid-run, next to short ones, get the tokens an engine reading the whole cache gets.
    cfg = dataclasses.replace(CFG, max_len=256)
    model = MultiTaskModel(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh("data=1", jax.devices()[:1])
    spanned = scheduler_over(model, mesh, max_batch=4, allowed_tokens=ALLOWED, eos_id=EOS, pad_id=0)
    whole = scheduler_over(model, mesh, max_batch=4, allowed_tokens=ALLOWED, eos_id=EOS, pad_id=0)
    whole.engine.spans = (256,)
    assert spanned.engine.spans == (128, 256)
    spanned.warmup()
    assert spanned.engine.traces["step"] == 2
    traces = dict(spanned.engine.traces)
    requests = [
        Request(task="spell", prompt=[1] + list(range(10, 130)) + [3], max_new_tokens=20),  # 122 + 20
        Request(task="echo", prompt=[1, 40, 41, 3], max_new_tokens=30, temperature=0.8, seed=2),
        Request(task="spell", prompt=[1] + list(range(50, 160)) + [3], max_new_tokens=24, temperature=1.0, seed=7),
        Request(task="echo", prompt=[1, 90, 3], max_new_tokens=6),
        Request(task="spell", prompt=[1, 60, 61, 62, 3], max_new_tokens=9),
    ]
    got, want = spanned.generate(requests), whole.generate(requests)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert spanned.engine.traces == traces  # nothing compiled after warm-up


def test_an_int8_cache_engine_serves_without_recompiling():
    mesh = make_mesh("data=1", jax.devices()[:1])
    sched = scheduler_over(
        make_model(), mesh, max_batch=4, allowed_tokens=ALLOWED, eos_id=EOS, pad_id=0, kv_dtype="int8"
    )
    sched.warmup()
    traces = dict(sched.engine.traces)
    cache = sched.engine.state.cache[0]
    assert cache.key.dtype == jnp.int8 and cache.key_scale.shape == (4, CFG.n_kv_heads, CFG.max_len)
    out = sched.generate([Request(task="spell", prompt=[1, 40 + i, 3], max_new_tokens=8) for i in range(6)])
    assert all(len(g.tokens) >= 1 for g in out)
    assert sched.engine.traces == traces
    per_slot = CFG.max_len * decode.cache_bytes_per_position(CFG, jnp.int8)
    assert sched.engine.cache_bytes() == 4 * per_slot


def test_slots_are_sized_from_the_kv_budget():
    per_slot = CFG.max_len * decode.cache_bytes_per_position(CFG, jnp.bfloat16)
    assert slots_that_fit(CFG, 32, "bfloat16", 0) == 32  # no budget: max_batch
    assert slots_that_fit(CFG, 32, "bfloat16", 5 * per_slot + per_slot // 2) == 5
    assert slots_that_fit(CFG, 4, "bfloat16", 100 * per_slot) == 4
    int8_slot = CFG.max_len * decode.cache_bytes_per_position(CFG, jnp.int8)
    assert slots_that_fit(CFG, 32, "int8", 5 * per_slot) == 5 * per_slot // int8_slot > 5
    with pytest.raises(ValueError, match=r"serve.kv_memory=0.0MiB holds no decode slot: one of 32 positions takes"):
        slots_that_fit(CFG, 32, "float32", 100)
    assert C.parse_bytes("2GiB", "x") == 2 << 30 and C.parse_bytes("1.5GB", "x") == 1_500_000_000
    assert C.parse_bytes("", "x") == 0 and C.parse_bytes("4096", "x") == 4096
    for bad in ("lots", "-1GiB", "2TiB", "0", "1e9"):
        with pytest.raises(ValueError, match=f"serve.kv_memory={bad!r} must be a positive size"):
            C.parse_bytes(bad, "serve.kv_memory")
