"""What a task's data looks like: its kinds, their columns, and its splits.

Kept apart from the registry so that both the registry and the file loader can
read it without importing each other.
"""

import hashlib

KINDS = ("generate", "classify", "regress", "tag")

# The columns each kind's data carries, exactly as docs/contract.md lists them.
COLUMNS = {
    "generate": ("input", "target"),
    "classify": ("input", "label"),
    "regress": ("input", "value"),
    "tag": ("input", "tags"),
}

SPLITS = ("train", "validation", "test")


def split_of(key: str, validation: float = 0.05, test: float = 0.05) -> str:
    """Returns the split a text belongs to, by a stable hash of the text.

    Python's ``hash()`` is salted per process, so it would move examples
    between splits from run to run; a cryptographic digest never does. Equal
    texts always land in the same split, so duplicates cannot leak from train
    into evaluation.

    Args:
      key: the text that decides the split (a task's ``input``).
      validation: the fraction of keys that go to ``validation``.
      test: the fraction of keys that go to ``test``.

    Returns:
      One of ``SPLITS``.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    if u < 1.0 - validation - test:
        return "train"
    if u < 1.0 - test:
        return "validation"
    return "test"
