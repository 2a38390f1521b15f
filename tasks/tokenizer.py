"""Tokenizers: the byte-level default and the interface any other must meet."""

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the server need from a tokenizer.

    ``ByteTokenizer`` meets it; a Hugging Face tokenizer can be wrapped to meet
    it too (its own special ids, ``encode`` without adding specials).
    """

    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


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

    def __repr__(self) -> str:
        return "ByteTokenizer()"
