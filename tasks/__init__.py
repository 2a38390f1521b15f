"""Tasks for mtl: definitions, data, tokenizer, mixture sampler and metrics.

Importing the package registers the built-in tasks: ``g2p`` (generate), ``langid``
(classify), ``valence`` (regress) and ``hyphenate`` (tag); ``names()`` lists them.
"""

from tasks import (
    builtin,  # noqa: F401  (registers the built-in tasks)
    cache,
    metrics,
    packing,
)
from tasks.data import EncodedSplit, encode_split, labels_of, prompt_ids, tags_at_word_ends, word_ends
from tasks.registry import KINDS, Task, get, names, register, resolve
from tasks.sampler import MixtureSampler, mixture_rates
from tasks.schema import COLUMNS, SPLITS
from tasks.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "COLUMNS",
    "KINDS",
    "SPLITS",
    "ByteTokenizer",
    "EncodedSplit",
    "MixtureSampler",
    "Task",
    "Tokenizer",
    "cache",
    "encode_split",
    "get",
    "labels_of",
    "load_tokenizer",
    "metrics",
    "mixture_rates",
    "names",
    "packing",
    "prompt_ids",
    "tags_at_word_ends",
    "word_ends",
    "register",
    "resolve",
]
