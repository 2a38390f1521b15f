"""Hugging Face checkpoints in: ``config.json`` to a :class:`ModelConfig`, safetensors straight onto the mesh.

The Llama (and Mistral), Qwen2, Qwen3 and Gemma 3 families are options of the
one backbone (``ModelConfig``'s architecture fields); nothing here builds a
second model. Weights are never gathered on one host: every parameter is made
with its sharding by ``jax.make_array_from_callback``, whose callback reads
only that device's shard of each tensor from the safetensors files
(``safe_open(...).get_slice``), layer by layer for the stacked [L, ...]
parameters. What mtl adds for its own use starts so that the imported model
computes exactly what the pretrained one does: the task embedding is zero,
and the heads read the backbone without feeding it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl import gguf_import, partition
from mtl.config import ModelConfig
from mtl.model import MultiTaskModel

# architectures (config.json "architectures") -> family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
NO_LIMIT = 2**31 - 1  # read_config's max_len for "the model's own max_position_embeddings"
MAX_LEN = 1024  # the longest sequence by default: the pretrained context is usually far longer than a task needs


def resolve_source(source: str) -> tuple[str, str]:
    """Where ``--init SOURCE`` points: ``("hf", folder)`` or ``("run", folder)``.

    SOURCE is a local Hugging Face model folder, ``hf:ORG/NAME`` (downloaded
    once by ``huggingface_hub`` into its cache, then found there offline), a
    GGUF file (converted once into a Hugging Face folder: :mod:`mtl.gguf_import`),
    or an mtl run folder (its ``config.json`` has a ``model`` section).

    Raises:
      ValueError: one line: a missing folder, a failed download, a GGUF file that
        cannot be imported, or a folder of neither kind.
    """
    if gguf_import.is_gguf(source):
        if not os.path.isfile(source):
            raise ValueError(f"--init {source!r}: no such GGUF file")
        return "hf", gguf_import.folder_of(source)
    if source.startswith("hf:"):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
            try:  # the cache first, so a downloaded model is usable offline
                folder = snapshot_download(source[3:], allow_patterns=patterns, local_files_only=True)
            except Exception:  # noqa: BLE001  (not cached yet: any hub error means "download")
                folder = snapshot_download(source[3:], allow_patterns=patterns)
        except Exception as e:  # noqa: BLE001  (network, auth, missing repo: one line either way)
            raise ValueError(
                f"--init {source}: cannot fetch it from the Hugging Face hub ({type(e).__name__})"
            ) from None
        return "hf", folder
    if not os.path.isdir(source):
        raise ValueError(f"--init {source!r} is not a folder (nor hf:ORG/NAME, nor a .gguf file)")
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--init {source!r} has no config.json: neither a Hugging Face model folder nor an mtl run")
    with open(config_path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError:
            raise ValueError(f"--init {source!r}: config.json is not JSON") from None
    return ("run" if isinstance(config.get("model"), dict) and "train" in config else "hf"), source


def read_config(folder: str | os.PathLike, max_len: int = MAX_LEN) -> ModelConfig:
    """The backbone of a Hugging Face model folder's ``config.json``, without heads.

    Args:
      folder: a local Hugging Face model folder.
      max_len: the longest sequence (prompt and generated tokens) the run
        will use, at most the model's ``max_position_embeddings``.

    Raises:
      ValueError: one line naming what cannot be imported: a missing file, an
        architecture outside the four families, or a config field the
        backbone does not support.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    architectures = hf.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
    if family is None:
        raise ValueError(
            f"{path}: architecture {', '.join(architectures) or hf.get('model_type', '?')} cannot be imported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    get = _Fields(hf, path)
    d, n = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim", None) or d // n
    dtype = DTYPES.get(str(get("torch_dtype", None) or get("dtype", None) or "float32"))
    if dtype is None:
        raise ValueError(f"{path}: dtype {get('torch_dtype', None) or get('dtype', None)!r} cannot be imported")
    fields: dict[str, Any] = dict(
        vocab_size=get("vocab_size"),
        d_model=d,
        n_layers=get("num_hidden_layers"),
        n_heads=n,
        n_kv_heads=get("num_key_value_heads", None) or n,
        head_dim=head_dim,
        d_ff=get("intermediate_size"),
        max_len=min(max_len, get("max_position_embeddings", max_len)),
        max_positions=int(get("max_position_embeddings", 0) or 0),
        norm_eps=get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(get("tie_word_embeddings", family != "llama")),
        dtype=dtype,
        param_dtype=dtype,
        scale_embeddings=family == "gemma3",
    )
    get.unsupported("partial_rotary_factor", (None, 1, 1.0))
    get.unsupported("attention_dropout", (None, 0, 0.0))
    if family == "gemma3":
        get.unsupported("hidden_activation", ("gelu_pytorch_tanh", "gelu_tanh", None))
        get.unsupported("hidden_act", ("gelu_pytorch_tanh", "gelu_tanh", None))
        get.unsupported("attn_logit_softcapping", (None,))
        get.unsupported("final_logit_softcapping", (None,))
        get.unsupported("use_bidirectional_attention", (None, False))
        get.unsupported("attention_bias", (None, False))
        fields.update(
            qk_norm=True,
            norm_offset=1.0,
            sandwich_norms=True,
            mlp_activation="gelu_tanh",
            attn_scale=float(get("query_pre_attn_scalar", 256)) ** -0.5,
        )
    else:
        get.unsupported("hidden_act", ("silu",))
        get.unsupported("mlp_bias", (None, False))
        get.unsupported("attention_bias", (None, False))  # Llama's would bias the output projection too
        fields.update(qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    fields.update(_attention_layers(hf, get, family, fields["n_layers"]))
    return ModelConfig(**fields)


class _Fields:
    """Reads config.json fields, naming the file and field in every error."""

    def __init__(self, hf: dict, path: str):
        self.hf, self.path = hf, path

    def __call__(self, name: str, default: Any = ...) -> Any:
        if name in self.hf:
            return self.hf[name]
        if default is ...:
            raise ValueError(f"{self.path} has no {name!r} field")
        return default

    def unsupported(self, name: str, accepted: Sequence[Any]) -> None:
        value = self.hf.get(name)
        if value not in accepted:
            shown = ", ".join(repr(a) for a in accepted if a is not None) or "unset"
            raise ValueError(f"{self.path}: {name}={value!r} is not supported by mtl's backbone (accepted: {shown})")


def _attention_layers(hf: dict, get: _Fields, family: str, n_layers: int) -> dict[str, Any]:
    """Local (sliding-window) and global layers, each with its rotary base and scaling."""
    if family == "gemma3":
        pattern = get("sliding_window_pattern", 6)
        types = get("layer_types", None) or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
        ]
        window = get("sliding_window", 4096)
    elif family in ("qwen2", "qwen3"):
        window = get("sliding_window", None) if get("use_sliding_window", False) else None
        first = get("max_window_layers", n_layers)
        types = get("layer_types", None) or [
            "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)
        ]
    else:  # Llama, Mistral
        window = get("sliding_window", None)
        types = get("layer_types", None) or ["sliding_attention" if window else "full_attention"] * n_layers
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{get.path}: layer_types={types!r} must name full_attention or sliding_attention per layer")
    letters = "".join("L" if t == "sliding_attention" else "G" for t in types)
    if "L" in letters and not window:
        raise ValueError(f"{get.path}: sliding_attention layers need a sliding_window")

    # rope_parameters (transformers 5): one dict, or one per layer type; older files: rope_theta and rope_scaling.
    params = get("rope_parameters", None) or {}
    default_global = 1_000_000.0 if family == "gemma3" else 10_000.0
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
        full, local = dict(params), {}
    scaling = get("rope_scaling", None) or {}
    full = {**scaling, **full}
    theta = float(full.get("rope_theta") or get("rope_theta", default_global))
    local_theta = float(local.get("rope_theta") or get("rope_local_base_freq", 10_000.0 if family == "gemma3" else 0))
    if _rope_type(local) != "default":
        raise ValueError(f"{get.path}: rope type {_rope_type(local)!r} on sliding layers is not supported")
    return dict(
        rope_theta=theta,
        rope_scaling=_rope_scaling(full, get.path, get("max_position_embeddings", 8192)),
        layer_types="" if "L" not in letters else letters,
        sliding_window=int(window) if "L" in letters else 0,
        rope_local_theta=local_theta if "L" in letters and local_theta != theta else 0.0,
    )


def _rope_type(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def _rope_scaling(params: dict, path: str, max_positions: int = 8192) -> str:
    """The ``ModelConfig.rope_scaling`` spelling of a rotary scaling dict."""
    kind = _rope_type(params)
    if kind == "default":
        return ""
    if kind == "linear":
        return f"linear:{float(params['factor'])}"
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return "llama3:" + ",".join(str(float(params.get(k) or max_positions)) for k in keys)
    raise ValueError(f"{path}: rope type {kind!r} is not supported (accepted: default, linear, llama3)")


# --- weights ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one mtl parameter comes from in the checkpoint.

    The parameter is ``tensor.reshape(split).transpose(perm)`` of the named
    tensor (``{i}`` in the name: the layer, for a stacked [L, ...] parameter).
    ``split`` only splits axes (``[N*H, D]`` into ``[N, H, D]``), so a shard of
    the parameter is read as a block of rows and columns of the tensor.
    """

    name: str
    split: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.name


def sources(cfg: ModelConfig, family_names: dict[str, str] | None = None) -> dict[tuple[str, ...], Source]:
    """The checkpoint tensor of every backbone parameter, by the parameter's path in the model's state."""
    d, n, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    layer = "model.layers.{i}."
    out = {
        ("embed_vd",): Source("model.embed_tokens.weight", (v, d), (0, 1)),
        ("final_norm", "scale"): Source("model.norm.weight", (d,), (0,)),
        ("blocks", "attention", "w_dnh"): Source(layer + "self_attn.q_proj.weight", (n, h, d), (2, 0, 1)),
        ("blocks", "attention", "w_dkh_key"): Source(layer + "self_attn.k_proj.weight", (k, h, d), (2, 0, 1)),
        ("blocks", "attention", "w_dkh_value"): Source(layer + "self_attn.v_proj.weight", (k, h, d), (2, 0, 1)),
        ("blocks", "attention", "w_nhd"): Source(layer + "self_attn.o_proj.weight", (d, n, h), (1, 2, 0)),
        ("blocks", "mlp", "w_df_gate"): Source(layer + "mlp.gate_proj.weight", (f, d), (1, 0)),
        ("blocks", "mlp", "w_df_up"): Source(layer + "mlp.up_proj.weight", (f, d), (1, 0)),
        ("blocks", "mlp", "w_fd"): Source(layer + "mlp.down_proj.weight", (d, f), (1, 0)),
        ("blocks", "attention_norm", "scale"): Source(layer + "input_layernorm.weight", (d,), (0,)),
    }
    if cfg.sandwich_norms:  # Gemma: post_attention_layernorm is the attention output's norm
        out[("blocks", "post_attention_norm", "scale")] = Source(layer + "post_attention_layernorm.weight", (d,), (0,))
        out[("blocks", "mlp_norm", "scale")] = Source(layer + "pre_feedforward_layernorm.weight", (d,), (0,))
        out[("blocks", "post_mlp_norm", "scale")] = Source(layer + "post_feedforward_layernorm.weight", (d,), (0,))
    else:
        out[("blocks", "mlp_norm", "scale")] = Source(layer + "post_attention_layernorm.weight", (d,), (0,))
    if cfg.qkv_bias:
        out[("blocks", "attention", "b_nh")] = Source(layer + "self_attn.q_proj.bias", (n, h), (0, 1))
        out[("blocks", "attention", "b_kh_key")] = Source(layer + "self_attn.k_proj.bias", (k, h), (0, 1))
        out[("blocks", "attention", "b_kh_value")] = Source(layer + "self_attn.v_proj.bias", (k, h), (0, 1))
    if cfg.qk_norm:
        out[("blocks", "attention", "query_norm", "scale")] = Source(layer + "self_attn.q_norm.weight", (h,), (0,))
        out[("blocks", "attention", "key_norm", "scale")] = Source(layer + "self_attn.k_norm.weight", (h,), (0,))
    if not cfg.tie_embeddings:
        out[("w_dv",)] = Source("lm_head.weight", (v, d), (1, 0))
    return out


class SafetensorsFolder:
    """The tensors of a folder's ``*.safetensors`` files, each file opened once, read a slice at a time."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{folder} has no *.safetensors weights")
        self.handles = [safe_open(os.path.join(folder, name), framework="numpy") for name in files]
        self.where = {key: handle for handle in self.handles for key in handle.keys()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Reads ``tensor[index]`` (one slice a dimension) without reading the rest of the tensor."""
        return self._slice(name)[index]

    def _slice(self, name: str):
        if name not in self.where:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return self.where[name].get_slice(name)

    def __contains__(self, name: str) -> bool:
        return name in self.where


def read_shard(tensors: SafetensorsFolder, source: Source, index: tuple[slice, ...], shape, dtype) -> np.ndarray:
    """One device's shard of a parameter: ``index`` into its full ``shape``, read block by block from the tensors."""
    index = tuple(slice(*s.indices(dim)) for s, dim in zip(index, shape))
    if source.stacked:
        layers, index = range(*index[0].indices(shape[0])), index[1:]
        # Each layer's block is written into the stack as it is read: a list of blocks and then their
        # np.stack would hold the parameter twice (0.2x the model's bytes for SmolLM2's MLP weights).
        stack = None
        for row, i in enumerate(layers):
            block = _read_block(tensors, source, source.name.format(i=i), index, dtype)
            if stack is None:
                stack = np.empty((len(layers), *block.shape), block.dtype)
            stack[row] = block
            del block
        return stack
    return _read_block(tensors, source, source.name, index, dtype)


def _read_block(tensors, source: Source, name: str, index: tuple[slice, ...], dtype) -> np.ndarray:
    split_index = [slice(None)] * len(source.split)  # the index in the split tensor's axes
    for axis, s in zip(source.perm, index):
        split_index[axis] = s
    shape = tensors.shape(name)
    if math.prod(shape) != math.prod(source.split):
        raise ValueError(f"checkpoint tensor {name!r} has shape {shape}; the config implies {source.split}")
    # Each tensor axis is split into consecutive axes of `split`: read the rows covering the block (whole inner
    # axes, the outer axis's slice), reshape them to the split axes, then cut the inner axes' slices.
    read, local_shape, cut, axis = [], [], [], 0
    for dim in shape:
        group, size = [], 1
        while not group or size < dim:
            size *= source.split[axis]
            group.append(axis)
            axis += 1
        outer = split_index[group[0]]
        inner = math.prod(source.split[a] for a in group[1:])
        read.append(slice(outer.start * inner, outer.stop * inner))
        local_shape += [outer.stop - outer.start] + [source.split[a] for a in group[1:]]
        cut += [slice(None)] + [split_index[a] for a in group[1:]]
    block = tensors.read(name, tuple(read)).reshape(local_shape)[tuple(cut)]
    return np.ascontiguousarray(block.transpose(source.perm)).astype(dtype, copy=False)


def load(folder: str | os.PathLike, cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0):
    """The model of a Hugging Face folder on ``mesh``, every parameter born in its shards.

    Args:
      folder: the model folder (``*.safetensors``, and ``config.json`` read
        into ``cfg`` by :func:`read_config`).
      cfg: the backbone, with the run's heads; its ``param_dtype`` is the
        dtype the weights are kept in (the checkpoint's unless overridden).
      mesh: where the parameters live.
      seed: the initialisation of what the checkpoint lacks (the heads).

    Returns:
      (graphdef, state): ``nnx.merge(graphdef, state)`` is the model. Its task
      embedding is zero, so every task's generation starts as the pretrained
      model's.

    Raises:
      ValueError: a tensor is missing or has a shape the config does not imply.
    """
    make = lambda: MultiTaskModel(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract, shardings = partition.abstract_state(make, mesh)
    wanted = sources(cfg)
    tensors = SafetensorsFolder(folder)
    for source in wanted.values():  # every tensor there before anything is built
        names = [source.name.format(i=i) for i in range(cfg.n_layers)] if source.stacked else [source.name]
        for name in names:
            if name not in tensors:
                raise ValueError(f"{folder}: the checkpoint has no tensor {name!r}")
    flat = nnx.to_flat_state(abstract)
    # What the checkpoint lacks (heads, task embeddings) is initialised under jit; XLA drops the rest of the init.
    rest_paths = [path for path, _ in flat if _key(path) not in wanted]
    rest_shardings = [nnx.to_flat_state(shardings)[i][1] for i, (path, _) in enumerate(flat) if path in rest_paths]

    def init_rest():
        state = nnx.to_flat_state(nnx.state(make()))
        return [variable for path, variable in state if path in rest_paths]

    rest = dict(zip(rest_paths, jax.jit(init_rest, out_shardings=rest_shardings)()))
    leaves = []
    for path, variable in flat:
        if path in rest:
            value = rest[path]
            if _key(path) == ("task_embed",):
                value = value.replace(jnp.zeros_like(value[...]))
        else:
            source, dtype, shape = wanted[_key(path)], jnp.dtype(variable.dtype), variable.shape
            array = jax.make_array_from_callback(
                shape,
                variable.sharding,
                lambda index, s=source, dt=dtype, sh=shape: read_shard(tensors, s, index, sh, dt),
            )
            value = variable.replace(array)
        leaves.append((path, value))
    return graphdef, nnx.from_flat_state(leaves)


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in path)
