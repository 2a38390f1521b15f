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

import dataclasses
from typing import Sequence

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


@dataclasses.dataclass
class EncodedSplit:
    """One split of one task, encoded once into arrays of one length.

    Attributes:
      kind: the task kind.
      arrays: per-example arrays, first axis the example. generate:
        ``tokens``, ``targets`` (int32 [N, L]) and ``loss_mask`` (float32
        [N, L]); classify: ``tokens`` (int32 [N, L]), ``lengths`` and
        ``label`` (int32 [N]).
      inputs: the raw ``input`` of each kept example, in the same order.
      references: the raw ``target`` (generate) or ``label`` (classify) of
        each kept example, for evaluation.
      labels: the task's sorted label list (classify), else ``()``.
      dropped: how many examples were longer than ``max_len`` and left out.
      task_id: the value of ``task_id`` in every batch.
    """

    kind: str
    arrays: dict[str, np.ndarray]
    inputs: list[str]
    references: list[str]
    labels: tuple[str, ...]
    dropped: int
    task_id: int

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def length(self) -> int:
        """L, the padded length of every row."""
        return self.arrays["tokens"].shape[1]

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Returns the arrays of the examples at ``indices``, plus ``task_id`` [B]."""
        indices = np.asarray(indices, dtype=np.int64)
        out = {name: array[indices] for name, array in self.arrays.items()}
        out["task_id"] = np.full(len(indices), self.task_id, dtype=np.int32)
        return out


def encode_split(
    task_kind: str,
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    max_len: int,
    labels: Sequence[str] | None = None,
    task_id: int = 0,
) -> EncodedSplit:
    """Encodes a whole split into fixed-shape arrays.

    Rows are ``L = min(max_len, longest row rounded up to a multiple of 8)``
    long, so a task of short examples does not pay for ``max_len``. A row is
    ``seq[:-1]`` for generate and ``seq`` for classify; examples whose row is
    longer than ``max_len`` are dropped and counted rather than truncated, as
    a truncated target would teach the model to stop early.

    Args:
      task_kind: one of ``ENCODED_KINDS``.
      dataset: one split, with the kind's columns.
      tokenizer: the tokenizer (``ByteTokenizer`` by default elsewhere).
      max_len: the longest row kept.
      labels: classify and tag: the task's sorted labels or tags, from ``labels_of``.
      task_id: the task's index, copied into every batch.

    Returns:
      The encoded split.

    Raises:
      ValueError: a kind without an encoding yet, or a label not in ``labels``.
    """
    if task_kind not in ENCODED_KINDS:
        raise ValueError(
            f"Task kind {task_kind!r} cannot be encoded yet; accepted kinds are {', '.join(ENCODED_KINDS)}."
        )
    if max_len < 1:
        raise ValueError(f"max_len {max_len} is not accepted; it must be at least 1.")
    # One batch read: iterating a column of a datasets 4 Dataset formats row by
    # row, which is ten times slower than the encoding itself.
    columns = dataset[:]
    inputs = columns["input"]
    if task_kind == "generate":
        references = columns["target"]
        arrays, keep = _encode_generate(inputs, references, tokenizer, max_len)
        labels = ()
    elif task_kind == "regress":
        references = columns["value"]
        arrays, keep = _encode_prompts(inputs, tokenizer, max_len)
        arrays["value"] = np.asarray(references, dtype=np.float32)[keep]
        labels = ()
    else:
        if labels is None:
            raise ValueError(f"encode_split needs labels= for a {task_kind} task; get them from labels_of.")
        labels = tuple(labels)
        if task_kind == "classify":
            references = columns["label"]
            arrays, keep = _encode_classify(inputs, references, tokenizer, max_len, labels)
        else:
            references = columns["tags"]
            arrays, keep = _encode_tag(inputs, references, tokenizer, max_len, labels)
    kept = np.flatnonzero(keep)
    return EncodedSplit(
        kind=task_kind,
        arrays=arrays,
        inputs=[inputs[i] for i in kept],
        references=[references[i] for i in kept],
        labels=labels,
        dropped=int(len(inputs) - len(kept)),
        task_id=task_id,
    )


def _encode_generate(inputs, targets, tokenizer, max_len):
    eos = tokenizer.eos_id
    seqs, prefix_lens = [], []
    for text, target in zip(inputs, targets):
        prefix = tokenizer.prompt_ids(text)
        seqs.append(prefix + tokenizer.encode(target) + [eos])
        prefix_lens.append(len(prefix))
    seq_lens = np.array([len(s) for s in seqs], dtype=np.int64)
    prefix_lens = np.array(prefix_lens, dtype=np.int64)
    keep = seq_lens - 1 <= max_len  # a row is seq[:-1]
    seqs = [s for s, k in zip(seqs, keep) if k]
    seq_lens, prefix_lens = seq_lens[keep], prefix_lens[keep]
    length = _row_length(seq_lens - 1, max_len)

    full = _pad(seqs, seq_lens, length + 1, tokenizer.pad_id)  # [N, L+1]
    pos = np.arange(length)[None, :]  # [1, L]
    # seq[:-1]: the last real token (EOS) becomes PAD, it is only ever a target.
    tokens = np.where(pos < seq_lens[:, None] - 1, full[:, :-1], tokenizer.pad_id).astype(np.int32)
    targets = np.ascontiguousarray(full[:, 1:])  # [N, L]
    # targets[i] = seq[i + 1] is a target token or EOS exactly when
    # prefix_len - 1 <= i < seq_len - 1 (from SEP to the position predicting EOS).
    loss_mask = ((pos >= prefix_lens[:, None] - 1) & (pos < seq_lens[:, None] - 1)).astype(np.float32)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}, keep


def _encode_prompts(inputs, tokenizer, max_len):
    """Prompts alone, for the kinds answered from the prefill: tokens and lengths."""
    seqs = [tokenizer.prompt_ids(text) for text in inputs]
    seq_lens = np.array([len(s) for s in seqs], dtype=np.int64)
    keep = seq_lens <= max_len
    seqs = [s for s, k in zip(seqs, keep) if k]
    seq_lens = seq_lens[keep]
    length = _row_length(seq_lens, max_len)
    tokens = _pad(seqs, seq_lens, length, tokenizer.pad_id)
    return {"tokens": tokens, "lengths": seq_lens.astype(np.int32)}, keep


def _check_labels(found, labels):
    missing = sorted(set(found) - set(labels))
    if missing:
        raise ValueError(f"Label {missing[0]!r} is not in the task's labels; accepted labels are {', '.join(labels)}.")


def _encode_classify(inputs, label_texts, tokenizer, max_len, labels):
    _check_labels(label_texts, labels)
    index = {label: i for i, label in enumerate(labels)}
    arrays, keep = _encode_prompts(inputs, tokenizer, max_len)
    arrays["label"] = np.array([index[t] for t, k in zip(label_texts, keep) if k], dtype=np.int32)
    return arrays, keep


def _encode_tag(inputs, tag_rows, tokenizer, max_len, labels):
    """``tags`` [N, L]: the tag id at each word's last token (see ``word_ends``), -1 elsewhere."""
    _check_labels([t for row in tag_rows for t in row], labels)
    index = {label: i for i, label in enumerate(labels)}
    arrays, keep = _encode_prompts(inputs, tokenizer, max_len)
    tags = np.full(arrays["tokens"].shape, -1, dtype=np.int32)
    for row, i in enumerate(np.flatnonzero(keep)):
        ends = word_ends(inputs[i], tokenizer)
        if len(ends) != len(tag_rows[i]):
            raise ValueError(f"Input {inputs[i]!r} has {len(ends)} words but {len(tag_rows[i])} tags.")
        tags[row, ends] = [index[t] for t in tag_rows[i]]
    arrays["tags"] = tags
    return arrays, keep


def _row_length(row_lens: np.ndarray, max_len: int) -> int:
    longest = int(row_lens.max()) if len(row_lens) else 1
    return min(max_len, -(-longest // 8) * 8)


def _pad(seqs: list[list[int]], lens: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """Right-pads ragged rows into an int32 [N, width] array, in one scatter."""
    out = np.full((len(seqs), width), pad_id, dtype=np.int32)
    if not seqs:
        return out
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(seqs)), lens)  # [total]
    starts = np.cumsum(lens) - lens  # offset of each row in flat
    cols = np.arange(len(flat)) - np.repeat(starts, lens)  # [total]; every row fits width
    out[rows, cols] = flat
    return out
