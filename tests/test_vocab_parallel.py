"""The shard_map vocabulary-parallel cross-entropy: equal to the plain loss, and no [B, T, V] gather."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
from mtl import training
from sharding import vocab_parallel
from tests.test_sharding import MODEL, TRAIN, fixed_batches

B, T, D, V = 8, 16, 32, 384


def random_problem():
    """Hidden states, head, labels and token weights; half the labels are the arg max (hits and misses)."""
    k = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(k[0], (B, T, D))
    w_dv = jax.random.normal(k[1], (D, V)) * 0.5
    labels = jax.random.randint(k[2], (B, T), 0, V)
    labels = jnp.where(jax.random.bernoulli(k[3], 0.5, (B, T)), (hidden @ w_dv).argmax(-1), labels)
    weights = (jax.random.uniform(k[4], (B, T)) < 0.7) / 10.0  # a mask over a total
    return hidden, w_dv, labels, weights


def plain(hidden, w_dv, labels, weights):
    """The reference: whole f32 logits and optax's cross-entropy."""
    logits = hidden @ w_dv
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (nll * weights).sum(), ((logits.argmax(-1) == labels) * weights).sum()


def close(got, want, rel=1e-6):
    """Equal within ``rel`` of the reference's largest magnitude (f32 sums differ in order only)."""
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * float(np.abs(want).max()))


# block_bytes: one block of 8 tokens (16 blocks, the last one part padding-free), 24 tokens (6 blocks, the
# last padded) and the default (one block): the scan's seams and padding must not change the result.
@pytest.mark.parametrize("block_bytes", [4 * V * 8, 4 * V * 24, vocab_parallel.BLOCK_BYTES])
def test_blockwise_loss_equals_the_plain_loss_and_its_gradients(block_bytes):
    hidden, w_dv, labels, weights = random_problem()
    want, want_hits = plain(hidden, w_dv, labels, weights)
    want_dh, want_dw = jax.grad(lambda h, w: plain(h, w, labels, weights)[0], (0, 1))(hidden, w_dv)

    def loss(h, w):
        return vocab_parallel.cross_entropy(h, w, labels, weights, block_bytes=block_bytes)

    (got, hits), (dh, dw) = jax.jit(loss)(hidden, w_dv), jax.jit(jax.grad(lambda h, w: loss(h, w)[0], (0, 1)))(
        hidden, w_dv
    )
    close(got, want)
    close(hits, want_hits)
    close(dh, want_dh)
    close(dw, want_dw)
    assert 0 < float(hits) < float(weights.sum())  # some hits and some misses: the comparison means something


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2", "data=8"])
def test_under_a_mesh_it_equals_the_unsharded_loss_and_gradients(spec):
    hidden, w_dv, labels, weights = random_problem()
    block_bytes = 4 * V * 8  # several blocks on every device
    want = vocab_parallel.cross_entropy(hidden, w_dv, labels, weights, block_bytes=block_bytes)
    want_grads = jax.grad(
        lambda h, w: vocab_parallel.cross_entropy(h, w, labels, weights, block_bytes=block_bytes)[0], (0, 1)
    )(hidden, w_dv)

    mesh = sharding.make_mesh(spec)
    h_spec = sharding.logical_to_spec(("batch", "length", "embed"), (B, T, D), mesh)
    h = jax.device_put(hidden, NamedSharding(mesh, h_spec))
    w = jax.device_put(w_dv, NamedSharding(mesh, sharding.logical_to_spec(("embed", "vocab"), (D, V), mesh)))

    def loss(h, w):
        return vocab_parallel.cross_entropy(h, w, labels, weights, block_bytes=block_bytes)

    with jax.set_mesh(mesh):
        got = jax.jit(loss)(h, w)
        grads = jax.jit(jax.grad(lambda h, w: loss(h, w)[0], (0, 1)))(h, w)
    for g, ref in zip((*got, *grads), (*want, *want_grads)):
        close(g, ref)


def logits_gathers(hlo: str, length: int) -> list[str]:
    """Shapes of the all-gathers in compiled HLO that assemble [b, T, v] logits-like blocks."""
    shapes = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo)
    found = []
    for shape in shapes:
        dims = [int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d]
        if len(dims) == 3 and dims[1] == length:
            found.append(shape)
    return found


def test_the_detector_sees_a_gathered_logits_array():
    """The check below is not vacuous: an explicit gather of the logits is found."""
    mesh = sharding.make_mesh("data=2,tensor=4")
    hidden, w_dv, labels, weights = random_problem()
    x = jax.device_put(hidden @ w_dv, NamedSharding(mesh, P("data", None, "tensor")))

    def gathered(x):
        whole = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None, None)))
        return (optax.softmax_cross_entropy_with_integer_labels(whole, labels) * weights).sum()

    hlo = jax.jit(jax.grad(gathered)).lower(x).compile().as_text()
    assert logits_gathers(hlo, T)


def vocabulary_arrays(hlo: str, vocab: int) -> dict[str, int]:
    """Every array shape in compiled HLO with a ``vocab``-long axis -> the product of its other axes."""
    found = {}
    for shape in re.findall(r"\b(?:f32|bf16|f16|pred|s32)\[([\d,]+)\]", hlo):
        dims = [int(d) for d in shape.split(",")]
        if vocab in dims:
            found[shape] = int(np.prod(dims)) // vocab
    return found


def test_no_array_holds_more_than_a_block_of_logits():
    """Forward and backward, compiled: no [tokens, V] array, only [block, V] ones (and the [D, V] head)."""
    hidden, w_dv, labels, weights = random_problem()
    block = 64  # of B * T = 128 tokens; D = 32 < 64 rows
    loss = jax.jit(
        jax.value_and_grad(
            lambda h, w: vocab_parallel.cross_entropy(h, w, labels, weights, block_bytes=4 * V * block)[0], (0, 1)
        )
    )
    found = vocabulary_arrays(loss.lower(hidden, w_dv).compile().as_text(), V)
    assert found and max(found.values()) <= block, found
    whole = jax.jit(jax.value_and_grad(lambda h, w: plain(h, w, labels, weights)[0], (0, 1)))
    assert max(vocabulary_arrays(whole.lower(hidden, w_dv).compile().as_text(), V).values()) >= B * T  # the check bites


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_train_step_never_gathers_the_logits(spec):
    mesh = sharding.make_mesh(spec)
    batch = fixed_batches()["generate"]
    assert batch["tokens"].shape[1] == T
    graphdef, state, shardings = training.create_train_state(MODEL, TRAIN, mesh)
    with jax.set_mesh(mesh):
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
        hlo = step.lower(state, training.put_batch(batch, mesh)).compile().as_text()
    assert "all-reduce" in hlo  # the loss's collectives are there (the max, the sum of exps, the label's logit)
    assert logits_gathers(hlo, T) == []


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,fsdp=2,tensor=2", "data=8"])
def test_embedding_look_up_equals_a_gather_and_its_gradient(spec):
    table = jax.random.normal(jax.random.key(1), (V, 32))
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    cotangent = jax.random.normal(jax.random.key(3), (B, T, 32))
    want = jnp.take(table, tokens, axis=0)
    want_grad = jax.grad(lambda w: jnp.sum(jnp.take(w, tokens, axis=0) * cotangent))(table)

    mesh = sharding.make_mesh(spec)
    w = jax.device_put(table, NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), table.shape, mesh)))
    with jax.set_mesh(mesh):
        got = jax.jit(vocab_parallel.embed)(w, tokens)
        grad = jax.jit(jax.grad(lambda w: jnp.sum(vocab_parallel.embed(w, tokens) * cotangent)))(w)
    np.testing.assert_array_equal(got, want)  # exact: one shard holds each row, the others add zeros
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_model_input_has_no_one_hot_over_the_vocabulary():
    from flax import nnx

    from mtl.model import MultiTaskModel

    model = MultiTaskModel(MODEL, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((B, T), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda t: model.embed(t, jnp.zeros(B, jnp.int32), jnp.zeros((B, T), jnp.int32)))(tokens)
    shapes = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]
    assert not [s for s in shapes if MODEL.vocab_size in s and len(s) == 3], shapes  # no [B, T, V] array
