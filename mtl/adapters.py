"""Per-task low-rank adapters (LoRA) on the backbone's projections.

Every adapted projection ``y = x W`` of a layer gains, for each task j, a pair
A_j [I, R] and B_j [R, O] (R = ``model.adapter_rank``) and computes
``y + (alpha / R) * x A_j B_j`` for a row of task j. The pairs of all tasks are
stacked into one A [J, I, R] and one B [J, R, O] beside the projection's
weight, so a batch may hold rows of any tasks: each row gathers its own task's
pair inside the jitted step (``delta``), and training, prefill and decoding
run the same code. B starts at zero, so an untrained adapter leaves the model
exactly as it was.

With ``model.adapter_rank`` 0 (the default) no adapter parameter exists and
every projection computes what it did before: ``attach`` adds nothing and
``apply`` returns its input.

Names: a projection's pair is ``lora_a_NAME`` and ``lora_b_NAME`` on its
module (``Attention`` holds q, k, v, o; ``MLP`` gate, up, down). Their logical
axes are ``('tasks', IN, 'adapter_rank')`` and ``('tasks', 'adapter_rank',
OUT)``, IN and OUT the projection's own (``embed``, ``heads``, ``kv_heads``,
``mlp``), so an adapter shards along with the weight it adapts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.config import ADAPTER_TARGETS as TARGETS
from mtl.config import ModelConfig

_KEY_BASE = 0x10A0_0000  # far above any count a stream reaches


def targets(cfg: ModelConfig) -> tuple[str, ...]:
    """The adapted projections of ``cfg`` (none when ``adapter_rank`` is 0)."""
    if cfg.adapter_rank <= 0:
        return ()
    return tuple(t.strip() for t in cfg.adapter_targets.split(",") if t.strip())


def scale(cfg: ModelConfig) -> float:
    """alpha / R, LoRA's scale of every adapter's output."""
    return cfg.adapter_alpha / cfg.adapter_rank


def task_rows(cfg: ModelConfig) -> int:
    """J, the task rows of every stacked adapter: one a head, at least one."""
    return max(len(cfg.heads), 1)


def attach(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, shapes: dict[str, tuple[int, int, str, str]]) -> None:
    """Gives ``module`` an A and B stack for each of its projections that ``cfg`` adapts.

    Args:
      shapes: projection name -> (I, O, IN axis name, OUT axis name).
    """
    chosen = [name for name in shapes if name in targets(cfg)]
    if not chosen:
        return
    pd = jnp.dtype(cfg.param_dtype)
    j, r = task_rows(cfg), cfg.adapter_rank
    # A's keys fold the stream's key with the projection's number instead of drawing from the stream:
    # the backbone's own weights then come out as they would without adapters, for the same seed.
    stream_key = rngs.params.key[...]
    for name in chosen:
        i, o, in_axis, out_axis = shapes[name]
        key = jax.random.fold_in(stream_key, _KEY_BASE + TARGETS.index(name))
        # A as PEFT draws it (kaiming-uniform with a = sqrt(5): bound 1/sqrt(I)); B zero.
        a = jax.random.uniform(key, (j, i, r), pd, -(i**-0.5), i**-0.5)
        setattr(module, f"lora_a_{name}", nnx.Param(a, logical_axes=("tasks", in_axis, "adapter_rank")))
        setattr(
            module,
            f"lora_b_{name}",
            nnx.Param(jnp.zeros((j, r, o), pd), logical_axes=("tasks", "adapter_rank", out_axis)),
        )
    module.adapter_scale = scale(cfg)


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, task_ids: jax.Array | None) -> jax.Array:
    """``y`` plus each row's task adapter of projection ``name`` applied to ``x``; ``y`` itself when not adapted.

    Args:
      x: [B, T, ...] the projection's input (its trailing axes are I).
      y: [B, T, ...] the projection's output (its trailing axes are O).
      task_ids: [B] each row's task.
    """
    if not hasattr(module, f"lora_a_{name}"):
        return y
    if task_ids is None:
        raise ValueError(f"projection {name!r} has adapters: the call needs each row's task id")
    a = getattr(module, f"lora_a_{name}")[...]
    b = getattr(module, f"lora_b_{name}")[...]
    b_, t = x.shape[:2]
    d = delta(x.reshape(b_, t, -1), a, b, task_ids, module.adapter_scale)
    return y + d.reshape(y.shape).astype(y.dtype)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, task_ids: jax.Array, scale: float) -> jax.Array:
    """Each row's ``scale * x A_j B_j``: x [B, T, I], a [J, I, R], b [J, R, O], task_ids [B] -> [B, T, O].

    A gather of each row's pair, then two batched products through the rank R
    (``benchmarks/serve_bench.py --adapters`` measured it against a one-hot
    product over all J pairs, which costs J times the work in the first product).
    """
    dt = x.dtype
    a_rows = a[task_ids].astype(dt)  # [B, I, R]
    b_rows = b[task_ids].astype(dt)  # [B, R, O]
    xa = jnp.einsum("BTI,BIR->BTR", x, a_rows)
    return jnp.einsum("BTR,BRO->BTO", xa, b_rows) * jnp.asarray(scale, dt)


def delta_one_hot(x: jax.Array, a: jax.Array, b: jax.Array, task_ids: jax.Array, scale: float) -> jax.Array:
    """What :func:`delta` computes, as products over every task's pair masked by a one-hot (measured, not used)."""
    dt = x.dtype
    one_hot = jax.nn.one_hot(task_ids, a.shape[0], dtype=dt)  # [B, J]
    xa = jnp.einsum("BTI,JIR->BTJR", x, a.astype(dt)) * one_hot[:, None, :, None]
    return jnp.einsum("BTJR,JRO->BTO", xa, b.astype(dt)) * jnp.asarray(scale, dt)


def is_adapter_path(path: tuple) -> bool:
    """Whether a parameter's path (``nnx.to_flat_state`` keys) names an adapter stack."""
    return any(str(p).startswith("lora_") for p in path)


class Trainable:
    """An nnx filter ``(path, value) -> bool``: adapters, heads and task embeddings (``train.trainable=adapters``).

    Equal to every other instance, so graph definitions built twice compare equal.
    """

    def __call__(self, path: tuple, value) -> bool:
        names = tuple(str(p) for p in path)
        return is_adapter_path(names) or names[0] in ("heads", "task_embed", "task_log_var")

    def __eq__(self, other) -> bool:
        return isinstance(other, Trainable)

    def __hash__(self) -> int:
        return hash(Trainable)


# Where each target's adapted weight lives: (module of a Block, weight), the weight's trailing axes
# being the flattened I then O of the adapter (``w_dnh`` [D, N, H] is [I, O] with O = N*H).
WEIGHTS = {
    "q": ("attention", "w_dnh"),
    "k": ("attention", "w_dkh_key"),
    "v": ("attention", "w_dkh_value"),
    "o": ("attention", "w_nhd"),
    "gate": ("mlp", "w_df_gate"),
    "up": ("mlp", "w_df_up"),
    "down": ("mlp", "w_fd"),
}


def task_pairs(blocks: nnx.Module, cfg: ModelConfig, j: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Task row ``j``'s adapter of every target: name -> (A [L, I, R], B [L, R, O]), scale not applied."""
    out = {}
    for name in targets(cfg):
        module = getattr(blocks, WEIGHTS[name][0])
        out[name] = (getattr(module, f"lora_a_{name}")[...][:, j], getattr(module, f"lora_b_{name}")[...][:, j])
    return out


def merge(blocks: nnx.Module, cfg: ModelConfig, j: int) -> None:
    """Folds task row ``j``'s adapters into the stacked weights of ``blocks`` (in place): W + scale A_j B_j.

    The model then computes, for every task, what it computed for task ``j``'s rows, so a merged model
    is exported or compared as a plain backbone; the adapter stacks stay and should be zeroed or dropped.
    """
    for name, (a, b) in task_pairs(blocks, cfg, j).items():
        module_name, weight = WEIGHTS[name]
        w = getattr(getattr(blocks, module_name), weight)
        product = jnp.einsum("LIR,LRO->LIO", a.astype(jnp.float32), b.astype(jnp.float32)) * scale(cfg)
        w[...] = (w[...].astype(jnp.float32) + product.reshape(w.shape)).astype(w.dtype)


# PEFT's names: the transformers module each target adapts, and the adapter's config.
PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def peft_tensors(blocks: nnx.Module, cfg: ModelConfig, j: int) -> dict[str, np.ndarray]:
    """Task row ``j``'s adapters as PEFT saves a LoRA of a ``*ForCausalLM`` (``adapter_model.safetensors``).

    PEFT keeps ``lora_A.weight`` [R, I] and ``lora_B.weight`` [O, R] per module, its keys without the
    adapter's name (``peft.utils.save_and_load.get_peft_model_state_dict``). I and O flatten heads
    head-major, as transformers' projections do, which is also the order of mtl's flattened axes.
    """
    out = {}
    for name, (a, b) in task_pairs(blocks, cfg, j).items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)  # [L, I, R], [L, R, O]
        for layer in range(cfg.n_layers):
            key = f"base_model.model.model.layers.{layer}.{PEFT_MODULES[name]}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return out


def peft_config(cfg: ModelConfig, base_model: str) -> dict:
    """``adapter_config.json`` of :func:`peft_tensors`: plain LoRA, scale lora_alpha / r as mtl's."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.adapter_rank,
        "lora_alpha": cfg.adapter_alpha,
        "lora_dropout": 0.0,
        "target_modules": [PEFT_MODULES[name].split(".")[1] for name in targets(cfg)],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
