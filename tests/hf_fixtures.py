"""Tiny Hugging Face tokenizers and models built locally (no network), for the import and tokenizer tests."""

import json
import os

import numpy as np

WORDS = (
    "the cat sat on a mat while dogs ran past quickly , and grüße from 東京 ! "
    "hyphenation tokenizers encode every word into sub word pieces . "
    "hello world 123 456 lazy fox jumped over tiny models"
).split()


def train_bpe(folder: str, vocab_size: int = 320, metaspace: bool = False) -> str:
    """Trains a BPE tokenizer on a few sentences and saves it as a model folder's tokenizer files.

    Byte-level (GPT-2, Llama 3, Qwen) by default; ``metaspace`` gives the
    sentencepiece-style pieces of Llama 2 and Gemma.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<eot>"]
    if metaspace:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        specials.append("<unk>")
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    rng_text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["\n".join(WORDS)]
    tok.train_from_iterator(rng_text, trainer)
    if metaspace:
        tok.add_tokens([f"<0x{b:02X}>" for b in range(256) if tok.token_to_id(f"<0x{b:02X}>") is None])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 512,
    }
    _write(folder, "tokenizer_config.json", config)
    _write(folder, "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 3]})
    return folder


def _write(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def tiny_model(family: str, folder: str, vocab_size: int = 320, seed: int = 0, **changes) -> str:
    """A tiny random model of ``family`` made by transformers and saved with ``save_pretrained`` (f32)."""
    import torch
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config = tf.LlamaConfig(
            **common,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    elif family == "qwen2":
        config = tf.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":
        config = tf.Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=24, tie_word_embeddings=True)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3},
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    else:
        raise ValueError(family)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    cls = {"gemma3": tf.Gemma3ForCausalLM}.get(family, tf.AutoModelForCausalLM)
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    train_bpe(folder, vocab_size=vocab_size)
    return folder


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def write_gguf(hf_folder: str, path: str, family: str, qtype: str = "F32", arch: str | None = None, extra=None) -> str:
    """The tiny model of ``hf_folder`` (llama, qwen2 or qwen3) as a GGUF file, as llama.cpp's converter writes it.

    Tensors get llama.cpp's names (and, for Llama, its rotary row order); every
    matrix is stored as ``qtype`` (F32, F16, or a type ``gguf.quants`` can
    quantise, such as Q8_0 or Q4_1), norms and biases as F32; the byte-level BPE
    tokenizer goes into the metadata. ``arch`` overrides ``general.architecture``;
    ``extra`` maps more tensor names to (array, type name).
    """
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(hf_folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(hf_folder, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    tensors = load_file(os.path.join(hf_folder, "model.safetensors"))
    arch = arch or family
    w = gguf.GGUFWriter(path, arch)
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n
    w.add_name(f"tiny-{family}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n)
    w.add_head_count_kv(k)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [None] * cfg["vocab_size"]
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
    types = [3 if t in added else 1 for t in tokens]
    # GPT-2's end of text under its own name: transformers' GGUF converter appends it to a vocabulary without it.
    tokens = [{"<eot>": "<|endoftext|>", None: f"[PAD{i}]"}.get(t, t) for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for name, t in tensors.items():
        t = t.astype(np.float32)
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
        top["lm_head.weight"] = "output.weight"
        if name in top:
            out = top[name]
        else:
            parts = name.split(".")
            i, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            out = f"blk.{i}.{GGUF_NAMES[rest]}.{kind}"
            if family == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's rotary layout
                heads = n if rest == "self_attn.q_proj" else k
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        _add(w, out, t, q if t.ndim == 2 else gguf.GGMLQuantizationType.F32)
    for name, (t, kind) in (extra or {}).items():
        _add(w, name, t, getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(writer, name, t, qtype):
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, t.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32))
    else:
        writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
