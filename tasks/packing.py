"""Packing: a step's examples laid end to end in rows of a fixed width, each its own segment.

A task's examples are short (a word and its phonemes, a name), so one example
a row pads most of every row. Packed, a step trains on exactly the examples
the mixture sampler drew for it, in far fewer rows: the same losses and the
same update, without computing the padding. A packed batch carries, beside
the arrays of ``tasks.data``'s layout:

    positions    int32 [R, W]  each token's position within its own example (0 at its first token)
    segment_ids  int32 [R, W]  1, 2, ... for the row's examples, 0 for padding

and reshapes the per-example arrays to fixed slots per row, E of them
(``max_segments``), so the heads read one value per example with static shapes:

    generate  tokens, targets, loss_mask  [R, W], as unpacked rows laid side by side
    classify  lengths [R, E] (each example's end in its row: last index + 1), label [R, E],
              examples float32 [R, E] (1 where a slot holds an example)
    regress   lengths, value, examples    [R, E]
    tag       tags [R, W] (-1 where there is no word end)

Attention stays within a segment (``mtl.layers.attention_mask``) and positions
restart with each example, so each example's hidden states are those of its
own unpacked row. Rows are filled first-fit by decreasing length (ties in
the sampler's order): a pure function of the drawn indices, so resume and
multi-process loading keep their meaning (every process plans the global
batch, then builds only its own rows).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tasks.data import EncodedSplit

PER_TOKEN = ("tokens", "targets", "loss_mask", "tags")  # arrays with a position axis
PER_EXAMPLE = ("lengths", "label", "value")  # one value an example: packed into slots
_FILL = {"tags": -1}  # what a packed row holds where no example is (else 0)


def max_segments(width: int) -> int:
    """E, the examples a packed row holds at most (one every 8 tokens of the row, on average)."""
    return max(1, width // 8)


def example_lengths(split: EncodedSplit) -> np.ndarray:
    """The tokens of each example's row that are not padding: int64 [N] (``split.lengths_of`` of every example).

    generate: up to the position that predicts EOS (the row is ``seq[:-1]``);
    the prompt kinds: the prompt's length.
    """
    return split.lengths_of(np.arange(len(split)))


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where each of a batch's examples goes.

    Attributes:
      row, offset, slot: int64 [B], the example's row, the index in that row of
        its first token, and its slot among the row's examples (segment id slot + 1).
      rows: how many rows the examples fill.
      width: W, the tokens of a row.
    """

    row: np.ndarray
    offset: np.ndarray
    slot: np.ndarray
    rows: int
    width: int


def plan(lengths: np.ndarray, width: int) -> PackPlan:
    """First-fit decreasing: each example to the first row with room for it and a free slot.

    Args:
      lengths: int [B], each example's tokens, all at most ``width``.
      width: W.

    Raises:
      ValueError: an example longer than a row.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > width:
        raise ValueError(f"An example of {int(lengths.max())} tokens does not fit a packed row of {width}.")
    slots = max_segments(width)
    row = np.empty(len(lengths), np.int64)
    offset = np.empty(len(lengths), np.int64)
    slot = np.empty(len(lengths), np.int64)
    used: list[int] = []  # tokens taken in each row
    count: list[int] = []  # examples in each row
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        r = next((r for r in range(len(used)) if used[r] + n <= width and count[r] < slots), len(used))
        if r == len(used):
            used.append(0)
            count.append(0)
        row[i], offset[i], slot[i] = r, used[r], count[r]
        used[r] += n
        count[r] += 1
    return PackPlan(row, offset, slot, len(used), width)


def packed_batch(
    split: EncodedSplit,
    indices: np.ndarray,
    lengths: np.ndarray,
    layout: PackPlan,
    rows: int,
    rows_here: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The packed batch of the examples at ``indices``: its rows ``rows_here`` of ``rows``.

    Args:
      split: the task's encoded split.
      indices: int [B], the examples, as the sampler drew them.
      lengths: int [B], their lengths (``example_lengths(split)[indices]``).
      layout: ``plan(lengths, W)``.
      rows: R, the global batch's rows (at least ``layout.rows``; the rest are padding).
      rows_here: the global rows this process loads, in order (``sharding.process_rows(R, mesh)``);
        default all.

    Returns:
      The arrays named in the module docstring, first axis ``len(rows_here)``.
    """
    if rows < layout.rows:
        raise ValueError(f"{layout.rows} packed rows do not fit a batch of {rows} rows.")
    width, slots = layout.width, max_segments(layout.width)
    rows_here = np.arange(rows) if rows_here is None else np.asarray(rows_here, dtype=np.int64)
    local = np.full(rows, -1, np.int64)
    local[rows_here] = np.arange(len(rows_here))  # global row -> this process's row, -1 if not here
    here = local[layout.row] >= 0  # [B]: examples in this process's rows; only theirs are read
    ex, n = np.asarray(indices)[here], np.asarray(lengths, dtype=np.int64)[here]
    out_row, start, slot = local[layout.row[here]], layout.offset[here], layout.slot[here]
    # Token j of example e goes to (out_row[e], start[e] + j): one scatter per array.
    _, token_example, j, per_token = split.tokens_of(ex)
    dst_row, dst_col = out_row[token_example], start[token_example] + j

    shape = (len(rows_here), width)
    out: dict[str, np.ndarray] = {}
    for name in PER_TOKEN:
        if name in per_token:
            out[name] = np.full(shape, _FILL.get(name, 0), per_token[name].dtype)
            out[name][dst_row, dst_col] = per_token[name]
    segment_ids = np.zeros(shape, np.int32)
    segment_ids[dst_row, dst_col] = slot[token_example] + 1
    positions = np.tile(np.arange(width, dtype=np.int32), (len(rows_here), 1))  # padding: its index in the row
    positions[dst_row, dst_col] = j
    out["positions"], out["segment_ids"] = positions, segment_ids
    if split.kind != "generate":  # the prompt kinds: one value per example, in slots
        examples = np.zeros((len(rows_here), slots), np.float32)
        examples[out_row, slot] = 1.0
        out["examples"] = examples
        for name, values in split.examples_of(ex).items():
            fill = 1 if name == "lengths" else 0  # an empty slot's end 1 reads index 0, masked out
            out[name] = np.full((len(rows_here), slots), fill, values.dtype)
            out[name][out_row, slot] = start + n if name == "lengths" else values
    out["task_id"] = np.full(len(rows_here), split.task_id, np.int32)
    return out


def rows_needed(layout: PackPlan, multiple: int) -> int:
    """R: the rows the plan fills, rounded up to ``multiple`` (the devices splitting the batch, micro-batches)."""
    return -(-layout.rows // multiple) * multiple
