"""Per-kind losses against numpy references, and the loss weighting of the train step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import training
from mtl.config import tiny
from mtl.model import MultiTaskModel, last_position
from sharding import make_mesh
from tests.helpers import ALL_KINDS, tiny_model_config

CFG = tiny_model_config(heads=ALL_KINDS)
RNG = np.random.default_rng(0)
B, T = 4, 10


def make_model():
    return MultiTaskModel(CFG, rngs=nnx.Rngs(0))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def prompt_batch(task_id):
    tokens = RNG.integers(4, 200, (B, T)).astype(np.int32)
    lengths = np.array([10, 7, 3, 1], np.int32)
    return {"tokens": tokens, "lengths": lengths, "task_id": np.full(B, task_id, np.int32)}


BATCHES = {
    "generate": {
        "tokens": RNG.integers(4, 200, (B, T)).astype(np.int32),
        "targets": RNG.integers(4, 200, (B, T)).astype(np.int32),
        "loss_mask": (RNG.random((B, T)) < 0.5).astype(np.float32),
        "task_id": np.zeros(B, np.int32),
    },
    "classify": {**prompt_batch(1), "label": np.array([0, 4, 2, 1], np.int32)},
    "regress": {**prompt_batch(3), "value": np.array([2.0, -1.0, 5.5, 0.0], np.float32)},
    "tag": {
        **prompt_batch(4),
        "tags": np.where(RNG.random((B, T)) < 0.3, RNG.integers(0, 4, (B, T)), -1).astype(np.int32),
    },
}
TASKS = {"generate": "spell", "classify": "lang", "regress": "score", "tag": "pos"}


@pytest.mark.parametrize("kind", ["generate", "classify", "regress", "tag"])
def test_loss_matches_numpy(kind):
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in BATCHES[kind].items()}
    loss, _ = training.LOSSES[kind](model, TASKS[kind], batch)
    hidden = model(batch["tokens"], batch["task_id"])
    b = BATCHES[kind]
    if kind == "generate":
        logp = log_softmax(model.lm_logits(hidden))
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        expected = (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
    elif kind == "classify":
        logp = log_softmax(model.classify_logits("lang", hidden, batch["lengths"]))
        expected = -logp[np.arange(B), b["label"]].mean()
    elif kind == "regress":
        last = np.asarray(hidden)[np.arange(B), b["lengths"] - 1]  # [B, D]
        head = model.heads["score"]
        raw = last @ np.asarray(head.w_d[...]) + float(head.b[...])
        expected = np.mean((raw - (b["value"] - 2.0) / 3.0) ** 2)  # standard units: mean 2, std 3
        served = model.head_outputs(hidden, batch["lengths"])["score"]
        np.testing.assert_allclose(served, 2.0 + 3.0 * raw, rtol=1e-5)
    else:
        logp = log_softmax(model.tag_logits("pos", hidden))
        mask = b["tags"] >= 0
        expected = -logp[mask, b["tags"][mask]].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_head_outputs_by_kind():
    model = make_model()
    batch = prompt_batch(1)
    hidden = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["task_id"]))
    out = model.head_outputs(hidden, jnp.asarray(batch["lengths"]))
    assert set(out) == {"lang", "score", "pos"}
    assert out["lang"].shape == (B, 5) and out["score"].shape == (B,) and out["pos"].shape == (B, T, 4)
    np.testing.assert_allclose(out["pos"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(last_position(hidden, jnp.array([10, 7, 3, 1]))[2], hidden[2, 2])


def grads_of(weight, uncertainty, log_var=0.0):
    model = make_model()
    model.task_log_var[...] = jnp.full_like(model.task_log_var[...], log_var)
    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in BATCHES["classify"].items()}

    def loss(state):
        m = nnx.merge(graphdef, state)
        base, _ = training.LOSSES["classify"](m, "lang", batch)
        if uncertainty:
            s = m.task_log_var[...][m.task_index("lang")]
            base = jnp.exp(-s) * base + s
        return weight * base, base

    return jax.grad(loss, has_aux=True)(state)


def test_static_weight_scales_the_gradient():
    """grad(3 L) = 3 grad(L), up to float32 rounding.

    The two backward passes round differently at every operation. Each gradient
    element is a sum of at most N products, N the longest reduction of the
    backward pass (the batch's tokens, the model width or the MLP width), and a
    float32 sum of N terms is off by at most N * eps times the terms' magnitude,
    here taken as the leaf's largest element. (A fixed atol of 1e-7 failed on an
    AVX-512 CPU by 1.18e-7: issue 26.) The bound is still 1/4 of what a weight
    off by 1e-4 would show.
    """
    (g1, _), (g3, _) = grads_of(1.0, False), grads_of(3.0, False)
    n = max(B * T, CFG.d_model, CFG.d_ff)
    eps = float(np.finfo(np.float32).eps)
    assert n * eps < 1e-4 / 4
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g3)):
        b = np.asarray(b, np.float64)
        bound = n * eps * float(np.abs(b).max(initial=0.0))
        np.testing.assert_allclose(3.0 * np.asarray(a, np.float64), b, rtol=0, atol=bound, err_msg=str(path))


def test_train_step_applies_weighting():
    """Weight 0 leaves every parameter but the optimizer count unchanged; uncertainty learns log variances."""
    # No weight decay: it shrinks weights whatever the gradient.
    train_cfg = dataclasses.replace(tiny().train, steps=5, warmup_steps=1, weight_decay=0.0)
    mesh = make_mesh("data=1", jax.devices()[:1])
    batch = BATCHES["classify"]

    def after_step(**kw):
        graphdef, state, shardings = training.create_train_state(CFG, train_cfg, mesh)
        before = jax.tree.map(np.asarray, state["model"])
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="lang", kind="classify", **kw)
        for _ in range(2):
            state, metrics = step(state, training.put_batch(batch, mesh))
        return before, jax.tree.map(np.asarray, state["model"]), metrics

    before, after, _ = after_step(weight=0.0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    before, after, metrics = after_step(uncertainty=True)
    moved = np.asarray(after["task_log_var"][...]) - np.asarray(before["task_log_var"][...])
    assert moved[1] != 0 and np.all(moved[[0, 2, 3, 4]] == 0)  # only the trained task's scale
    assert "log_var" in metrics


# --- memory and speed options: the same update, computed another way --------

STEP_CFG = tiny_model_config()
STEP_TRAIN = dataclasses.replace(tiny().train, steps=3, batch_size=8)


@functools.cache
def three_steps(model_cfg=STEP_CFG, spec="data=1", grad_accum=1):
    """Losses and final parameters of 3 generate/classify steps on fixed batches."""
    from tests.test_sharding import SCHEDULE, fixed_batches

    devices = jax.devices()[:1] if spec == "data=1" else jax.devices()
    mesh = make_mesh(spec, devices)
    batches = fixed_batches()
    graphdef, state, shardings = training.create_train_state(model_cfg, STEP_TRAIN, mesh)
    losses = []
    with jax.set_mesh(mesh):
        steps = {
            kind: training.compile_train_step(
                graphdef, shardings, mesh, batches[kind], task=task, kind=kind, grad_accum=grad_accum
            )
            for task, kind in dict(SCHEDULE).items()
        }
        for _, kind in SCHEDULE:
            state, metrics = steps[kind](state, training.put_batch(batches[kind], mesh))
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state["model"])


def assert_same_training(got, want, rtol=1e-5):
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam amplifies f32 noise; see test_sharding


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_training(remat):
    assert_same_training(three_steps(dataclasses.replace(STEP_CFG, remat=remat)), three_steps())


def test_remat_saves_activation_memory():
    """Compiled for a longer sequence, full remat needs less scratch memory than keeping everything."""
    cfg = dataclasses.replace(STEP_CFG, n_layers=4, max_len=256)
    batch = {
        "tokens": np.ones((8, 256), np.int32),
        "targets": np.ones((8, 256), np.int32),
        "loss_mask": np.ones((8, 256), np.float32),
        "task_id": np.zeros(8, np.int32),
    }
    mesh = make_mesh("data=1", jax.devices()[:1])

    def scratch(remat):
        model_cfg = dataclasses.replace(cfg, remat=remat)
        graphdef, state, shardings = training.create_train_state(model_cfg, STEP_TRAIN, mesh)
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
        return step.lower(state, training.put_batch(batch, mesh)).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = scratch("none"), scratch("dots"), scratch("full")
    assert full < dots < none, (none, dots, full)


@pytest.mark.parametrize("grad_accum, spec", [(2, "data=1"), (4, "data=1"), (2, "data=2,fsdp=2,tensor=2")])
def test_gradient_accumulation_gives_the_same_training(grad_accum, spec):
    assert_same_training(three_steps(spec=spec, grad_accum=grad_accum), three_steps())


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 activations change the losses only by bf16 rounding; bf16 parameters are stored as bf16."""
    want, _ = three_steps()
    got, _ = three_steps(dataclasses.replace(STEP_CFG, dtype="bfloat16"))
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert got != want  # it did compute in bf16

    losses, params = three_steps(dataclasses.replace(STEP_CFG, dtype="bfloat16", param_dtype="bfloat16"))
    np.testing.assert_allclose(losses, want, rtol=5e-2)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
