"""Logical axis names to mesh axes: the one rules table of mtl.

Model code names the axes of every parameter and key activation with logical
names (``('embed', 'mlp')``, ``('batch', 'length', 'embed')``) and never
mentions a mesh axis. This table is the only place where the two meet.

Resolution, for each dimension in order: take the rule's mesh axes, skip those
of size 1 and those an earlier dimension of the same array already uses (so a
[B, T, D] activation shards its batch over ``fsdp`` and leaves ``D`` whole, while
a [D, F] weight shards ``D`` over ``fsdp``), then drop axes from the end until
the dimension divides evenly. A name without a rule is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # data parallelism, and FSDP's batch split
    "embed": ("fsdp",),  # FSDP: weights sharded along the model width
    "heads": ("tensor",),  # Megatron tensor parallelism: attention heads...
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),  # ...and the MLP width
    "vocab": ("tensor",),  # logits and the embedding table, by vocabulary
    # Replicated, said so: every device serves every task, and a LoRA rank is too small to split.
    # An adapter stack [J, I, R] / [J, R, O] shards its I or O like the weight it adapts.
    "tasks": (),
    "adapter_rank": (),
}

Mesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Maps logical axis names of an array of ``shape`` to a PartitionSpec on ``mesh``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = [a for a in RULES.get(name, ()) if sizes.get(a, 1) > 1 and a not in used]
        while mesh_axes and dim % math.prod(sizes[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names, inside ``jax.set_mesh``.

    Outside a mesh context (a single device, or plain eager use) it returns
    ``x`` unchanged, so model code reads the same on one device and on a pod.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
