"""The multi-task model: one scanned Transformer backbone and a head per task.

A task conditions the backbone through a learned task embedding added at the
first position (the BOS token), so every later position can read it through
attention. Generation tasks share the language-model head (tied to the token
embedding by default); each classification task has its own classifier over
the hidden state of the prompt's last real token, each regression task a
scalar head there, and each tagging task a classifier at every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtl import act_btd, act_btv
from mtl.config import HeadConfig, ModelConfig
from mtl.layers import Block, RMSNorm, contract, normal, param
from sharding import constrain, vocab_parallel


class Classifier(nnx.Module):
    """A linear classifier over one task's labels or tags: [..., D] -> [..., C], in f32."""

    def __init__(self, cfg: ModelConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        c = head.num_classes
        self.w_dc = param(rngs, normal(cfg.d_model**-0.5), (cfg.d_model, c), ("embed", "classes"), pd)
        self.b_c = param(rngs, jax.nn.initializers.zeros, (c,), ("classes",), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = contract("...D,DC->...C", x.astype(jnp.float32), self.w_dc[...].astype(jnp.float32))
        return logits + self.b_c[...].astype(jnp.float32)


class Regressor(nnx.Module):
    """A scalar head: [B, D] -> [B], in the units of the task's targets.

    It predicts a standardised value and maps it back with the training
    targets' mean and standard deviation (fixed in the head's config), so its
    loss has the same scale as the other tasks' whatever the units.
    """

    def __init__(self, cfg: ModelConfig, head: HeadConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        # Zero at start: the head first predicts the mean, so an untrained head
        # cannot send large squared errors back into the shared backbone.
        self.w_d = param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("embed",), pd)
        self.b = param(rngs, jax.nn.initializers.zeros, (), (), pd)
        self.mean, self.std = head.value_mean, head.value_std

    def standardised(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) @ self.w_d[...].astype(jnp.float32) + self.b[...].astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mean + self.std * self.standardised(x)


HEADS = {"classify": Classifier, "regress": Regressor, "tag": Classifier}

# ``model.remat`` -> the policy of ``jax.checkpoint`` around each layer. Every
# projection is one 2-D matmul (``contract``), which is what "dots with no
# batch dims" saves.
REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class MultiTaskModel(nnx.Module):
    """Decoder-only backbone with per-task heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v = cfg.d_model, cfg.vocab_size
        pd = jnp.dtype(cfg.param_dtype)
        # Embeddings are drawn at 1/sqrt(D) and scaled up by sqrt(D) on input,
        # so the tied output logits start at unit scale.
        self.embed_vd = param(rngs, normal(d**-0.5), (v, d), ("vocab", "embed"), pd)
        self.task_embed = param(rngs, normal(d**-0.5), (max(len(cfg.heads), 1), d), ("tasks", "embed"), pd)
        # log sigma^2 of each task's loss, learned under train.loss_weighting=uncertainty, else unused.
        self.task_log_var = param(rngs, jax.nn.initializers.zeros, (max(len(cfg.heads), 1),), ("tasks",), pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every parameter gains a leading [L] axis
        self.final_norm = RMSNorm(d, cfg.norm_eps, pd, cfg.norm_offset, rngs=rngs)
        if not cfg.tie_embeddings:
            self.w_dv = param(rngs, normal(d**-0.5), (d, v), ("embed", "vocab"), pd)
        # Generation tasks share the LM head; every other task has its own.
        self.heads = nnx.Dict({h.task: HEADS[h.kind](cfg, h, rngs=rngs) for h in cfg.heads if h.kind != "generate"})

    def task_index(self, task: str) -> int:
        return self.cfg.task_names.index(task)

    def __call__(
        self,
        tokens: jax.Array,
        task_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Runs the backbone over whole sequences: one scan over the stacked layers.

        Serving runs the same Blocks one by one, keeping their KV caches (see
        :func:`mtl.decode.forward`).

        Args:
          tokens: [B, T] token ids.
          task_ids: [B] index of each row's task in ``cfg.heads``.
          positions: [B, T] absolute positions; default ``0..T-1``. A packed
            row's restart at 0 with each example, so each gets the task embedding.
          segment_ids: [B, T] a packed row's example of each token
            (``tasks.packing``): attention stays within each example.

        Returns:
          The final-normed hidden states [B, T, D].
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens, task_ids, positions)

        graphdef, layers = nnx.split(self.blocks)

        def layer(x, layer_params_and_index):
            layer_params, index = layer_params_and_index
            block = nnx.merge(graphdef, layer_params)
            x, _ = block(x, positions, None, index, task_ids, segment_ids=segment_ids)  # keys and values not kept
            return x, None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(layer, x, (layers, jnp.arange(cfg.n_layers)), unroll=cfg.scan_unroll)
        return self.final_norm(x)

    def embed(self, tokens: jax.Array, task_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """The backbone's input: token embeddings, plus the task's embedding at position 0.

        tokens, positions: [B, T]; task_ids: [B]. Returns [B, T, D].
        """
        dt = jnp.dtype(self.cfg.dtype)
        # A gather, vocabulary-parallel under a mesh that splits the table (sharding.vocab_parallel.embed): a
        # one-hot matmul would cost a [B, T, V] array and V multiply-adds a token (151,936 for Qwen).
        scale = jnp.asarray(self.cfg.d_model**0.5 if self.cfg.scale_embeddings else 1.0, dt)
        x = vocab_parallel.embed(self.embed_vd[...].astype(dt), tokens) * scale  # [B, T, D]
        task_one_hot = jax.nn.one_hot(task_ids, self.task_embed.shape[0], dtype=dt)  # [B, J]
        task_vec = jnp.einsum("BJ,JD->BD", task_one_hot, self.task_embed[...].astype(dt)) * scale
        x = x + jnp.where(positions[..., None] == 0, task_vec[:, None, :], 0).astype(dt)  # [B, T, D]
        return constrain(x, act_btd)

    def lm_logits(self, hidden: jax.Array, w_dv: jax.Array | None = None) -> jax.Array:
        """Language-model logits in f32: [B, T, D] -> [B, T, V].

        Args:
          hidden: final-normed hidden states.
          w_dv: the head as laid out once by a caller that keeps it (serving's
            ``DecodeWeights``); default: :meth:`lm_head` of the parameters.
        """
        w_dv = self.lm_head() if w_dv is None else w_dv
        logits = contract("BTD,DV->BTV", hidden, w_dv.astype(hidden.dtype))
        return constrain(logits.astype(jnp.float32), act_btv)

    def lm_head(self) -> jax.Array:
        """The language-model head as a [D, V] matrix: the token embedding's transpose when tied."""
        return self.embed_vd[...].T if self.cfg.tie_embeddings else self.w_dv[...]

    def head_outputs(self, hidden: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
        """What every non-generation head answers for a prefilled batch, by task.

        classify: label probabilities [B, C]; regress: values [B]; tag: tag
        probabilities at every position [B, T, C] (a word's tag is read at its
        last byte).
        """
        outputs = {}
        for head in self.cfg.heads:
            if head.kind == "classify":
                outputs[head.task] = jax.nn.softmax(self.classify_logits(head.task, hidden, lengths))
            elif head.kind == "regress":
                outputs[head.task] = self.heads[head.task](last_position(hidden, lengths))
            elif head.kind == "tag":
                outputs[head.task] = jax.nn.softmax(self.tag_logits(head.task, hidden))
        return outputs

    def classify_logits(self, task: str, hidden: jax.Array, lengths: jax.Array) -> jax.Array:
        """One classification task's logits from the last real position: [B, C]."""
        return self.heads[task](last_position(hidden, lengths))

    def tag_logits(self, task: str, hidden: jax.Array) -> jax.Array:
        """One tagging task's logits at every position: [B, T, C]."""
        return self.heads[task](hidden)


def last_position(hidden: jax.Array, lengths: jax.Array) -> jax.Array:
    """The hidden state of each row's last real token: [B, T, D] -> [B, D].

    ``lengths`` may also be [B, E], the end (last index + 1) of each of a packed
    row's E examples (``tasks.packing``): then [B, T, D] -> [B, E, D].
    """
    ends = (lengths - 1).reshape(lengths.shape[0], -1, 1)  # [B, E, 1]
    return jnp.take_along_axis(hidden, ends, axis=1).reshape(*lengths.shape, hidden.shape[-1])


def count_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
