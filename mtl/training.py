"""Sharded train state, per-kind losses and the pure, jitted train step.

Parameters and optimizer state are created already sharded (see
:mod:`mtl.partition`): no device ever holds the whole model.
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
from mtl.model import MultiTaskModel, last_position
from mtl.partition import abstract_state, create_sharded
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


def create_train_state(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Initialises model and optimizer state directly into their shards on ``mesh``.

    Returns:
      The graph definition, the state, and the state's shardings.
    """
    return create_sharded(_train_state_fn(model_cfg, train_cfg), mesh)


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh):
    """(graphdef, abstract state with shardings, shardings): the target of a resume."""
    return abstract_state(_train_state_fn(model_cfg, train_cfg), mesh)


def _train_state_fn(model_cfg: ModelConfig, train_cfg: TrainConfig):
    tx = make_optimizer(train_cfg)
    return lambda: TrainState(MultiTaskModel(model_cfg, rngs=nnx.Rngs(train_cfg.seed)), tx)


# Losses, one per head kind. Each returns (scalar loss, metrics); the loop
# averages each metric over the steps of a log interval.


def generate_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    logits = model.lm_logits(hidden)  # [B, T, V]
    mask = batch["loss_mask"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / tokens
    correct = ((logits.argmax(-1) == batch["targets"]) * mask).sum()
    return loss, {"loss": loss, "token_accuracy": correct / tokens}


def classify_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    logits = model.classify_logits(task, hidden, batch["lengths"])  # [B, C]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def regress_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    head = model.heads[task]
    predicted = head.standardised(last_position(hidden, batch["lengths"]))  # [B]
    loss = jnp.mean(jnp.square(predicted - (batch["value"] - head.mean) / head.std))  # in standard units
    mse = jnp.mean(jnp.square(head.mean + head.std * predicted - batch["value"]))
    return loss, {"loss": loss, "mse": mse}


def tag_loss(model: MultiTaskModel, task: str, batch: Batch) -> tuple[jax.Array, dict]:
    hidden, _ = model(batch["tokens"], batch["task_id"])
    logits = model.tag_logits(task, hidden)  # [B, T, C]
    tags = batch["tags"]  # [B, T]: a tag id at each word's last byte, -1 elsewhere
    mask = (tags >= 0).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(tags, 0))
    words = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / words
    correct = ((logits.argmax(-1) == tags) * mask).sum()
    return loss, {"loss": loss, "tag_accuracy": correct / words}


LOSSES: dict[str, Callable[[MultiTaskModel, str, Batch], tuple[jax.Array, dict]]] = {
    "generate": generate_loss,
    "classify": classify_loss,
    "regress": regress_loss,
    "tag": tag_loss,
}


def train_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    batch: Batch,
    *,
    task: str,
    kind: str,
    weight: float = 1.0,
    uncertainty: bool = False,
):
    """One optimizer update on one task's batch: ``(state, batch) -> (state, metrics)``.

    The task's loss is scaled by its static ``weight``; with ``uncertainty``
    it is also scaled by a learned ``exp(-s)`` and ``s`` is added, ``s`` the
    task's log variance (Kendall et al., 2018). Metrics report the unscaled loss.
    """
    train_state = nnx.merge(graphdef, state)

    def loss_fn(model):
        loss, metrics = LOSSES[kind](model, task, batch)
        if uncertainty:
            log_var = model.task_log_var[...][model.task_index(task)]
            loss = jnp.exp(-log_var) * loss + log_var
            metrics["log_var"] = log_var
        return weight * loss, metrics

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(train_state.model)
    train_state.optimizer.update(train_state.model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return nnx.state(train_state), metrics


def batch_shardings(batch: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Every batch array is split along its leading (batch) axis."""
    return {k: named_sharding(("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), mesh) for k, v in batch.items()}


def compile_train_step(
    graphdef, shardings, mesh, example_batch: dict, *, task: str, kind: str, weight=1.0, uncertainty=False
):
    """The jitted step for one task, with explicit shardings and the state donated."""
    step = functools.partial(train_step, graphdef, task=task, kind=kind, weight=weight, uncertainty=uncertainty)
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
