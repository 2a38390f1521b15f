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

B, T, V = 8, 16, 384


def random_logits():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    logits = jax.random.normal(k1, (B, T, V)) * 4.0
    labels = jax.random.randint(k2, (B, T), 0, V)
    # Half the labels are the arg max, so the hit flags are not all 0.
    return logits, jnp.where(jax.random.bernoulli(k3, 0.5, (B, T)), logits.argmax(-1), labels)


def plain(logits, labels):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return nll, (logits.argmax(-1) == labels).astype(jnp.float32)


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2", "data=8"])
def test_equals_the_plain_loss_and_its_gradient(spec):
    logits, labels = random_logits()
    want_nll, want_top = plain(logits, labels)
    want_grad = jax.grad(lambda x: plain(x, labels)[0].sum())(logits)

    mesh = sharding.make_mesh(spec)
    x = jax.device_put(
        logits, NamedSharding(mesh, sharding.logical_to_spec(("batch", "length", "vocab"), (B, T, V), mesh))
    )
    with jax.set_mesh(mesh):
        nll, top = jax.jit(vocab_parallel.cross_entropy)(x, labels)
        grad = jax.jit(jax.grad(lambda x: vocab_parallel.cross_entropy(x, labels)[0].sum()))(x)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(top, want_top)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert 0 < float(top.sum()) < top.size  # some hits and some misses: the comparison means something


def test_without_a_mesh_it_is_the_plain_loss():
    logits, labels = random_logits()
    nll, top = vocab_parallel.cross_entropy(logits, labels)
    want_nll, want_top = plain(logits, labels)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(top, want_top)


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
    logits, labels = random_logits()
    x = jax.device_put(logits, NamedSharding(mesh, P("data", None, "tensor")))

    def gathered(x):
        whole = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None, None)))
        return plain(whole, labels)[0].sum()

    hlo = jax.jit(jax.grad(gathered)).lower(x).compile().as_text()
    assert logits_gathers(hlo, T)


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
