"""Tiny Hugging Face tokenizers and models built locally (no network), for the import and tokenizer tests."""

import json
import os

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
