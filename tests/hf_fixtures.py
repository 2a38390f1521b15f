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
