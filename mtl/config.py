"""Typed, frozen configuration shared by ``train.py`` and ``serve.py``.

A run is described by one :class:`Config` tree: the model, its training and
its serving. Presets name whole trees; ``--set model.d_model=512`` style
overrides replace one field by its dotted name. The resolved tree is written
to the run folder as ``config.json`` and read back by the server, so a
checkpoint always carries the shape of its model and how it is served.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any


class UsageError(ValueError):
    """A user mistake (a bad flag, value, file or run folder): one line, exit status 2, nothing written."""


HEAD_KINDS = ("generate", "classify", "regress", "tag")
# Rematerialisation, per Transformer layer (MaxText's names): "none" keeps every
# activation for the backward pass; "full" keeps only each layer's input and
# recomputes the rest; "dots" keeps the matmul outputs and recomputes the cheap
# element-wise work between them (norms, rotary, softmax, SwiGLU).
REMAT_POLICIES = ("none", "dots", "full")
_OLD_REMAT = {"layer": "full", "matmuls": "dots"}  # the names of runs written before
# Attention over whole sequences (training, prefill): "auto" picks cuDNN's fused flash attention on a GPU where it
# applies (bfloat16/float16) and mtl's own elsewhere; "mtl" is mtl's own (custom backward, fastest on XLA:CPU);
# "xla" and "cudnn" are jax.nn.dot_product_attention's implementations. Decoding always reads the KV cache.
ATTENTION_KINDS = ("auto", "mtl", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """One task's head on the shared backbone.

    Attributes:
      task: the task's name; requests name it.
      kind: one of ``HEAD_KINDS``.
      num_classes: the number of labels (classify) or tags (tag); 0 otherwise.
      value_mean, value_std: regress only: the training targets' mean and
        standard deviation; the head predicts in standard units.
    """

    task: str
    kind: str
    num_classes: int = 0
    value_mean: float = 0.0
    value_std: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shared decoder-only backbone. Letters follow ``mtl``'s alphabet."""

    vocab_size: int = 384  # V: the tokenizer's 260 ids, padded to a multiple of 128
    d_model: int = 64  # D
    n_layers: int = 2  # L
    n_heads: int = 4  # N
    n_kv_heads: int = 2  # K
    head_dim: int = 16  # H
    d_ff: int = 192  # F
    max_len: int = 128  # longest sequence, prompt plus generated tokens
    max_positions: int = 0  # a pretrained source's max_position_embeddings, which mtl.export keeps (0: max_len)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # generation logits reuse the token embedding
    scan_unroll: int = 1  # layers unrolled a scan iteration: small CPU models run faster unrolled
    remat: str = "none"  # what the backward pass recomputes; see REMAT_POLICIES
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    heads: tuple[HeadConfig, ...] = ()  # filled from the run's tasks
    # Architecture options, for pretrained families (mtl.hf_import); the defaults are mtl's own backbone.
    scale_embeddings: bool = True  # token (and task) embeddings times sqrt(D) in the compute dtype (Gemma too)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary positions (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # every RMSNorm multiplies by (norm_offset + scale): Gemma's (1 + w) is 1.0
    sandwich_norms: bool = False  # Gemma 3: attention and MLP outputs normed too, before the residual add
    mlp_activation: str = "silu"  # the gated MLP's gate: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    attn_scale: float = 0.0  # attention logits' scale; 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    rope_scaling: str = ""  # global layers' rotary scaling: "", "linear:FACTOR", "llama3:FACTOR,LOW,HIGH,ORIGINAL_LEN"
    layer_types: str = ""  # one letter a layer: L local (sliding window) or G global; "": all global
    sliding_window: int = 0  # the keys a local layer's query sees, itself included
    rope_local_theta: float = 0.0  # local layers' rotary base; 0: rope_theta
    # Per-task LoRA adapters (mtl.adapters): rank R (0: none), the projections adapted, and alpha (scale alpha/R).
    adapter_rank: int = 0
    adapter_targets: str = "q,k,v,o,gate,up,down"  # a comma list of q, k, v, o, gate, up, down
    adapter_alpha: float = 16.0
    attention: str = "auto"  # the sequence attention's implementation; see ATTENTION_KINDS

    def head(self, task: str) -> HeadConfig:
        for head in self.heads:
            if head.task == task:
                return head
        known = ", ".join(h.task for h in self.heads) or "none"
        raise KeyError(f"unknown task {task!r}; this model serves: {known}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(h.task for h in self.heads)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop, data mixture and bookkeeping."""

    tasks: tuple[str, ...] = ("g2p", "langid")
    mixture: str = "temperature:2"
    mesh: str = ""  # empty: every device on the data axis
    steps: int = 60
    batch_size: int = 16
    seed: int = 0
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches a step: the same update, 1/grad_accum of the activation memory
    loss_weights: str = ""  # static per-task weights, "g2p=1,langid=2"; tasks not named weigh 1
    loss_weighting: str = "static"  # or "uncertainty": learned per-task scales (Kendall et al., 2018)
    best_metric: str = "mean"  # "TASK/METRIC", or "mean" of each task's main metric; picks checkpoints/best
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_examples: int = 64  # validation examples per task and evaluation
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    init: str = ""  # --init SOURCE: the pretrained model or run the weights start from ("": random)
    trainable: str = "all"  # or "adapters": the backbone frozen; adapters, heads and task embeddings train
    # Packing: a step's examples laid end to end in rows of pack_width tokens, each example its own segment
    # (attention, positions and heads per segment): the same examples, losses and updates as unpacked rows,
    # without computing their padding (docs/training_bench.md). False: one example a row, padded.
    pack: bool = True
    pack_width: int = 0  # tokens a packed row; 0: max(128, model.max_len)
    # True (the default of --init from a Hugging Face model): model.max_len becomes the run's longest task row
    # (prompt and target), rounded up to 32, at most the model.max_len set (the model's max_position_embeddings).
    fit_max_len: bool = False


KV_DTYPES = ("float32", "bfloat16", "float16", "int8")  # how a KV cache may be stored (int8: with scales)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The serving engine: its mesh, decode slots, queue and batching (``serve.py``, evaluation)."""

    mesh: str = ""  # empty: every device on the data axis
    max_batch: int = 32  # decode slots: generation requests decoded together
    max_queue: int = 1024  # requests that may wait; beyond, a task above its share of them gets 429
    prefill_batch: int = 0  # prompts prefilled together; 0: min(max_batch, 8)
    steps_per_call: int = 8  # the most decode steps one jitted call runs
    scheduler: str = "fair"  # admission order after priority: fair (slot shares between tasks) or fifo
    max_tasks: int = 0  # task rows served, for POST /v1/tasks (mtl.serving.task_loader); 0: the run's tasks, no room
    max_classes: int = 0  # labels a spare row's classifier holds (added classify tasks); 0: spare rows generate only
    spare_kinds: str = ""  # head kinds of spare rows in turn, e.g. classify,regress,tag; "": classify if max_classes
    add_tasks: str = ""  # RUN:TASK,...: tasks of other runs added at start-up, as POST /v1/tasks adds them
    kv_dtype: str = ""  # how the KV cache is stored: float32, bfloat16, float16 or int8; empty: model.dtype
    default_task: str = ""  # the generation task OpenAI's model=<base model's name> asks for; "": the run's first
    kv_memory: str = ""  # the decode slots' KV cache budget, e.g. 2GiB: slots = what fits, at most max_batch


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()


def tiny() -> Config:
    """Seconds on a laptop CPU; for tests. 0.12M backbone parameters.

    ``python train.py --preset tiny --out runs/tiny``
    """
    return Config()


def small() -> Config:
    """The CPU demo: minutes on 2 cores, learns g2p and langid. 1.65M backbone parameters.

    ``python train.py --preset small --out runs/demo`` reaches about 0.73 langid
    accuracy and a g2p phoneme error rate near 0.26 in under five minutes
    (docs/demo.md); longer runs keep improving both.
    """
    return Config(
        model=ModelConfig(
            d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, d_ff=512, max_len=96, scan_unroll=4
        ),
        train=TrainConfig(
            steps=600,
            batch_size=64,
            learning_rate=2e-3,
            warmup_steps=60,
            log_every=50,
            eval_every=300,
            eval_examples=256,
            checkpoint_every=200,
        ),
    )


def base() -> Config:
    """An accelerator-sized model (one GPU or a TPU slice). 315.01M backbone parameters.

    ``python train.py --preset base --mesh data=-1 --out runs/base``
    """
    return Config(
        model=ModelConfig(
            d_model=1024,
            n_layers=20,
            n_heads=16,
            n_kv_heads=8,
            head_dim=64,
            d_ff=4096,
            max_len=256,
            dtype="bfloat16",
        ),
        train=TrainConfig(
            steps=20_000,
            batch_size=256,
            learning_rate=1e-3,
            warmup_steps=1000,
            log_every=100,
            eval_every=2000,
            eval_examples=1024,
            checkpoint_every=1000,
        ),
    )


PRESETS = {"tiny": tiny, "small": small, "base": base}


def preset(name: str) -> Config:
    """Returns the named preset's config.

    Raises:
      ValueError: the name is not a preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parses ``text`` as the type a config field is annotated with."""
    hint = annotation
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if origin is tuple and typing.get_args(hint)[0] is str:
            return tuple(part for part in text.split(",") if part)
    except ValueError:
        pass
    else:
        raise ValueError(f"--set {key} cannot be set from the command line")
    raise ValueError(f"--set {key}={text!r} is not a valid {getattr(hint, '__name__', hint)}")


def override(config: Config, assignment: str) -> Config:
    """Returns ``config`` with one ``section.field=value`` assignment applied.

    Raises:
      ValueError: the assignment is malformed, names no field, or its value
        does not parse as the field's type.
    """
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2:
        raise ValueError(f"--set {assignment!r} must look like section.field=value, e.g. model.d_model=256")
    section_name, field_name = parts
    sections = {f.name for f in dataclasses.fields(Config)}
    if section_name not in sections:
        raise ValueError(f"--set {key!r}: unknown section {section_name!r}; use one of {', '.join(sorted(sections))}")
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    fields = {f.name for f in dataclasses.fields(section)} - {"heads"}
    if field_name not in fields:
        raise ValueError(
            f"--set {key!r}: {section_name} has no field {field_name!r}; fields: {', '.join(sorted(fields))}"
        )
    value = _parse_value(text.strip(), hints[field_name], key)
    return dataclasses.replace(config, **{section_name: dataclasses.replace(section, **{field_name: value})})


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a :class:`Config` from :func:`to_dict`'s output (e.g. ``config.json``)."""
    model = dict(data["model"])
    model["remat"] = _OLD_REMAT.get(model.get("remat", "none"), model.get("remat", "none"))
    model["heads"] = tuple(HeadConfig(**h) for h in model.get("heads", ()))
    train = dict(data["train"])
    train["tasks"] = tuple(train["tasks"])
    # Runs written before the serving section existed are served with its defaults.
    return Config(model=ModelConfig(**model), train=TrainConfig(**train), serve=ServeConfig(**data.get("serve", {})))


def dumps(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def validate(config: Config) -> None:
    """Raises ValueError, one sentence, for a config that cannot build a model."""
    m, t = config.model, config.train
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.d_model": m.d_model,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.n_kv_heads,
        "model.head_dim": m.head_dim,
        "model.d_ff": m.d_ff,
        "model.max_len": m.max_len,
        "train.batch_size": t.batch_size,
        "train.learning_rate": t.learning_rate,
        "train.log_every": t.log_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "model.scan_unroll": m.scan_unroll,
        "train.grad_accum": t.grad_accum,
        "serve.max_batch": config.serve.max_batch,
        "serve.max_queue": config.serve.max_queue,
        "serve.steps_per_call": config.serve.steps_per_call,
    }
    for section in (m, t, config.serve):
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{_section_name(section)}.{field.name}={value} must be a finite number")
    positive["train.grad_clip"] = t.grad_clip  # the largest global gradient norm an update may have
    positive["model.rope_theta"] = m.rope_theta
    positive["model.norm_eps"] = m.norm_eps
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"{key}={value} must be positive")
    at_least_zero = {
        "train.steps": t.steps,  # 0: the initial model is the run's checkpoint
        "train.warmup_steps": t.warmup_steps,
        "train.weight_decay": t.weight_decay,
        "train.eval_every": t.eval_every,
        "train.eval_examples": t.eval_examples,
        "train.seed": t.seed,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise ValueError(f"{key}={value} must be at least 0")
    if t.seed >= 2**32:
        raise ValueError(f"train.seed={t.seed} must be below 2**32")
    if config.serve.scheduler not in ("fair", "fifo"):
        raise ValueError(f"serve.scheduler={config.serve.scheduler!r} must be fair or fifo")
    if config.serve.kv_dtype not in ("", *KV_DTYPES):
        raise ValueError(
            f"serve.kv_dtype={config.serve.kv_dtype!r} must be empty (model.dtype) or one of {', '.join(KV_DTYPES)}"
        )
    parse_bytes(config.serve.kv_memory, "serve.kv_memory")
    if config.serve.prefill_batch < 0:
        raise ValueError(f"serve.prefill_batch={config.serve.prefill_batch} must be at least 0 (0: min(max_batch, 8))")
    if m.n_heads % m.n_kv_heads:
        raise ValueError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if m.head_dim % 2:
        raise ValueError(f"model.head_dim={m.head_dim} must be even for rotary positions")
    for key, value in (("model.dtype", m.dtype), ("model.param_dtype", m.param_dtype)):
        if value not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{key}={value!r} must be float32, bfloat16 or float16")
    for head in m.heads:
        if head.kind not in HEAD_KINDS:
            raise ValueError(f"head {head.task!r} has kind {head.kind!r}; kinds: {', '.join(HEAD_KINDS)}")
    if m.mlp_activation not in ("silu", "gelu_tanh"):
        raise ValueError(f"model.mlp_activation={m.mlp_activation!r} must be silu or gelu_tanh")
    if m.layer_types and (len(m.layer_types) != m.n_layers or set(m.layer_types) - set("LG")):
        raise ValueError(
            f"model.layer_types={m.layer_types!r} must be one letter a layer ({m.n_layers}), L local or G global"
        )
    if "L" in m.layer_types and m.sliding_window < 1:
        raise ValueError(f"model.sliding_window={m.sliding_window} must be positive where model.layer_types has L")
    kind, _, numbers = m.rope_scaling.partition(":")
    if (kind, len(numbers.split(","))) not in (("", 1), ("linear", 1), ("llama3", 4)):
        raise ValueError(
            f"model.rope_scaling={m.rope_scaling!r} must be empty, linear:FACTOR or llama3:FACTOR,LOW,HIGH,ORIGINAL_LEN"
        )
    if m.attention not in ATTENTION_KINDS:
        raise ValueError(f"model.attention={m.attention!r} must be one of {', '.join(ATTENTION_KINDS)}")
    if t.pack_width and t.pack_width < m.max_len:
        raise ValueError(f"train.pack_width={t.pack_width} must be 0 or at least model.max_len={m.max_len}")
    if m.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={m.remat!r} must be one of {', '.join(REMAT_POLICIES)}")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum}")
    if t.loss_weighting not in ("static", "uncertainty"):
        raise ValueError(f"train.loss_weighting={t.loss_weighting!r} must be static or uncertainty")
    parse_weights(t.loss_weights)
    _validate_adapters(config)


ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _validate_adapters(config: Config) -> None:
    m, t = config.model, config.train
    if m.adapter_rank < 0:
        raise ValueError(f"model.adapter_rank={m.adapter_rank} must be at least 0 (0: no adapters)")
    names = [n.strip() for n in m.adapter_targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in ADAPTER_TARGETS]
    if unknown:
        raise ValueError(
            f"model.adapter_targets names {', '.join(map(repr, unknown))}; choose from {','.join(ADAPTER_TARGETS)}"
        )
    if m.adapter_rank and not names:
        raise ValueError(f"model.adapter_targets={m.adapter_targets!r} names no projection to adapt")
    if m.adapter_rank and m.adapter_alpha <= 0:
        raise ValueError(f"model.adapter_alpha={m.adapter_alpha} must be positive")
    if 0 < config.serve.max_tasks < len(m.heads):
        room = config.serve.max_tasks
        raise ValueError(f"serve.max_tasks={room} must be 0 (no room) or at least {len(m.heads)}, the run's tasks")
    for key in ("max_tasks", "max_classes"):
        if getattr(config.serve, key) < 0:
            raise ValueError(f"serve.{key}={getattr(config.serve, key)} must be at least 0")
    spare = [k.strip() for k in config.serve.spare_kinds.split(",")] if config.serve.spare_kinds else []
    for kind in spare:
        if kind not in HEAD_KINDS:
            raise ValueError(f"serve.spare_kinds names {kind!r}; choose from {','.join(HEAD_KINDS)}")
        if kind in ("classify", "tag") and not config.serve.max_classes:
            raise ValueError(f"serve.spare_kinds={config.serve.spare_kinds!r} has {kind} rows: set serve.max_classes")
    if t.trainable not in ("all", "adapters"):
        raise ValueError(f"train.trainable={t.trainable!r} must be all or adapters")
    if t.trainable == "adapters" and not m.adapter_rank:
        raise ValueError("train.trainable=adapters needs adapters: set model.adapter_rank to a positive rank")


def _section_name(section) -> str:
    return {ModelConfig: "model", TrainConfig: "train", ServeConfig: "serve"}[type(section)]


def parse_weights(spec: str) -> dict[str, float]:
    """Parses ``train.loss_weights`` ("g2p=1,langid=2.5") into {task: weight}.

    Raises:
      ValueError: a part is not NAME=NUMBER with a number of at least 0.
    """
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name or not 0 <= weights.get(name, -1.0) < math.inf:
            raise ValueError(f"train.loss_weights part {part!r} must be TASK=WEIGHT with a finite weight of at least 0")
    return weights


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, name: str) -> int:
    """A size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000`` in bytes; empty is 0 (not set).

    Raises:
      ValueError: anything else, or a size that is not positive.
    """
    if not text.strip():
        return 0
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"{name}={text!r} must be a positive size such as 512MiB, 2GiB or 1.5GB")
    return int(float(match.group(1)) * _UNITS[unit])
