"""A trained run out as a Hugging Face model folder: ``python -m mtl.export --ckpt RUN --out DIR [--task NAME]``.

The folder (``config.json``, ``model.safetensors``, the run's tokenizer files,
``generation_config.json``) loads in ``transformers`` as the family the
backbone's options describe (Gemma 3, Qwen3, Qwen2, else Llama) and computes,
for task NAME, the logits mtl serves for it. It keeps the source's shape:
``max_position_embeddings`` (not the run's ``max_len``), rotary scaling, tied
embeddings and dtype, so a ``--steps 0`` export is the source model again.

**The task's conditioning.** mtl adds the task's embedding to the first
position of every prompt, whatever token is there (BOS for a task's prompt,
the chat template's first marker for a chat). Folding it into that token's
embedding row would add it at every later occurrence too (ChatML's
``<|im_start|>`` opens every turn). So the export gives the task a token of
its own, ``<|mtl:NAME|>``, whose embedding row is the first token's plus the
task vector, and makes the exported tokenizer put it first: its
post-processor starts every encoded text with it (``tokenizer(text)``, as
mtl's prompts start with BOS; BOS becomes this token), and its chat template
writes it in place of the template's first marker (a second token,
``<|mtl:NAME:chat|>``, where that marker is not BOS). Later occurrences are
the plain tokens. The new tokens take unused embedding rows, else rows
appended to the table; ``generation_config.json`` suppresses them, and
``config.json``'s ``mtl_task_tokens`` names them. A task whose vector is zero
(a ``--steps 0`` run, or a frozen backbone whose task vectors did not move)
needs no token and gets none. mtl's own embedding scale sqrt(D) is folded
into the table for the families that have none. Weights are the transposes
of what :mod:`mtl.hf_import` reads (the same ``sources`` table). A run with
mtl's byte tokenizer has no ``transformers`` tokenizer to write: the export
says so, and ``mtl_task_tokens`` gives the id to put first by hand.

A task with its own head is exported to the class ``transformers`` has for it,
the task's token placed the same way:

- **tag** -> ``{Family}ForTokenClassification``: its ``score`` (weight and
  bias) is mtl's tag head, so the logits at every position are mtl's; mtl
  reads a word's tag at its last sub-word token. Gemma 3 has no such class:
  its tag task exports as ``Gemma3TextModel`` (the backbone, ``AutoModel``)
  with the head beside it in ``mtl_head.safetensors`` (``score.weight`` [C, D],
  ``score.bias`` [C]), named by ``config.json``'s ``mtl_head``: the logits are
  ``last_hidden_state @ score.weight.T + score.bias``.
- **classify** -> ``{Family}ForSequenceClassification``. transformers pools
  the rightmost token that is not ``pad_token_id``, mtl the prompt's last
  token: the same position on right-padded batches, because mtl's prompts end
  in the template's separator, not in the pad id (a template ending in the pad
  token would break it). transformers' ``score`` has no bias and mtl's
  classifier has one, so the bias is written in ``config.json`` as
  ``mtl_score_bias``: ``logits + mtl_score_bias`` are mtl's logits (and
  ``softmax`` of them mtl's ``scores``); they equal as loaded only where the
  bias is zero.
- **regress** -> the same class with ``num_labels=1`` and
  ``problem_type="regression"``: the weight carries mtl's standard deviation,
  and ``mtl_score_bias`` the rest (mean + std * bias), so ``logits[:, 0] +
  mtl_score_bias[0]`` is mtl's ``value``.

A run with adapters (``model.adapter_rank``) exports the backbone without
them, plus a generation task's adapter in the PEFT format in ``DIR/adapter``
(``adapter_config.json``, ``adapter_model.safetensors``): ``peft``'s
``PeftModel.from_pretrained(model, DIR/adapter)`` on the exported model then
computes what mtl serves for the task. ``--merge-adapter TASK`` instead folds
TASK's adapter into the weights (W + alpha/r A B), a plain model for TASK.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from mtl import adapters, hf_import
from mtl import config as C
from mtl.checkpoint import Checkpoints, find, restore_newest
from mtl.config import ModelConfig, UsageError
from mtl.model import MultiTaskModel
from mtl.partition import abstract_state
from sharding import make_mesh

HEAD_FILE = "mtl_head.safetensors"  # a head with no transformers class (Gemma 3 tagging), beside the backbone
TASK_TOKEN = "<|mtl:{task}|>"  # the token that carries a task's conditioning in an export (module docstring)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def family(cfg: ModelConfig) -> str:
    """The transformers family a backbone's options describe."""
    if cfg.sandwich_norms or cfg.norm_offset:
        return "gemma3"
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.qkv_bias else "llama"


CLASS_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3Text"}
HEAD_CLASSES = {"classify": "ForSequenceClassification", "regress": "ForSequenceClassification"}
HEAD_CLASSES["tag"] = "ForTokenClassification"


def architecture(cfg: ModelConfig, kind: str = "generate") -> str:
    """The transformers class a task of ``kind`` is exported to.

    Gemma 3 has no token classification class: its tag task is the backbone
    alone, with the head in a file beside it (module docstring).
    """
    fam = family(cfg)
    if kind == "generate":
        return {"gemma3": "Gemma3ForCausalLM"}.get(fam, CLASS_PREFIX[fam] + "ForCausalLM")
    if fam == "gemma3" and kind == "tag":
        return "Gemma3TextModel"
    return CLASS_PREFIX[fam] + HEAD_CLASSES[kind]


def tied(cfg: ModelConfig) -> bool:
    """Whether the export ties its output head to the embedding: as the source does, unless mtl's sqrt(D) scale
    is folded into the table (mtl's own backbone), which the head must not see."""
    return cfg.tie_embeddings and (not cfg.scale_embeddings or family(cfg) == "gemma3")


def hf_config(cfg: ModelConfig, ids: dict[str, object]) -> dict:
    """``config.json`` of the exported model (``ids``: bos/eos/pad token ids), the source's shape kept."""
    kind = family(cfg)
    out = {
        "architectures": [architecture(cfg)],
        "model_type": {"gemma3": "gemma3_text"}.get(kind, kind),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_positions or cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": tied(cfg),
        "torch_dtype": cfg.param_dtype,
        **{f"{name}_token_id": value for name, value in ids.items()},
    }
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling, _, numbers = cfg.rope_scaling.partition(":")
    if scaling == "linear":
        full = {**full, "rope_type": "linear", "factor": float(numbers)}
    elif scaling == "llama3":
        factor, low, high, original = (float(v) for v in numbers.split(","))
        full = {**full, "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high}
        full["original_max_position_embeddings"] = int(original)
    if kind == "gemma3":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        types = cfg.layer_types or "G" * cfg.n_layers
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=round((cfg.attn_scale or cfg.head_dim**-0.5) ** -2),  # an int in transformers
            sliding_window=cfg.sliding_window or cfg.max_len,
            layer_types=["sliding_attention" if t == "L" else "full_attention" for t in types],
            rope_parameters={"full_attention": full, "sliding_attention": local},
        )
        return out
    if cfg.layer_types or cfg.norm_offset or cfg.mlp_activation != "silu" or cfg.attn_scale:
        raise UsageError(f"a {kind} export cannot carry this backbone's options (sliding layers, Gemma norms, GELU)")
    out.update(hidden_act="silu", rope_parameters=full)
    if kind != "llama":
        out["use_sliding_window"] = False
    return out


def export(
    run: str | os.PathLike, out: str | os.PathLike, task: str | None = None, merge_adapter: bool = False
) -> pathlib.Path:
    """Writes run ``run``'s newest checkpoint as a Hugging Face folder ``out`` answering for ``task``.

    Args:
      merge_adapter: fold ``task``'s adapter into the weights; else, in a run
        with adapters, write it in the PEFT format to ``out/adapter``.

    Raises:
      UsageError: no checkpoint, an unknown task, or options (or a head) no family carries.
    """
    try:
        folder, step = find(run)
    except ValueError as e:
        raise UsageError(str(e)) from None
    run_dir = folder.parent
    checkpoints = Checkpoints(folder, read_only=True)
    try:  # the newest checkpoint, verified; a damaged one is refused, never exported (nor an older one instead)
        _, meta, _ = restore_newest(folder, [step], checkpoints.read_meta, lambda _: None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = C.from_dict(meta["config"]).model
    heads = {h.task: h for h in cfg.heads}
    generate = [h.task for h in cfg.heads if h.kind == "generate"]
    if task is None and not generate:
        raise UsageError(f"--task is needed: this run has no generation task; choose one of {', '.join(heads)}")
    task = task or generate[0]
    if task not in heads:
        raise UsageError(f"--task {task!r} is not a task of this run; choose one of {', '.join(heads)}")
    head = heads[task]
    if adapters.targets(cfg) and not merge_adapter and head.kind != "generate":
        # peft's LoRA for a classification model also saves its score head, which this export does not write.
        raise UsageError(
            f"--task {task}: the PEFT format is written for generation tasks' adapters; "
            f"--merge-adapter {task} exports this {head.kind} task with its adapter folded in"
        )
    hf = hf_config(cfg, {})
    hf["architectures"] = [architecture(cfg, head.kind)]
    mesh = make_mesh("data=1", jax.devices()[:1])
    graphdef, params, _ = abstract_state(lambda: MultiTaskModel(cfg, rngs=nnx.Rngs(0)), mesh)
    try:
        restore_newest(folder, [step], lambda s: checkpoints.restore(s, params), lambda _: None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    checkpoints.close()
    model = nnx.merge(graphdef, params)
    ids = _special_ids(run_dir)
    j = model.task_index(task)
    if merge_adapter:
        if not adapters.targets(cfg):
            raise UsageError(f"--merge-adapter {task}: run {run} has no adapters (model.adapter_rank is 0)")
        adapters.merge(model.blocks, cfg, j)
    firsts = _task_tokens(run_dir, cfg, task, int(ids.get("bos", 1)), model)
    tensors = _tensors(model, cfg, task, {first: new for first, (new, _) in firsts.items()})
    hf.update({f"{k}_token_id": v for k, v in ids.items() if k in ("bos", "eos", "pad")})
    if firsts:
        hf["vocab_size"] = len(tensors["model.embed_tokens.weight"])
        hf["bos_token_id"] = firsts[int(ids.get("bos", 1))][0]
        hf["mtl_task_tokens"] = {text: new for new, text in firsts.values()}
    if head.kind != "generate":
        tensors.pop("lm_head.weight", None)
        labels = next((t["labels"] for t in meta.get("tasks", []) if t["name"] == task), [])
        tensors, extra = _head_tensors(model, head, labels, tensors["model.embed_tokens.weight"].dtype, tensors)
        hf.update(extra)
    beside = {}  # a head transformers has no class for, in a file of its own
    if hf["architectures"] == ["Gemma3TextModel"]:
        beside = {name: tensors.pop(name) for name in ("score.weight", "score.bias")}
        hf["mtl_head"] = {"file": HEAD_FILE, "kind": head.kind, "reads": "last_hidden_state"}

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if beside:
        save_file(beside, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    generation = {
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": ids.get("eos_ids"),
        "pad_token_id": ids.get("pad"),
    }
    if firsts:
        generation["suppress_tokens"] = sorted(new for new, _ in firsts.values())  # never generated
    (out / "generation_config.json").write_text(json.dumps(generation))
    for name in TOKENIZER_FILES:
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out / name)
    if firsts and (out / "tokenizer.json").exists():
        _place_task_tokens(out, firsts, int(ids.get("bos", 1)))
    if not (run_dir / "tokenizer.json").exists():
        print(
            "mtl.export: this run uses mtl's byte tokenizer, which transformers has no class for: no tokenizer was "
            "written; a prompt's ids are mtl's (tasks.ByteTokenizer), its first id "
            + (f"{hf['bos_token_id']} (the task's token)" if firsts else f"{ids.get('bos')} (BOS)"),
            file=sys.stderr,
        )
    if adapters.targets(cfg) and not merge_adapter:
        (out / "adapter").mkdir(exist_ok=True)
        save_file(adapters.peft_tensors(model.blocks, cfg, j), str(out / "adapter" / "adapter_model.safetensors"))
        peft = adapters.peft_config(cfg, str(out.resolve()))
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(peft, indent=2))
    return out


def _special_ids(run_dir: pathlib.Path) -> dict:
    """The run's BOS/EOS/pad ids: its tokenizer_mtl.json, else the byte tokenizer's."""
    path = run_dir / "tokenizer_mtl.json"
    saved = json.loads(path.read_text()) if path.exists() else {"bos_id": 1, "eos_ids": [2], "pad_id": 0}
    return {"bos": saved["bos_id"], "eos": saved["eos_ids"][0], "eos_ids": saved["eos_ids"], "pad": saved["pad_id"]}


def _tensors(
    model: MultiTaskModel, cfg: ModelConfig, task: str, dedicated: dict[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Every checkpoint tensor of the exported model.

    ``dedicated`` maps a first token's id to the id of the task's own token,
    whose embedding row is that token's plus the task vector (module docstring);
    rows past the table are appended (their output logits are suppressed).
    """
    state = dict(nnx.to_flat_state(nnx.state(model)))
    out = {}
    for path, source in hf_import.sources(cfg).items():
        value = np.asarray(state[tuple(path)][...])
        for i in range(cfg.n_layers) if source.stacked else [None]:
            part = value[i] if i is not None else value
            out[source.name.format(i=i)] = np.ascontiguousarray(
                part.transpose(np.argsort(source.perm)).reshape(_hf_shape(source))
            )
    dedicated = dedicated or {}
    dtype = out["model.embed_tokens.weight"].dtype
    rows = max([cfg.vocab_size, *(new + 1 for new in dedicated.values())])
    gemma = family(cfg) == "gemma3"  # transformers scales Gemma's table by sqrt(D) itself
    scale = 1.0 if gemma or not cfg.scale_embeddings else cfg.d_model**0.5
    table = np.zeros((rows, cfg.d_model), np.float32)
    table[: cfg.vocab_size] = np.asarray(model.embed_vd[...], np.float32) * scale
    task_vec = np.asarray(model.task_embed[...][model.task_index(task)], np.float32)
    for first, new in dedicated.items():
        table[new] = table[first] + task_vec * scale
    out["model.embed_tokens.weight"] = table.astype(dtype)
    if not tied(cfg):
        head = np.zeros((rows, cfg.d_model), np.float32)
        head[: cfg.vocab_size] = np.asarray(model.lm_head(), np.float32).T
        out["lm_head.weight"] = head.astype(dtype)
    return out


def _task_tokens(run_dir: pathlib.Path, cfg: ModelConfig, task: str, bos: int, model) -> dict[int, tuple[int, str]]:
    """The task's own tokens by the first token they stand for: ``{first id: (new id, text)}``; none for a zero
    task vector. BOS always; the chat template's first token as well where it is not BOS."""
    if not np.any(np.asarray(model.task_embed[...][model.task_index(task)])):
        return {}
    firsts = [bos]
    if (run_dir / "tokenizer.json").exists():
        from mtl.serving.chat import ChatTemplate  # the run's template, rendered as the server renders it
        from tasks import load_tokenizer

        tokenizer = load_tokenizer(run_dir)
        next_id = tokenizer.vocab_size
        template = ChatTemplate.from_tokenizer(tokenizer)
        if isinstance(template, ChatTemplate):
            first = template.prompt_ids([{"role": "user", "content": "hello"}])[0]
            if first != bos:
                firsts.append(first)
    else:
        from tasks import ByteTokenizer

        next_id = ByteTokenizer().vocab_size
    names = [TASK_TOKEN.format(task=task), TASK_TOKEN.format(task=task + ":chat")]
    return {first: (next_id + i, names[i]) for i, first in enumerate(firsts)}


def _place_task_tokens(out: pathlib.Path, firsts: dict[int, tuple[int, str]], bos: int) -> None:
    """Makes the exported tokenizer put the task's token first: in ``tokenizer.json`` (the token, and a
    post-processor that starts every text with it), as BOS in its config, and in the chat template."""
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"].get("vocab") or {}
    inverse = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {}
    inverse.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    for new, text in firsts.values():
        spec.setdefault("added_tokens", []).append(
            {"id": new, "content": text, "single_word": False, "lstrip": False, "rstrip": False}
            | {"normalized": False, "special": True}
        )
    new_bos, bos_text = firsts[bos]
    first = [{"SpecialToken": {"id": bos_text, "type_id": 0}}]
    template = {
        "type": "TemplateProcessing",
        "single": [*first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_text: {"id": bos_text, "ids": [new_bos], "tokens": [bos_text]}},
    }
    before = spec.get("post_processor")
    kept = before.get("processors", []) if before and before.get("type") == "Sequence" else [before]
    kept = [p for p in kept if p and p.get("type") != "TemplateProcessing"]  # an old BOS-adding template goes
    spec["post_processor"] = {"type": "Sequence", "processors": [*kept, template]} if kept else template
    path.write_text(json.dumps(spec, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (out / name).exists():
            config = json.loads((out / name).read_text())
            config["bos_token"] = bos_text
            if name == "tokenizer_config.json":
                config["add_bos_token"] = True
                if isinstance(config.get("chat_template"), str):
                    config["chat_template"] = _chat_template(config["chat_template"], firsts, inverse)
            (out / name).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    chat_file = out / "chat_template.jinja"
    if chat_file.exists():
        chat_file.write_text(_chat_template(chat_file.read_text(), firsts, inverse))


def _chat_template(source: str, firsts: dict[int, tuple[int, str]], texts: dict[int, str]) -> str:
    """``source`` rendered whole, then its first token swapped for the task's (where it starts with a first token).

    jinja drops one newline at a template's end; inside the captured block it
    would stay, so it is dropped here the same way.
    """
    source = source[:-1] if source.endswith("\n") else source
    swaps = "".join(
        f"{{%- elif mtl_prompt.startswith({json.dumps(texts[first])}) -%}}"
        f"{{{{ {json.dumps(text)} ~ mtl_prompt[{len(texts[first])}:] }}}}"
        for first, (_, text) in firsts.items()
        if first in texts
    )
    return (
        "{%- set mtl_prompt %}" + source + "{% endset -%}"
        "{%- if false -%}" + swaps + "{%- else -%}{{ mtl_prompt }}{%- endif -%}"
    )


def _head_tensors(model: MultiTaskModel, head, labels, dtype, tensors: dict) -> tuple[dict, dict]:
    """The ``score`` tensors and config fields of a classify, regress or tag head (module docstring)."""
    module = model.heads[head.task]
    if head.kind == "regress":
        w = np.asarray(module.w_d[...], np.float32) * head.value_std
        bias = [float(head.value_mean + head.value_std * float(module.b[...]))]
        score = {"score.weight": w[None, :]}  # [1, D]
        extra = {"num_labels": 1, "problem_type": "regression", "mtl_score_bias": bias}
    else:
        w, b = np.asarray(module.w_dc[...], np.float32), np.asarray(module.b_c[...], np.float32)
        score = {"score.weight": w.T}  # [C, D]
        names = [str(label) for label in labels] or [f"LABEL_{i}" for i in range(w.shape[1])]
        extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
        if head.kind == "tag":
            score["score.bias"] = b  # transformers' token classifier has a bias
            extra["classifier_dropout"] = 0.0
        else:
            extra.update(problem_type="single_label_classification", mtl_score_bias=[float(v) for v in b])
    score = {k: np.ascontiguousarray(v).astype(dtype) for k, v in score.items()}
    return {**tensors, **score}, extra


def _hf_shape(source: hf_import.Source) -> tuple[int, ...]:
    """The transformers tensor's shape: linear weights [out, in] with heads merged, biases [out]."""
    split = source.split
    if source.name.endswith("proj.weight") and len(split) == 3:
        return (split[0], split[1] * split[2]) if "o_proj" in source.name else (split[0] * split[1], split[2])
    if source.name.endswith("proj.bias"):
        return (split[0] * split[1],)
    return split


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtl.export", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the run folder (its newest checkpoint) or a step folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument(
        "--task", help="the task the export answers for (default: the run's first generation task); any kind"
    )
    p.add_argument(
        "--merge-adapter",
        metavar="TASK",
        help="fold TASK's adapter into the weights (a plain model for TASK) instead of writing it for PEFT",
    )
    args = p.parse_args(argv)
    try:
        if args.merge_adapter and args.task and args.task != args.merge_adapter:
            raise UsageError(f"--merge-adapter {args.merge_adapter} and --task {args.task} name two tasks; give one")
        out = export(args.ckpt, args.out, args.merge_adapter or args.task, merge_adapter=bool(args.merge_adapter))
    except UsageError as e:
        print(f"mtl.export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
