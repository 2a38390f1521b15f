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

from mtl import adapters
from mtl.config import ModelConfig, TrainConfig
from mtl.model import MultiTaskModel, last_position
from mtl.partition import abstract_state, create_sharded
from sharding import named_sharding, vocab_parallel

Batch = dict[str, jax.Array]


class TrainState(nnx.Module):
    """The model and its optimizer; ``optimizer.step`` counts updates.

    ``optimizer.wrt`` filters what trains (:func:`trainable`): the step takes
    gradients of those parameters only and the optimizer keeps state for them only.
    """

    def __init__(self, model: MultiTaskModel, tx: optax.GradientTransformation, wrt=nnx.Param):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)


def trainable(cfg: TrainConfig):
    """The nnx filter of the parameters ``train.trainable`` trains: every one, or adapters, heads and task embeddings.

    A filter rather than ``optax.multi_transform`` with frozen labels: the
    frozen backbone then has no optimizer state at all (not even empty
    placeholders to checkpoint) and the step computes no gradient for it.
    """
    if cfg.trainable == "all":
        return nnx.Param
    return nnx.All(nnx.Param, adapters.Trainable())


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
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh, params: nnx.State | None = None
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Initialises model and optimizer state directly into their shards on ``mesh``.

    Args:
      params: the model's parameters to start from (a pretrained model, laid
        out on ``mesh``; they are donated); default a random initialisation.

    Returns:
      The graph definition, the state, and the state's shardings.
    """
    if params is None:
        return create_sharded(_train_state_fn(model_cfg, train_cfg), mesh)
    graphdef, _, shardings = abstract_state(_train_state_fn(model_cfg, train_cfg), mesh)
    model_def = nnx.graphdef(nnx.eval_shape(lambda: MultiTaskModel(model_cfg, rngs=nnx.Rngs(0))))
    tx = make_optimizer(train_cfg)
    start = jax.jit(
        lambda p: nnx.state(TrainState(nnx.merge(model_def, p), tx, trainable(train_cfg))),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return graphdef, start(params), shardings


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: jax.sharding.Mesh):
    """(graphdef, abstract state with shardings, shardings): the target of a resume."""
    return abstract_state(_train_state_fn(model_cfg, train_cfg), mesh)


def _train_state_fn(model_cfg: ModelConfig, train_cfg: TrainConfig):
    tx = make_optimizer(train_cfg)
    return lambda: TrainState(MultiTaskModel(model_cfg, rngs=nnx.Rngs(train_cfg.seed)), tx, trainable(train_cfg))


# Losses, one per head kind. Each takes the step's ``total``, the number of
# items its loss averages over in the whole batch (tokens, rows or words, from
# ``TOTALS``; by default this batch's own), and returns (sum over this batch / total, metrics likewise).
# Dividing by the step's total rather than the micro-batch's own count makes
# the micro-batches of gradient accumulation add up to the full batch's loss.
# The loop averages each metric over the steps of a log interval.


# A packed batch (``tasks.packing``) adds ``positions`` and ``segment_ids`` for the backbone, and holds the
# one-value-an-example arrays of classify and regress as [R, E] slots, with ``examples`` marking the full ones;
# the per-token arrays keep their meaning. The losses read both layouts alike.


def backbone(model: MultiTaskModel, batch: Batch) -> jax.Array:
    """The batch's final hidden states [B, T, D]; a packed batch's examples each attend within themselves."""
    return model(batch["tokens"], batch["task_id"], batch.get("positions"), batch.get("segment_ids"))


def _examples(batch: Batch, values: jax.Array) -> jax.Array:
    """1.0 where per-example ``values`` hold an example: all of an unpacked batch, a packed one's full slots."""
    return batch["examples"] if "examples" in batch else jnp.ones(values.shape, jnp.float32)


def generate_loss(model: MultiTaskModel, task: str, batch: Batch, total=None) -> tuple[jax.Array, dict]:
    total = TOTALS["generate"](batch) if total is None else total
    hidden = backbone(model, batch)
    # Blockwise from the hidden states: no [B, T, V] logits are ever held (nor gathered under a mesh).
    loss, hits = vocab_parallel.cross_entropy(hidden, model.lm_head(), batch["targets"], batch["loss_mask"] / total)
    return loss, {"loss": loss, "token_accuracy": hits}


def classify_loss(model: MultiTaskModel, task: str, batch: Batch, total=None) -> tuple[jax.Array, dict]:
    total = TOTALS["classify"](batch) if total is None else total
    hidden = backbone(model, batch)
    logits = model.classify_logits(task, hidden, batch["lengths"])  # [B, C]; packed [R, E, C]
    examples = _examples(batch, batch["label"])
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * examples).sum() / total
    accuracy = ((logits.argmax(-1) == batch["label"]) * examples).sum() / total
    return loss, {"loss": loss, "accuracy": accuracy}


def regress_loss(model: MultiTaskModel, task: str, batch: Batch, total=None) -> tuple[jax.Array, dict]:
    total = TOTALS["regress"](batch) if total is None else total
    hidden = backbone(model, batch)
    head = model.heads[task]
    predicted = head.standardised(last_position(hidden, batch["lengths"]))  # [B]; packed [R, E]
    examples = _examples(batch, batch["value"])
    loss = jnp.sum(examples * jnp.square(predicted - (batch["value"] - head.mean) / head.std)) / total  # std units
    mse = jnp.sum(examples * jnp.square(head.mean + head.std * predicted - batch["value"])) / total
    return loss, {"loss": loss, "mse": mse}


def tag_loss(model: MultiTaskModel, task: str, batch: Batch, total=None) -> tuple[jax.Array, dict]:
    total = TOTALS["tag"](batch) if total is None else total
    hidden = backbone(model, batch)
    logits = model.tag_logits(task, hidden)  # [B, T, C]
    tags = batch["tags"]  # [B, T]: a tag id at each word's last byte, -1 elsewhere
    mask = (tags >= 0).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(tags, 0))
    loss = (nll * mask).sum() / total
    correct = ((logits.argmax(-1) == tags) * mask).sum()
    return loss, {"loss": loss, "tag_accuracy": correct / total}


LOSSES: dict[str, Callable[..., tuple[jax.Array, dict]]] = {
    "generate": generate_loss,
    "classify": classify_loss,
    "regress": regress_loss,
    "tag": tag_loss,
}

# What each kind's loss averages over, counted in a whole batch (at least 1).
TOTALS: dict[str, Callable[[Batch], jax.Array]] = {
    "generate": lambda batch: jnp.maximum(batch["loss_mask"].sum(), 1.0),
    "classify": lambda batch: _examples(batch, batch["label"]).sum(),
    "regress": lambda batch: _examples(batch, batch["value"]).sum(),
    "tag": lambda batch: jnp.maximum((batch["tags"] >= 0).sum().astype(jnp.float32), 1.0),
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
    grad_accum: int = 1,
):
    """One optimizer update on one task's batch: ``(state, batch) -> (state, metrics)``.

    The task's loss is scaled by its static ``weight``; with ``uncertainty``
    it is also scaled by a learned ``exp(-s)`` and ``s`` is added, ``s`` the
    task's log variance (Kendall et al., 2018). Metrics report the unscaled loss.

    With ``grad_accum`` > 1 the batch is cut into that many micro-batches
    (rows ``i, i + k, i + 2k, ...``, so each spans every device of the batch
    axes), their gradients are summed in a ``lax.scan``, and one update is
    made: the same update as the whole batch at once, holding the activations
    of one micro-batch at a time.

    A non-finite loss or gradient norm leaves the state as it was (the update
    is skipped inside the step) and sets ``metrics["skipped"]`` to 1.
    """
    train_state = nnx.merge(graphdef, state)
    model_def, params, rest = nnx.split(train_state.model, train_state.optimizer.wrt, ...)
    total = TOTALS[kind](batch)

    def loss_fn(params, micro):
        model = nnx.merge(model_def, params, rest)
        loss, metrics = LOSSES[kind](model, task, micro, total)
        if uncertainty:
            log_var = model.task_log_var[...][model.task_index(task)]
            loss = jnp.exp(-log_var) * loss + log_var / grad_accum  # the log_var terms add up to one
        return weight * loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(params, batch)
    else:
        micro_batches = jax.tree.map(lambda x: _micro_batches(x, grad_accum), batch)

        def accumulate(sums, micro):
            (_, metrics), grads = grad_fn(params, micro)
            return jax.tree.map(jnp.add, sums, (grads, metrics)), None

        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))),
        )
        (grads, metrics), _ = jax.lax.scan(accumulate, (zeros[1], zeros[0][1]), micro_batches)
    if uncertainty:
        metrics["log_var"] = params["task_log_var"][...][train_state.model.task_index(task)]
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A non-finite loss or gradient is caught here, before it reaches the weights: the
    # update is skipped on the device and ``skipped`` says so, for the loop to read
    # when it next fetches metrics (no host sync of its own).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])

    def update(state, grads):
        train_state = nnx.merge(graphdef, state)
        train_state.optimizer.update(train_state.model, grads)
        return nnx.state(train_state)

    # A select rather than lax.cond: XLA fuses it into the update's own elementwise pass, where a
    # conditional cost the small preset 2-6% a step (measured with the train step of HEAD beside both).
    # The old values are taken as arrays first: the update writes through the state's variables.
    old, treedef = jax.tree.flatten(state)
    new = jax.tree.leaves(update(state, grads))
    state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(new, old)])
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return state, metrics


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (checked before a checkpoint is written)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], micro-batch ``i`` holding rows ``i, i + k, ...``."""
    micro = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    return jnp.swapaxes(micro, 0, 1)


def batch_shardings(
    batch: dict[str, Any], mesh: jax.sharding.Mesh, batch_size: int | None = None
) -> dict[str, jax.sharding.NamedSharding]:
    """Every batch array is split along its leading (batch) axis.

    Args:
      batch: arrays (or anything with ``shape``) whose leading axis is the batch.
      mesh: the mesh.
      batch_size: the global B, when ``batch`` holds only one process's rows;
        default: the arrays' own leading size. Which mesh axes split the batch
        depends on B, so every process must ask for the global one.
    """

    def sharding(value):
        shape = np.shape(value)
        shape = (batch_size or shape[0], *shape[1:])
        return named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)

    return {k: sharding(v) for k, v in batch.items()}


def compile_train_step(
    graphdef,
    shardings,
    mesh,
    example_batch: dict,
    *,
    task: str,
    kind: str,
    weight=1.0,
    uncertainty=False,
    grad_accum=1,
):
    """The jitted step for one task, with explicit shardings and the state donated."""
    step = functools.partial(
        train_step, graphdef, task=task, kind=kind, weight=weight, uncertainty=uncertainty, grad_accum=grad_accum
    )
    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings(example_batch, mesh)),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, batch_size: int | None = None) -> Batch:
    """Places this process's share of a global batch on the mesh.

    Args:
      batch: this process's rows of the global batch: those that
        ``sharding.mesh.process_rows(batch_size, mesh)`` names, in that order
        (on one process, the whole batch).
      mesh: the mesh; its devices span every process.
      batch_size: the global B; default: the rows here times the process
        count, each process holding an equal contiguous share.
    """
    rows = len(next(iter(batch.values())))
    batch_size = batch_size or rows * jax.process_count()
    shardings = batch_shardings(batch, mesh, batch_size)
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size, *np.shape(v)[1:]))
        for k, v in batch.items()
    }
