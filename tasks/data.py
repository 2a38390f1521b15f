"""Examples to fixed-shape numpy arrays: the model's and the server's input.

The layout is a contract with ``mtl/`` and ``serve.py``; change it only with
them. For a generate example with input tokens ``x`` and target tokens ``y``::

    seq       = [BOS] x [SEP] y [EOS]
    tokens    = seq[:-1]   right-padded with PAD to L
    targets   = seq[1:]    right-padded with PAD to L
    loss_mask = 1.0 where targets[i] is in y + [EOS], i.e. from the SEP
                position up to the position that predicts EOS; 0.0 elsewhere

The other kinds are answered from the prompt ``seq = [BOS] x [SEP]`` alone:
``tokens`` (padded) and ``lengths = len(seq)``, plus
    classify: ``label``, the index of its label in the task's sorted labels;
    regress:  ``value``, the float32 target;
    tag:      ``tags`` [L], the tag index at the last token of each
              whitespace-separated word (``word_ends``), -1 elsewhere.
Every batch also carries ``task_id``. The server prompts every kind with
``prompt_ids``, which is exactly the training prefix. ``[BOS] x [SEP]`` is the
byte tokenizer's prompt; a Hugging Face tokenizer's is ``[BOS]`` then its
prompt template around ``x`` (``HFTokenizer.prompt_ids``).
"""

import collections.abc
import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterator, Sequence

import datasets
import numpy as np

from tasks.tokenizer import ByteTokenizer, Tokenizer

ENCODED_KINDS = ("generate", "classify", "regress", "tag")


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt for every kind: ``[BOS] + encode(text) + [SEP]`` with the byte tokenizer."""
    return tokenizer.prompt_ids(text)


def labels_of(dataset_dict: datasets.DatasetDict) -> tuple[str, ...]:
    """Returns the sorted unique labels (classify) or tags (tag) over all splits.

    All splits count, so a label seen only in ``test`` still gets a class and
    the label indices are the same whichever split is encoded. Other kinds
    have no labels: ``()``.
    """
    columns = next(iter(dataset_dict.values())).column_names
    if "label" in columns:
        return tuple(sorted({label for split in dataset_dict.values() for label in split.unique("label")}))
    if "tags" in columns:
        return tuple(sorted({tag for split in dataset_dict.values() for row in split["tags"] for tag in row}))
    return ()


def tags_at_word_ends(probs: np.ndarray, text: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """A tag head's answer for ``text``: the most likely tag id of each word.

    Args:
      probs: [T, C] tag probabilities at every prompt position.
      text: the request's input.
      tokenizer: the model's tokenizer; default the byte tokenizer.
    """
    return [int(probs[end].argmax()) for end in word_ends(text, tokenizer)]


def word_ends(text: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """The prompt position of each whitespace-separated word's last token.

    A tag task's head reads a word's tag at the word's last token (its last
    byte with the byte tokenizer, its last sub-word with a Hugging Face one),
    where causal attention has seen the whole word. Positions count the BOS
    that starts every prompt.
    """
    return (tokenizer or ByteTokenizer()).word_ends(text)


# ---------------------------------------------------------------------------
# Jagged arrays: every example's tokens end to end, and where each starts.

CHUNK_ROWS = 1 << 20  # rows a whole-split scan reads at once: memory stays flat in the split's size


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype of a tokenizer's ids: uint16 below 65,536 ids (half the disk and page cache), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _jagged(lists: Sequence[Sequence[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as (flat ids, lengths int64 [N])."""
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lens.sum()))
    return flat, lens


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise concatenation of jagged arrays with the same rows: row i is part 0's row i, then part 1's, ..."""
    lens = sum(p[1] for p in parts)
    flat = np.empty(int(lens.sum()), dtype=dtype)
    row_start = np.cumsum(lens) - lens  # [N]
    before = np.zeros_like(lens)  # tokens of earlier parts in each row
    for part_flat, part_lens in parts:
        j = np.arange(len(part_flat)) - np.repeat(np.cumsum(part_lens) - part_lens, part_lens)
        flat[np.repeat(row_start + before, part_lens) + j] = part_flat
        before = before + part_lens
    return flat, lens


def _constant(n: int, value: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, value, dtype=dtype), np.ones(n, dtype=np.int64)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizer.encode`` of every text, as (flat ids, lengths): one vectorised pass for bytes, a batch call else."""
    if isinstance(tokenizer, ByteTokenizer):
        encoded = [t.encode("utf-8") for t in texts]
        lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(dtype) + np.dtype(dtype).type(
            ByteTokenizer.OFFSET
        )
        return flat, lens
    batch = getattr(tokenizer, "encode_batch", None)
    return _jagged(batch(list(texts)) if batch else [tokenizer.encode(t) for t in texts], dtype)


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """``tokenizer.prompt_ids`` of every text, as (flat ids, lengths)."""
    n = len(texts)
    if isinstance(tokenizer, ByteTokenizer):
        body = encode_texts(tokenizer, texts, dtype)
        return _concat([_constant(n, tokenizer.bos_id, dtype), body, _constant(n, tokenizer.sep_id, dtype)], dtype)
    batch = getattr(tokenizer, "prompt_ids_batch", None)
    return _jagged(batch(list(texts)) if batch else [tokenizer.prompt_ids(t) for t in texts], dtype)


@dataclasses.dataclass
class EncodedRows:
    """One batch of examples, encoded: the unit a split is built of, in memory or on disk.

    Attributes:
      tokens: each example's whole sequence end to end (generate: ``[BOS] x [SEP] y [EOS]``;
        the other kinds: the prompt ``[BOS] x [SEP]``).
      lengths: int64 [N], each sequence's tokens.
      columns: per example (``prefix``: generate's prompt length; ``label``; ``value``) [N];
        per token (``tags`` [len(tokens)], -1 off word ends); per word (``word_tags`` with
        ``word_counts`` [N]: a tag example's reference).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    columns: dict[str, np.ndarray]


def encode_rows(
    kind: str,
    columns: dict[str, Sequence],
    tokenizer: Tokenizer,
    label_ids: Callable[[str], int],
    dtype=np.int32,
) -> EncodedRows:
    """Encodes checked rows of one kind (``input`` and the kind's column) into jagged arrays.

    Args:
      kind: one of ``ENCODED_KINDS``.
      columns: ``input`` and the kind's own column, each a list over the rows.
      tokenizer: the run's tokenizer.
      label_ids: classify and tag: a label's (or tag's) id.
      dtype: the token dtype (``token_dtype``).
    """
    inputs = columns["input"]
    n = len(inputs)
    if kind == "generate":
        prompt = encode_prompts(tokenizer, inputs, dtype)
        target = encode_texts(tokenizer, columns["target"], dtype)
        tokens, lengths = _concat([prompt, target, _constant(n, tokenizer.eos_id, dtype)], dtype)
        return EncodedRows(tokens, lengths, {"prefix": prompt[1].astype(np.int32)})
    tokens, lengths = encode_prompts(tokenizer, inputs, dtype)
    if kind == "classify":
        return EncodedRows(tokens, lengths, {"label": np.array([label_ids(t) for t in columns["label"]], np.int32)})
    if kind == "regress":
        return EncodedRows(tokens, lengths, {"value": np.asarray(columns["value"], dtype=np.float32)})
    tags = np.full(len(tokens), -1, dtype=np.int32)
    starts = np.cumsum(lengths) - lengths
    word_tags = []
    for i, (text, row_tags) in enumerate(zip(inputs, columns["tags"])):
        ends = word_ends(text, tokenizer)
        if len(ends) != len(row_tags):
            raise ValueError(f"Input {text!r} has {len(ends)} words but {len(row_tags)} tags.")
        ids = [label_ids(t) for t in row_tags]
        tags[starts[i] + np.asarray(ends, dtype=np.int64)] = ids
        word_tags += ids
    counts = np.fromiter((len(t) for t in columns["tags"]), dtype=np.int64, count=n)
    return EncodedRows(
        tokens, lengths, {"tags": tags, "word_tags": np.array(word_tags, np.int32), "word_counts": counts}
    )


PER_TOKEN_COLUMNS = ("tags",)  # stored beside ``tokens``, one value a token
PER_WORD_COLUMNS = ("word_tags",)  # one value a word, rows by ``word_counts``


# ---------------------------------------------------------------------------
# A split: jagged arrays (numpy or memory-mapped), read a batch at a time.


class EncodedSplit:
    """One split of one task: every example's tokens end to end, read a batch at a time.

    The arrays may be memory-mapped files (``tasks.cache``): nothing here reads
    more than a batch, or a bounded chunk when it scans the whole split, so a
    split of ten million rows costs no more memory than one of a thousand.
    Examples whose row is longer than ``max_len`` are left out and counted
    (``dropped``), as a truncated target would teach the model to stop early.

    Args:
      kind: the task kind.
      store: ``tokens`` [T], ``offsets`` int64 [N+1] (example i is ``tokens[offsets[i]:offsets[i+1]]``),
        and the kind's columns (``EncodedRows.columns``; ``word_offsets`` [N+1] for ``word_tags``).
      labels: the task's sorted labels (classify) or tags (tag), else ``()``.
      pad_id: the tokenizer's PAD.
      max_len: the longest row kept.
      task_id: the value of ``task_id`` in every batch.
      inputs, references: the raw ``input`` and the reference of each stored example (a list or a
        lazy sequence), for evaluation; None where they were not kept (a cached train split).
    """

    def __init__(
        self,
        kind: str,
        store: dict[str, np.ndarray],
        labels: Sequence[str],
        *,
        pad_id: int,
        max_len: int,
        task_id: int = 0,
        inputs: Sequence[str] | None = None,
        references: Sequence | None = None,
    ):
        self.kind, self.store, self.labels = kind, store, tuple(labels)
        self.pad_id, self.task_id = pad_id, task_id
        self._shift = 1 if kind == "generate" else 0  # a generate row is seq[:-1]
        offsets = store["offsets"]
        stored, kept, longest = len(offsets) - 1, 0, 0
        for keep, rows in self._chunks_kept(max_len):
            kept += int(keep.sum())
            longest = max(longest, int(rows[keep].max(initial=0)))
        self.dropped = stored - kept
        # Only a split that drops rows pays for an index of the kept ones (8 bytes a kept row).
        self._rows = None
        if self.dropped:
            self._rows = np.concatenate(
                [
                    np.flatnonzero(keep) + start
                    for start, (keep, _) in zip(range(0, stored, CHUNK_ROWS), self._chunks_kept(max_len))
                ]
            )
        self._len = kept
        self.longest = longest  # the longest kept row's tokens
        self.length = min(max_len, -(-max(longest, 1) // 8) * 8)  # L: the padded row of ``batch``
        self._inputs, self._references = inputs, references

    def __len__(self) -> int:
        return self._len

    def _chunks_kept(self, max_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keep, row lengths) of the stored rows, a chunk at a time."""
        offsets = self.store["offsets"]
        for start in range(0, len(offsets) - 1, CHUNK_ROWS):
            rows = np.diff(offsets[start : start + CHUNK_ROWS + 1]) - self._shift  # [chunk]
            yield rows <= max_len, rows

    def _stored(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return indices if self._rows is None else self._rows[indices]

    @property
    def inputs(self) -> Sequence[str]:
        """The raw ``input`` of each example, in order (validation and test splits, and splits built in memory)."""
        return self._kept(self._inputs, "inputs")

    @property
    def references(self) -> Sequence:
        """The raw ``target``, ``label``, ``value`` or ``tags`` of each example, for evaluation."""
        return self._kept(self._references, "references")

    def _kept(self, values, what):
        if values is None:
            raise ValueError(f"this {self.kind} split keeps no {what} (a cached train split keeps tokens only)")
        if self._rows is None:
            return values
        if isinstance(values, list):
            return [values[i] for i in self._rows]
        return _Picked(values, self._rows)

    def lengths_of(self, indices) -> np.ndarray:
        """int64 [B]: the tokens of each example's row that are not padding."""
        rows = self._stored(indices)
        offsets = self.store["offsets"]
        return offsets[rows + 1] - offsets[rows] - self._shift

    def tokens_of(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The per-token arrays of the examples at ``indices``, end to end.

        Returns:
          ``(lengths [B], example [total], position [total], arrays)``: token ``k`` is
          position ``position[k]`` of example ``example[k]``; ``arrays`` holds ``tokens``
          (int32) and, by kind, ``targets``, ``loss_mask`` (generate) or ``tags``, each [total].
        """
        rows = self._stored(indices)
        offsets, flat = self.store["offsets"], self.store["tokens"]
        start = offsets[rows]
        n = offsets[rows + 1] - start - self._shift  # [B]
        example = np.repeat(np.arange(len(rows)), n)  # [total]
        position = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # [total]
        source = start[example] + position  # [total]: index into the flat store
        arrays = {"tokens": flat[source].astype(np.int32)}
        if self.kind == "generate":
            arrays["targets"] = flat[source + 1].astype(np.int32)
            prefix = self.store["prefix"][rows].astype(np.int64)
            # targets[j] = seq[j + 1] is a target token or EOS from the SEP position on.
            arrays["loss_mask"] = (position >= prefix[example] - 1).astype(np.float32)
        if "tags" in self.store:
            arrays["tags"] = self.store["tags"][source].astype(np.int32)
        return n, example, position, arrays

    def examples_of(self, indices) -> dict[str, np.ndarray]:
        """The one-value-an-example arrays at ``indices``: ``lengths`` (the prompt kinds), ``label``, ``value``."""
        rows = self._stored(indices)
        out = {}
        if self.kind != "generate":
            out["lengths"] = self.lengths_of(indices).astype(np.int32)
        for name, dtype in (("label", np.int32), ("value", np.float32)):
            if name in self.store:
                out[name] = self.store[name][rows].astype(dtype)
        return out

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The examples at ``indices`` in the module docstring's layout, rows ``length`` long, plus ``task_id`` [B]."""
        n, example, position, per_token = self.tokens_of(indices)
        shape = (len(n), self.length)
        out = {}
        for name, values in per_token.items():
            fill = {"tokens": self.pad_id, "targets": self.pad_id, "tags": -1}.get(name, 0)
            out[name] = np.full(shape, fill, dtype=values.dtype)
            out[name][example, position] = values
        out.update(self.examples_of(indices))
        out["task_id"] = np.full(len(n), self.task_id, dtype=np.int32)
        return out

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split in ``batch``'s layout, [N, L] per token, built once. Small splits only (tests)."""
        out = self.batch(np.arange(len(self)))
        del out["task_id"]
        return out

    def scan(self, name: str) -> Iterator[np.ndarray]:
        """A per-example array of the kept rows (``value``, ``label``, ``prefix``, ``seq_lengths``), by chunks."""
        offsets = self.store["offsets"]
        for start in range(0, len(self), CHUNK_ROWS):
            rows = self._stored(np.arange(start, min(len(self), start + CHUNK_ROWS)))
            yield (offsets[rows + 1] - offsets[rows]) if name == "seq_lengths" else self.store[name][rows]

    def longest_target(self) -> int:
        """generate: the most target tokens of an example, its EOS counted (the task's ``max_new_tokens``)."""
        longest = 0
        for seq, prefix in zip(self.scan("seq_lengths"), self.scan("prefix")):
            if len(seq):
                longest = max(longest, int((seq - prefix).max()))
        return longest

    def value_stats(self) -> tuple[float, float]:
        """regress: the mean and standard deviation of the targets, in float64, a chunk at a time."""
        count = total = squares = 0.0
        for values in self.scan("value"):
            values = values.astype(np.float64)
            count, total, squares = count + len(values), total + values.sum(), squares + (values**2).sum()
        mean = total / max(count, 1)
        return mean, math.sqrt(max(squares / max(count, 1) - mean**2, 0.0))


class _Picked(collections.abc.Sequence):
    """``values[rows[i]]``: a lazy sequence's kept items."""

    def __init__(self, values, rows):
        self._values, self._rows = values, rows

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return self._values[int(self._rows[i])]


def encode_split(
    task_kind: str,
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    max_len: int,
    labels: Sequence[str] | None = None,
    task_id: int = 0,
) -> EncodedSplit:
    """Encodes a split held in memory (a built-in task, a test's rows) into an in-memory ``EncodedSplit``.

    A task file is encoded by ``tasks.cache`` into memory-mapped files instead,
    through the same ``encode_rows``.

    Args:
      task_kind: one of ``ENCODED_KINDS``.
      dataset: one split, with the kind's columns.
      tokenizer: the tokenizer (``ByteTokenizer`` by default elsewhere).
      max_len: the longest row kept.
      labels: classify and tag: the task's sorted labels or tags, from ``labels_of``.
      task_id: the task's index, copied into every batch.

    Raises:
      ValueError: a kind without an encoding yet, or a label not in ``labels``.
    """
    if task_kind not in ENCODED_KINDS:
        raise ValueError(
            f"Task kind {task_kind!r} cannot be encoded yet; accepted kinds are {', '.join(ENCODED_KINDS)}."
        )
    if max_len < 1:
        raise ValueError(f"max_len {max_len} is not accepted; it must be at least 1.")
    if task_kind in ("classify", "tag"):
        if labels is None:
            raise ValueError(f"encode_split needs labels= for a {task_kind} task; get them from labels_of.")
        labels = tuple(labels)
    else:
        labels = ()
    index = {label: i for i, label in enumerate(labels)}

    def label_id(label: str) -> int:
        if label not in index:
            raise ValueError(f"Label {label!r} is not in the task's labels; accepted labels are {', '.join(labels)}.")
        return index[label]

    # One batch read: iterating a column of a datasets 4 Dataset formats row by
    # row, which is ten times slower than the encoding itself.
    columns = dataset[:]
    rows = encode_rows(task_kind, columns, tokenizer, label_id, token_dtype(tokenizer.vocab_size))
    store = {"tokens": rows.tokens, "offsets": np.concatenate([[0], np.cumsum(rows.lengths)]), **rows.columns}
    reference = {"generate": "target", "classify": "label", "regress": "value", "tag": "tags"}[task_kind]
    return EncodedSplit(
        task_kind,
        store,
        labels,
        pad_id=tokenizer.pad_id,
        max_len=max_len,
        task_id=task_id,
        inputs=list(columns["input"]),
        references=list(columns[reference]),
    )
