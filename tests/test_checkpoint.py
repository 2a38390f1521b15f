"""Checkpoints across meshes: saved on 2x2x2, restored on 1x8 and on one device, values identical."""

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import replica_slices

import sharding
from mtl import training
from mtl.checkpoint import Checkpoints
from tests.test_sharding import MODEL, TRAIN, fixed_batches


def trained_state(mesh):
    """A state after one step, so the optimizer's moments are not zeros."""
    graphdef, state, shardings = training.create_train_state(MODEL, TRAIN, mesh)
    batch = fixed_batches()["generate"]
    with jax.set_mesh(mesh):
        step = training.compile_train_step(graphdef, shardings, mesh, batch, task="spell", kind="generate")
        state, _ = step(state, training.put_batch(batch, mesh))
    return state


def save(path, step, state):
    checkpoints = Checkpoints(path)
    checkpoints.save(step, state["model"], state["optimizer"], {"step": step})
    checkpoints.wait()
    checkpoints.close()


def restore(path, step, mesh):
    _, target, shardings = training.abstract_train_state(MODEL, TRAIN, mesh)
    checkpoints = Checkpoints(path, read_only=True)
    _, _, meta = checkpoints.restore(step, target["model"], target["optimizer"])  # fills ``target``
    checkpoints.close()
    assert meta["step"] == step
    return target, shardings


def assert_identical(got, want):
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for (path, a), b in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def assert_placed(state, shardings):
    for (path, array), wanted in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings)):
        assert array.sharding.is_equivalent_to(wanted, array.ndim), jax.tree_util.keystr(path)


def test_restore_onto_other_meshes_gives_identical_values(tmp_path):
    devices = jax.devices()
    mesh_222 = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    state = trained_state(mesh_222)
    save(tmp_path / "a", 1, state)

    # 2x2x2 -> 1x8 (fsdp), then 1x8 -> one device.
    fsdp8 = sharding.make_mesh("fsdp=8")
    on_fsdp8, shardings = restore(tmp_path / "a", 1, fsdp8)
    assert_placed(on_fsdp8, shardings)
    assert_identical(on_fsdp8, state)
    embed = on_fsdp8["model"]["embed_vd"][...]
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # really re-sharded, not copied

    save(tmp_path / "b", 1, on_fsdp8)
    one = sharding.make_mesh("data=1", devices[:1])
    on_one, shardings = restore(tmp_path / "b", 1, one)
    assert_placed(on_one, shardings)
    assert_identical(on_one, state)
    assert all(leaf.sharding.device_set == {devices[0]} for leaf in jax.tree.leaves(on_one))

    # The restored state trains on: one step from it on one device matches one on 2x2x2.
    batch = fixed_batches()["classify"]
    losses = []
    for mesh, restored in ((mesh_222, state), (one, on_one)):
        graphdef, _, shardings = training.abstract_train_state(MODEL, TRAIN, mesh)
        with jax.set_mesh(mesh):
            step = training.compile_train_step(graphdef, shardings, mesh, batch, task="lang", kind="classify")
            _, metrics = step(restored, training.put_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "data=8"])
def test_each_element_is_written_once(tmp_path, monkeypatch, spec):
    """Replicated shards (over data, here 2 and 8 copies) are written by one replica only."""
    planned = {}
    original = replica_slices.get_replica_slices

    def recording(arr, *args, **kwargs):
        result = original(arr, *args, **kwargs)
        planned[id(arr)] = (arr.nbytes, result.nbytes, arr.sharding.is_fully_replicated)
        return result

    monkeypatch.setattr(replica_slices, "get_replica_slices", recording)
    state = trained_state(sharding.make_mesh(spec))
    save(tmp_path, 1, state)
    assert len(planned) == len(jax.tree.leaves(state))
    assert any(replicated for *_, replicated in planned.values())  # there were copies to skip
    for array_bytes, written, _ in planned.values():
        assert written == array_bytes


def test_an_array_that_differs_from_its_saved_checksum_is_refused_naming_it(tmp_path):
    """Arrays on disk that differ from what was saved (here: the digest recorded for one is another array's)."""
    import json

    from mtl import checksums

    mesh = sharding.make_mesh("", jax.devices()[:1])
    save(tmp_path, 1, trained_state(mesh))
    restore(tmp_path, 1, mesh)  # as saved: it verifies
    path = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    sums = meta.pop("checksums")
    names = sorted(sums["model"])
    sums["model"][names[0]] = sums["model"][names[1]]
    sums["meta"] = checksums.meta_digest(meta)  # the metadata itself still verifies
    path.write_text(json.dumps({**meta, "checksums": sums}))
    with pytest.raises(checksums.ChecksumError, match=f"^model array {names[0]} does not match the checksum"):
        restore(tmp_path, 1, mesh)
