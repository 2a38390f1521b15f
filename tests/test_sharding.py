"""Meshes, the rules table, and sharded training against the one-device run.

The 8 virtual CPU devices come from ``tests/conftest.py``. The equivalence
tests build the same train state on one device and on real multi-device meshes
and require the same initial parameters, the same losses and the same
parameters after a few optimizer steps.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import sharding
from mtl import config, training
from sharding import AXES, logical_to_spec, parse_mesh
from tests.helpers import tiny_model_config

# --- parse_mesh -------------------------------------------------------------


def test_parse_mesh_empty_puts_every_device_on_data():
    assert parse_mesh("", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parse_mesh("  ", 3) == {"data": 3, "fsdp": 1, "tensor": 1}


def test_parse_mesh_fills_minus_one_and_defaults_missing_axes_to_one():
    assert parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh("fsdp=-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh("tensor=4,data=-1", 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert parse_mesh(" data=2, tensor=-1 ", 8) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert parse_mesh("data=8,fsdp=1,tensor=1", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parse_mesh("data=8,fsdp=-1", 8) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("model=8", ["'model=8'", "data, fsdp, tensor"]),  # unknown axis
        ("data8", ["'data8'", "AXIS=N"]),  # no '='
        ("data=2,data=4", ["'data'", "twice"]),
        ("data=-1,fsdp=-1", ["data, fsdp", "only one"]),
        ("data=two", ["'two'", "'data'", "not an integer"]),
        ("data=2.5", ["'2.5'", "not an integer"]),
        ("fsdp=0", ["0", "'fsdp'", "positive or -1"]),
        ("tensor=-2", ["-2", "'tensor'", "positive or -1"]),
        ("data=2,fsdp=2", ["'data=2,fsdp=2'", "covers 4 devices", "8 are present"]),
        ("data=16", ["covers 16 devices", "8 are present"]),
        ("data=3,fsdp=-1", ["'data=3,fsdp=-1'", "8 devices", "product 3"]),
    ],
)
def test_parse_mesh_errors_name_the_bad_value(spec, fragments):
    with pytest.raises(ValueError) as error:
        parse_mesh(spec, 8)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_make_mesh_uses_the_given_devices():
    mesh = sharding.make_mesh("tensor=2", jax.devices()[2:4])
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    assert list(mesh.devices.flat) == jax.devices()[2:4]


# --- logical_to_spec ----------------------------------------------------------


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), AXES)


@pytest.mark.parametrize(
    "axes, shape, mesh_shape, expected",
    [
        # A [D, F] weight: width over fsdp, MLP width over tensor.
        (("embed", "mlp"), (64, 192), (2, 2, 2), P("fsdp", "tensor")),
        (("mlp", "embed"), (192, 64), (2, 2, 2), P("tensor", "fsdp")),
        # A [B, T, D] activation: batch takes data and fsdp, so D stays whole.
        (("batch", "length", "embed"), (8, 16, 64), (2, 2, 2), P(("data", "fsdp"), None, None)),
        # The scanned [L, D, N, H] query weight: unnamed axes are replicated.
        (("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), (2, 2, 2), P(None, "fsdp", "tensor", None)),
        # Not divisible: 2 kv heads cannot split over tensor=4.
        (("embed", "kv_heads", "head_dim"), (64, 2, 16), (2, 1, 4), P(None, None, None)),
        (("embed", "heads", "head_dim"), (64, 4, 16), (2, 1, 4), P(None, "tensor", None)),
        # Batch 2 cannot split 4 ways: axes drop from the end, leaving data.
        (("batch", "length"), (2, 16), (2, 2, 2), P("data", None)),
        (("batch", "length"), (1, 16), (2, 2, 2), P(None, None)),
        # Size-1 axes are left out: batch over fsdp alone, not ('data', 'fsdp').
        (("batch", "length", "embed"), (8, 16, 64), (1, 8, 1), P("fsdp", None, None)),
        (("embed", "mlp"), (64, 192), (1, 8, 1), P("fsdp", None)),
        (("embed", "mlp"), (64, 192), (8, 1, 1), P(None, None)),
        (("vocab", "embed"), (384, 64), (2, 1, 4), P("tensor", None)),
        # Names without a rule and None are replicated.
        (("norm",), (64,), (2, 2, 2), P(None)),
        ((None, "classes"), (64, 5), (2, 2, 2), P(None, None)),
    ],
)
def test_logical_to_spec_follows_the_rules_table(axes, shape, mesh_shape, expected):
    assert logical_to_spec(axes, shape, abstract_mesh(*mesh_shape)) == expected


def test_logical_to_spec_on_a_real_mesh_matches_the_abstract_one():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert logical_to_spec(("embed", "mlp"), (64, 192), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "embed"), (8, 16, 64), mesh) == P(("data", "fsdp"), None, None)


def test_logical_to_spec_rejects_mismatched_rank():
    with pytest.raises(ValueError, match=r"\('embed', 'mlp'\).*\(64,\)"):
        logical_to_spec(("embed", "mlp"), (64,), abstract_mesh(2, 2, 2))


# --- sharded training equals one-device training ---------------------------

BATCH, LENGTH = 8, 16
MESHES = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "data=2,tensor=4"]
MODEL = tiny_model_config()
TRAIN = dataclasses.replace(config.tiny().train, steps=3)
# (task, kind) of each of the 3 steps: both losses, and a step after each.
SCHEDULE = [("spell", "generate"), ("lang", "classify"), ("spell", "generate")]


def fixed_batches() -> dict[str, dict[str, np.ndarray]]:
    """One generate and one classify batch, drawn once with numpy."""
    rng = np.random.default_rng(0)
    v = MODEL.vocab_size
    tokens = rng.integers(1, v, (BATCH, LENGTH), dtype=np.int32)
    targets = np.concatenate([tokens[:, 1:], rng.integers(1, v, (BATCH, 1), dtype=np.int32)], axis=1)
    prefix = rng.integers(1, LENGTH // 2, BATCH)[:, None]
    ends = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)[:, None]
    position = np.arange(LENGTH)[None]
    generate = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": ((position >= prefix) & (position < ends)).astype(np.float32),
        "task_id": np.full(BATCH, MODEL.task_names.index("spell"), np.int32),
    }
    classify = {
        "tokens": rng.integers(1, v, (BATCH, LENGTH), dtype=np.int32),
        "lengths": rng.integers(1, LENGTH + 1, BATCH, dtype=np.int32),
        "label": rng.integers(0, MODEL.head("lang").num_classes, BATCH, dtype=np.int32),
        "task_id": np.full(BATCH, MODEL.task_names.index("lang"), np.int32),
    }
    return {"generate": generate, "classify": classify}


@dataclasses.dataclass
class Run:
    mesh: jax.sharding.Mesh
    initial: list[np.ndarray]  # every leaf of the state before the first step
    losses: list[float]
    state: object  # the live, sharded state after the last step


@functools.cache
def train_run(spec: str, num_devices: int) -> Run:
    """Initialises on a mesh over the first ``num_devices`` devices and takes the SCHEDULE's steps."""
    mesh = sharding.make_mesh(spec, jax.devices()[:num_devices])
    batches = fixed_batches()
    # Built outside ``set_mesh``, as train.py does: under a global mesh,
    # nnx.eval_shape reads the logical names as mesh axes and fails.
    graphdef, state, shardings = training.create_train_state(MODEL, TRAIN, mesh)
    initial = [np.asarray(x) for x in jax.tree.leaves(state)]  # gathered before donation
    with jax.set_mesh(mesh):
        steps = {
            kind: training.compile_train_step(graphdef, shardings, mesh, batches[kind], task=task, kind=kind)
            for task, kind in dict(SCHEDULE).items()
        }
        losses = []
        for _, kind in SCHEDULE:
            state, metrics = steps[kind](state, training.put_batch(batches[kind], mesh))
            losses.append(float(metrics["loss"]))
    return Run(mesh, initial, losses, state)


@pytest.fixture(scope="module")
def reference() -> Run:
    return train_run("data=1", 1)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_training_matches_one_device(reference, spec):
    run = train_run(spec, 8)
    assert run.mesh.devices.size == 8

    # Same seed, same values: initialisation does not depend on the layout.
    assert len(run.initial) == len(reference.initial)
    for got, want in zip(run.initial, reference.initial):
        np.testing.assert_array_equal(got, want)

    # The losses differ only by the order of sharded reductions: f32 rounding.
    assert all(np.isfinite(reference.losses)) and reference.losses[0] != reference.losses[2]
    np.testing.assert_allclose(run.losses, reference.losses, rtol=1e-5)

    # After 3 AdamW steps. Adam divides by sqrt(nu), which amplifies f32
    # reduction noise in small gradients, so the state gets more room than the
    # losses: parameters rtol 1e-4, atol 1e-5 (they move ~3e-3 per step, and
    # differ by at most ~1.5e-6 in practice). Adam's moments are ~g and ~g^2,
    # far below any fixed atol, so theirs is 1e-4 of the leaf's largest value
    # (in practice they differ by ~1e-6 of it).
    leaves = jax.tree_util.tree_leaves_with_path(run.state)
    for (path, got), want in zip(leaves, jax.tree.leaves(reference.state)):
        got, want = np.asarray(got), np.asarray(want)
        atol = 1e-5 if path[0].key == "model" else 1e-4 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
    # Every weight matrix moved (the unused "echo" row of the task embedding
    # aside), so the comparison above is not vacuous.
    params = jax.tree.leaves(reference.state["model"])
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(params, reference.initial) if np.ndim(b) >= 2]
    assert min(moved) > 1e-3


def _device_bytes(x: jax.Array, device) -> int:
    return sum(shard.data.nbytes for shard in x.addressable_shards if shard.device == device)


def test_fsdp_spreads_parameters_and_optimizer_state():
    run = train_run("fsdp=8", 8)
    device = run.mesh.devices.flat[0]
    leaves = jax.tree_util.tree_leaves_with_path(run.state)
    total = sum(x.nbytes for _, x in leaves)
    held = sum(_device_bytes(x, device) for _, x in leaves)

    # Vectors (norm scales, biases, step counts) are replicated by design:
    # nothing is gained by sharding 64 floats. They are the margin, judged by
    # shape (at most one axis besides the scanned blocks' leading [L] axis),
    # not by their sharding, so a large matrix left whole still fails.
    def is_vector(path, x):
        scanned = any(getattr(k, "key", None) == "blocks" for k in path)
        return x.ndim - scanned <= 1

    margin = sum(x.nbytes for path, x in leaves if is_vector(path, x))
    assert margin < 0.05 * total  # the margin is small enough to mean something
    assert held <= total / 8 + margin, f"device 0 holds {held} of {total} bytes; 1/8 is {total / 8:.0f}"

    for path, x in leaves:
        if not is_vector(path, x):
            assert _device_bytes(x, device) * 8 == x.nbytes, f"{jax.tree_util.keystr(path)} is not split 8 ways"


def test_parameters_follow_the_rules_on_2x2x2():
    run = train_run("data=2,fsdp=2,tensor=2", 8)
    params = run.state["model"]
    mlp, attention = params["blocks"]["mlp"], params["blocks"]["attention"]
    # Leading [L] axis of scanned blocks: no rule, replicated.
    assert mlp["w_df_gate"][...].sharding.spec == P(None, "fsdp", "tensor")
    assert mlp["w_fd"][...].sharding.spec == P(None, "tensor", "fsdp")
    assert attention["w_dnh"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert attention["w_nhd"][...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["embed_vd"][...].sharding.spec == P("tensor", "fsdp")
    assert params["final_norm"]["scale"][...].sharding.spec == P(None)

    # Each device holds a quarter of an MLP weight: [L, D/2, F/2].
    gate = mlp["w_df_gate"][...]
    assert {s.data.shape for s in gate.addressable_shards} == {(MODEL.n_layers, MODEL.d_model // 2, MODEL.d_ff // 2)}

    # The optimizer's moments live where their parameters do.
    adam = run.state["optimizer"]["opt_state"][1][0]
    assert adam.mu["blocks"]["mlp"]["w_df_gate"][...].sharding.spec == P(None, "fsdp", "tensor")
    assert adam.nu["embed_vd"][...].sharding.spec == P("tensor", "fsdp")


def test_kv_heads_stay_whole_when_tensor_does_not_divide_them():
    run = train_run("data=2,tensor=4", 8)
    attention = run.state["model"]["blocks"]["attention"]
    assert MODEL.n_kv_heads % 4  # the point of this mesh
    assert attention["w_dkh_key"][...].sharding.spec == P(None, None, None, None)
    assert attention["w_dnh"][...].sharding.spec == P(None, None, "tensor", None)
