"""A Hugging Face ``tokenizer.json`` behind the project's ``Tokenizer`` protocol.

A pretrained model is fine-tuned and served with its own tokenizer and special
ids: BOS, PAD and every EOS come from the model folder (``tokenizer_config.json``,
then ``config.json``, then ``generation_config.json``, which may list several
EOS ids). A task's prompt is ``[BOS]`` then the prompt template with the input
in it (default: the input, then a newline, a separator every byte-level or
sentencepiece vocabulary has), encoded as one text. The ids and the template
are written beside ``tokenizer.json`` as ``tokenizer_mtl.json``, so the run
folder serves with exactly the prompts it trained on.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import tokenizers
import xxhash

TOKENIZER_FILE = "tokenizer.json"
MTL_FILE = "tokenizer_mtl.json"  # the special ids and prompt template chosen for the run
# Files of the source's tokenizer kept with the run, so an export writes them back unchanged.
KEPT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
DEFAULT_TEMPLATE = "{input}\n"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with a model's special ids and a prompt template.

    Attributes:
      bos_id, eos_id, pad_id: the model's ids (``pad_id`` falls back to EOS,
        ``bos_id`` to the model config's BOS, then to EOS, for vocabularies
        without them: padding is never attended to, and position 0 only needs
        a fixed token for the task embedding).
      eos_ids: every id that ends a generation, ``eos_id`` first.
      sep_id: the template's last token (the newline by default).
      never_generated: BOS and PAD, unless they are EOS ids too.
      template: the prompt's text, with ``{input}`` where the request's input goes.
      vocab_size: the tokenizer's ids, added tokens included (the model may have more rows).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int,
        eos_ids: Sequence[int],
        pad_id: int,
        template: str = DEFAULT_TEMPLATE,
        kept: dict[str, str] | None = None,
    ):
        if template.count("{input}") != 1:
            raise ValueError(f"prompt template {template!r} must contain {{input}} exactly once")
        if not eos_ids:
            raise ValueError("a Hugging Face tokenizer needs at least one EOS id; none was found in the model folder")
        self.tokenizer = tokenizer
        self.bos_id, self.pad_id = int(bos_id), int(pad_id)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.eos_id = self.eos_ids[0]
        self.template = template
        self._prefix, self._suffix = template.split("{input}")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        suffix_ids = self.encode(self._suffix)
        self.sep_id = suffix_ids[-1] if suffix_ids else self.eos_id
        self.kept = dict(kept or {})
        # BOS and PAD are never generated, unless they double as an EOS (Qwen pads with its EOS); the
        # separator is an ordinary token here (a newline), which a generation may well produce.
        self.never_generated = tuple(i for i in dict.fromkeys((self.bos_id, self.pad_id)) if i not in self.eos_ids)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, template: str | None = None) -> HFTokenizer:
        """Reads a Hugging Face model folder or an mtl run folder.

        Args:
          folder: holds ``tokenizer.json``, and the model's special tokens in
            ``tokenizer_config.json``, ``config.json`` or ``generation_config.json``
            (an mtl run folder: in ``tokenizer_mtl.json``).
          template: the prompt template; default the folder's own, else
            ``DEFAULT_TEMPLATE``.

        Raises:
          ValueError: no ``tokenizer.json``, or no EOS id anywhere.
        """
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{folder} has no {TOKENIZER_FILE}")
        tokenizer = tokenizers.Tokenizer.from_file(path)
        kept = {}
        for name in KEPT_FILES:
            if os.path.exists(os.path.join(folder, name)):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    kept[name] = f.read()
        saved = _read_json(os.path.join(folder, MTL_FILE))
        if saved:
            return cls(
                tokenizer,
                bos_id=saved["bos_id"],
                eos_ids=saved["eos_ids"],
                pad_id=saved["pad_id"],
                template=template or saved["template"],
                kept=kept,
            )
        tok_cfg = json.loads(kept.get("tokenizer_config.json", "{}"))
        model_cfg = _read_json(os.path.join(folder, "config.json"))
        model_cfg = model_cfg.get("text_config", model_cfg)  # multimodal folders keep the text model's ids inside
        gen_cfg = json.loads(kept.get("generation_config.json", "{}"))

        def special(name: str) -> list[int]:
            """The ids of a special token, from the tokenizer's config first, then the model's."""
            token = tok_cfg.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            ids = [tokenizer.token_to_id(token)] if isinstance(token, str) else []
            for source in (model_cfg, gen_cfg):
                value = source.get(f"{name}_token_id")
                ids += value if isinstance(value, list) else [value]
            return list(dict.fromkeys(i for i in ids if i is not None))  # in order, once each

        eos_ids = special("eos")
        bos = special("bos") or eos_ids[:1]
        pad = special("pad") or eos_ids[:1]
        return cls(
            tokenizer,
            bos_id=bos[0] if bos else 0,
            eos_ids=eos_ids,
            pad_id=pad[0] if pad else 0,
            template=template or DEFAULT_TEMPLATE,
            kept=kept,
        )

    def save(self, folder: str | os.PathLike) -> None:
        """Writes ``tokenizer.json``, the source's kept tokenizer files, and the ids and template."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
        for name, text in self.kept.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        saved = {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id, "template": self.template}
        with open(os.path.join(folder, MTL_FILE), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without the special tokens a post-processor would add."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts in one call, on every core (the tokenizers library's own batch encoding)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def prompt_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``prompt_ids`` of many texts in one call."""
        templated = [self.template.replace("{input}", t) for t in texts]
        return [[self.bos_id, *ids] for ids in self.encode_batch(templated)]

    def fingerprint(self) -> str:
        """A digest of everything that decides the ids: the vocabulary and rules, special ids and template."""
        saved = {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id, "template": self.template}
        return xxhash.xxh3_128_hexdigest((self.tokenizer.to_str() + json.dumps(saved, sort_keys=True)).encode())

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first EOS, special tokens dropped."""
        ids = [int(i) for i in ids]
        ends = [ids.index(e) for e in self.eos_ids if e in ids]
        return self.tokenizer.decode(ids[: min(ends, default=len(ids))], skip_special_tokens=True)

    def prompt_ids(self, text: str) -> list[int]:
        """``[BOS]`` then the template around ``text``, encoded as one text."""
        return [self.bos_id, *self.encode(self.template.replace("{input}", text))]

    def word_ends(self, text: str) -> list[int]:
        """The prompt position of each whitespace-separated word's last sub-word token (positions count the BOS).

        A word's last token is the last one whose characters overlap the word
        (the tokenizer's offsets); two words inside one token share it.
        """
        encoding = self.tokenizer.encode(self.template.replace("{input}", text), add_special_tokens=False)
        starts = len(self._prefix)
        spans = [(start, end) for start, end in encoding.offsets]
        ends = []
        for m in re.finditer(r"\S+", text):
            first, last = starts + m.start(), starts + m.end()
            hits = [i for i, (s, e) in enumerate(spans) if s < last and e > first]
            if not hits:
                raise ValueError(f"word {m.group()!r} of {text!r} has no token; the tokenizer drops it")
            ends.append(1 + hits[-1])
        return ends

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"pad_id={self.pad_id}, template={self.template!r})"
        )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
