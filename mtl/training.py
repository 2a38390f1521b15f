"""Sharded train state, per-kind losses and the pure, jitted train step.

Parameters and optimizer state are created already sharded: the model is
traced with ``nnx.eval_shape``, its logical axis names are resolved against
the mesh by ``sharding.RULES``, and ``jax.jit(init, out_shardings=...)``
materialises every shard where it lives, so no device ever holds the whole
model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtl.config import ModelConfig, TrainConfig
from mtl.model import MultiTaskModel
from sharding import named_sharding

Batch = dict[str, jax.Array]


class TrainState(nnx.Module):
    """The model and its optimizer; ``optimizer.step`` counts updates."""

    def __init__(self, model: MultiTaskModel, tx: optax.GradientTransformation):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay; no weight decay on vectors (norms, biases)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 1)),
        decay_steps=max(cfg.steps, 2),
        end_value=cfg.learning_rate * 0.1,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for every Variable of ``state``, from its logical axis names."""

    def leaf(variable: nnx.Variable):
        shape = variable.shape
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        return variable.replace(named_sharding(axes, shape, mesh))

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int) -> MultiTaskModel:
    """A model whose parameters are initialised directly into their shards."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MultiTaskModel(cfg, rngs=nnx.Rngs(seed))))

    @functools.partial(jax.jit, out_shardings=state_shardings(abstract, mesh))
    def init():
        return nnx.state(MultiTaskModel(cfg, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, init())


def create_train_state(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Initialises model and optimizer state, sharded over ``mesh``.

    Returns:
      The graph definition, the state, and the state's shardings.
    """
    tx = make_optimizer(train_cfg)
    make = lambda: TrainState(MultiTaskModel(model_cfg, rngs=nnx.Rngs(train_cfg.seed)), tx)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return graphdef, state, shardings


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh):
    """Shapes, dtypes and shardings of the train state, without computing it (for restores)."""
    tx = make_optimizer(train_cfg)
    make = lambda: TrainState(MultiTaskModel(model_cfg, rngs=nnx.Rngs(0)), tx)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return graphdef, abstract, shardings


# Losses, one per head kind. Each returns (scalar loss, metrics); metrics are
# sums and counts so that they average correctly over any number of steps.


def generate_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    logits = model.lm_logits(hidden)  # [B, T, V]
    mask = batch["loss_mask"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / tokens
    correct = ((logits.argmax(-1) == batch["targets"]) * mask).sum()
    return loss, {"loss": loss, "token_accuracy": correct / tokens, "target_tokens": mask.sum()}


def classify_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    logits = model.classify_logits(task, hidden, batch["lengths"])  # [B, C]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"loss": loss, "accuracy": accuracy, "target_tokens": jnp.float32(batch["label"].shape[0])}


LOSSES: dict[str, Callable[[MultiTaskModel, str, Batch], tuple[jax.Array, dict]]] = {
    "generate": generate_loss,
    "classify": classify_loss,
}


def train_step(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, *, task: str, kind: str):
    """One optimizer update on one task's batch: ``(state, batch) -> (state, metrics)``."""
    train_state = nnx.merge(graphdef, state)

    def loss_fn(model):
        return LOSSES[kind](model, task, batch)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(train_state.model)
    train_state.optimizer.update(train_state.model, grads)
    metrics["grad_norm"] = optax.global_norm(grads)
    return nnx.state(train_state), metrics


def batch_shardings(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Every batch array is split along its leading (batch) axis."""
    return {
        k: named_sharding(("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), mesh) for k, v in batch.items()
    }


def compile_train_step(graphdef, shardings, mesh, example_batch: dict, *, task: str, kind: str):
    """The jitted step for one task, with explicit shardings and the state donated."""
    if kind not in LOSSES:
        raise ValueError(f"task {task!r} has kind {kind!r}, which training does not support yet")
    step = functools.partial(train_step, graphdef, task=task, kind=kind)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings(example_batch, mesh)),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> Batch:
    """Places this process's share of a global batch on the mesh."""
    shardings = batch_shardings(batch, mesh)
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
