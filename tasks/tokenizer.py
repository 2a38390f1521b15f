"""Tokenizers: the byte-level default and the interface any other must meet.

A pretrained model brings its own (``tasks.hf_tokenizer.HFTokenizer``, a
Hugging Face ``tokenizer.json``); :func:`load_tokenizer` reads whichever a run
folder holds.
"""

import os
import re
from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the server need from a tokenizer.

    ``ByteTokenizer`` meets it, and so does ``HFTokenizer`` (a Hugging Face
    tokenizer with its model's special ids). ``eos_ids`` lists every id that
    ends a generation (``eos_id`` first); ``prompt_ids`` is the prompt of every
    task kind, the same at training and at serving; ``word_ends`` gives the
    prompt position of each whitespace-separated word's last token, where a tag
    task reads the word's tag.
    """

    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    never_generated: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def prompt_ids(self, text: str) -> list[int]: ...

    def word_ends(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, after four special ids.

    Any text round-trips, no vocabulary file is needed, and the vocabulary is
    small enough (260) that the embedding costs nothing at the sizes we train.
    """

    PAD = 0
    BOS = 1
    EOS = 2
    SEP = 3
    OFFSET = 4  # byte b is token OFFSET + b

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS
    sep_id = SEP
    vocab_size = OFFSET + 256
    eos_ids = (EOS,)
    never_generated = (PAD, BOS, SEP)  # ids a generation may not produce

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of ``text``'s UTF-8 bytes, without specials."""
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of ``ids``, up to the first EOS.

        Special ids are dropped, and byte sequences that are not valid UTF-8
        (a generation cut mid-character) become U+FFFD rather than raising.
        """
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if self.OFFSET <= i < self.vocab_size:
                out.append(i - self.OFFSET)
        return out.decode("utf-8", errors="replace")

    def prompt_ids(self, text: str) -> list[int]:
        """Returns ``[BOS] + encode(text) + [SEP]``, the prompt for every kind."""
        return [self.BOS, *self.encode(text), self.SEP]

    def word_ends(self, text: str) -> list[int]:
        """The prompt position of each whitespace-separated word's last byte (positions count the BOS)."""
        return [len(text[: m.end()].encode("utf-8")) for m in re.finditer(r"\S+", text)]

    def save(self, folder: str) -> None:
        """Nothing to write: a folder without ``tokenizer.json`` means the byte tokenizer."""

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def load_tokenizer(folder: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer a model or run folder holds: its ``tokenizer.json`` if any, else the byte tokenizer."""
    if folder is not None and os.path.exists(os.path.join(folder, "tokenizer.json")):
        from tasks.hf_tokenizer import HFTokenizer  # needs the `tokenizers` package only when used

        return HFTokenizer.from_folder(folder)
    return ByteTokenizer()
