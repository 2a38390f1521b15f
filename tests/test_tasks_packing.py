"""tasks.packing: packed rows give every example the loss and gradient of its own unpacked row."""

import functools

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import training
from mtl.model import MultiTaskModel
from tasks import ByteTokenizer, encode_split, labels_of, packing
from tests.helpers import ALL_KINDS, tiny_model_config

CFG = tiny_model_config(heads=ALL_KINDS)  # task ids: spell 0, lang 1, echo 2, score 3, pos 4
TASKS = {"generate": ("spell", 0), "classify": ("lang", 1), "regress": ("score", 3), "tag": ("pos", 4)}
WIDTH = 40
RNG = np.random.default_rng(0)


def words(n):
    return ["".join(RNG.choice(list("abcdefgh"), RNG.integers(1, 9))) for _ in range(n)]


def split_of(kind, n=10):
    inputs = [" ".join(words(RNG.integers(1, 4))) for _ in range(n)]
    columns = {
        "generate": {"target": words(n)},
        "classify": {"label": [str(x) for x in RNG.integers(0, 5, n)]},
        "regress": {"value": RNG.normal(2.0, 3.0, n).tolist()},
        "tag": {"tags": [[str(x) for x in RNG.integers(0, 4, len(text.split()))] for text in inputs]},
    }[kind]
    dataset = datasets.Dataset.from_dict({"input": inputs, **columns})
    labels = labels_of(datasets.DatasetDict({"train": dataset})) or None
    return encode_split(kind, dataset, ByteTokenizer(), 32, labels=labels, task_id=TASKS[kind][1])


SPLITS = {kind: split_of(kind) for kind in TASKS}


def test_plan_places_every_example_once_within_its_row():
    lengths = RNG.integers(1, 30, 50)
    layout = packing.plan(lengths, WIDTH)
    cells = {(r, o + j) for r, o, n in zip(layout.row, layout.offset, lengths) for j in range(n)}
    assert len(cells) == lengths.sum()  # no two examples share a cell
    assert (layout.offset + lengths <= WIDTH).all() and layout.rows == len(set(layout.row.tolist()))
    assert layout.rows <= -(-lengths.sum() // WIDTH) + 2  # first-fit decreasing wastes little
    assert np.bincount(layout.row).max() <= packing.max_segments(WIDTH)
    with pytest.raises(ValueError, match="41 tokens"):
        packing.plan([41], WIDTH)


def test_a_packed_row_holds_its_examples_with_positions_and_segments():
    split = SPLITS["classify"]
    indices = np.array([3, 0, 7])
    lengths = packing.example_lengths(split)[indices]
    layout = packing.plan(lengths, WIDTH)
    batch = packing.packed_batch(split, indices, lengths, layout, rows=4, rows_here=np.array([2, 0]))
    assert batch["tokens"].shape == (2, WIDTH) and batch["examples"].shape == (2, packing.max_segments(WIDTH))
    r, o, s, n = layout.row[1], layout.offset[1], layout.slot[1], lengths[1]  # example 0 of the split
    local = {0: 1, 2: 0}[r] if r in (0, 2) else None
    if local is not None:
        np.testing.assert_array_equal(batch["tokens"][local, o : o + n], split.arrays["tokens"][0, :n])
        np.testing.assert_array_equal(batch["positions"][local, o : o + n], np.arange(n))
        assert (batch["segment_ids"][local, o : o + n] == s + 1).all()
        assert batch["lengths"][local, s] == o + n and batch["label"][local, s] == split.arrays["label"][0]
    assert batch["examples"].sum() == sum(r in (0, 2) for r in layout.row)  # only this process's rows


MODEL_DEF, PARAMS, REST = nnx.split(MultiTaskModel(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(kind, batch):
    def loss(params):
        return training.LOSSES[kind](nnx.merge(MODEL_DEF, params, REST), TASKS[kind][0], batch)[0]

    value, grads = jax.value_and_grad(loss)(PARAMS)
    return value, jax.tree.leaves(grads)


def only(kind, batch, selected):
    """The batch with every example but the ``selected`` tokens' (or slots') own left out of the loss."""
    batch = dict(batch)
    if kind == "generate":
        batch["loss_mask"] = batch["loss_mask"] * selected
    elif kind == "tag":
        batch["tags"] = np.where(selected, batch["tags"], -1)
    else:
        batch["examples"] = selected.astype(np.float32)
    return batch


@pytest.mark.parametrize("kind", list(TASKS))
def test_packed_batch_gives_each_example_its_unpacked_loss_and_gradient(kind):
    split = SPLITS[kind]
    indices = np.array([4, 9, 0, 2, 7, 5, 1, 8])  # as a sampler draws them: not in order
    lengths = packing.example_lengths(split)[indices]
    layout = packing.plan(lengths, WIDTH)
    rows = packing.rows_needed(layout, 2)
    assert 1 < layout.rows < len(indices)  # several examples share a row
    packed = {k: jnp.asarray(v) for k, v in packing.packed_batch(split, indices, lengths, layout, rows).items()}
    unpacked = {k: jnp.asarray(v) for k, v in split.batch(indices).items()}

    def check(a, b):
        (loss_a, grads_a), (loss_b, grads_b) = a, b
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        for g, h in zip(grads_a, grads_b):
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)

    check(loss_and_grads(kind, packed), loss_and_grads(kind, unpacked))  # the step's loss and update
    segments = np.asarray(packed["segment_ids"])
    for e in (0, 3):  # one example's own loss and gradient, the others in its row masked
        if kind in ("generate", "tag"):
            in_packed = (np.arange(rows)[:, None] == layout.row[e]) & (segments == layout.slot[e] + 1)  # [R, W]
            in_unpacked = np.repeat(np.arange(len(indices)) == e, split.length).reshape(len(indices), -1)  # [B, L]
        else:
            in_packed = np.zeros(packed["examples"].shape, bool)
            in_packed[layout.row[e], layout.slot[e]] = True  # [R, E]
            in_unpacked = np.arange(len(indices)) == e  # [B]
        check(
            loss_and_grads(kind, only(kind, packed, in_packed)), loss_and_grads(kind, only(kind, unpacked, in_unpacked))
        )
