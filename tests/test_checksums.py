"""Tests for mtl.checksums: digests that depend on the values alone, and verification that names the array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from mtl.checksums import ChecksumError, digest, meta_digest, tree_digests, verify


def test_a_digest_is_the_same_on_any_mesh_and_changes_with_one_bit():
    values = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7
    spread = jax.device_put(values, jax.NamedSharding(sharding.make_mesh("data=2,fsdp=4"), jax.P("data", "fsdp")))
    assert len(spread.addressable_shards) == 8
    assert digest(spread) == digest(jnp.asarray(values)) == digest(values)
    flipped = values.copy()
    flipped.view(np.uint32)[17, 3] ^= 1 << 20  # one bit of one element
    assert digest(flipped) != digest(values)


def test_a_digest_names_dtype_and_shape():
    a = np.zeros((2, 3), np.float32)
    assert digest(a).startswith("float32[2,3]:")
    assert digest(a) != digest(a.reshape(3, 2)) != digest(a.view(np.int32))
    assert digest(jnp.ones((4,), jnp.bfloat16)).startswith("bfloat16[4]:")
    assert digest(np.float32(3.0)).startswith("float32[]:")  # a scalar (an optimizer's step count)


def test_verify_names_the_first_array_that_differs():
    tree = {"blocks": {"w": np.ones((3, 3), np.float32), "b": np.zeros(3, np.float32)}, "count": np.int32(4)}
    recorded = tree_digests(tree)
    assert sorted(recorded) == ["blocks/b", "blocks/w", "count"]
    verify(tree, recorded, "model")
    tree["blocks"]["w"][1, 1] = 1.0000001
    with pytest.raises(ChecksumError, match=r"^model array blocks/w does not match the checksum saved with it$"):
        verify(tree, recorded, "model")
    verify(tree, {k: v for k, v in recorded.items() if k != "blocks/w"}, "model")  # unrecorded arrays pass


def test_the_metadata_digest_sees_a_changed_label():
    meta = {"step": 3, "tasks": [{"name": "lang", "labels": ["de", "fr"]}]}
    changed = {"step": 3, "tasks": [{"name": "lang", "labels": ["de", "fq"]}]}
    assert meta_digest(meta) == meta_digest(dict(reversed(meta.items()))) != meta_digest(changed)
