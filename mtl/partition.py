"""Placing NNX state on a mesh, from the logical axis names of its Variables."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from sharding import named_sharding


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for every Variable of ``state``, from its logical axis names."""

    def leaf(variable: nnx.Variable):
        shape = variable.shape
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
        return variable.replace(named_sharding(axes, shape, mesh))

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh):
    """Traces ``make`` without computing it.

    Returns:
      (graphdef, state of ShapeDtypeStructs carrying their shardings, shardings):
      the target a checkpoint restores into, or the ``out_shardings`` of an init.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract, shardings


def create_sharded(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh):
    """Runs ``make`` under jit so every parameter is born in its own shards.

    Returns:
      (graphdef, state, shardings).
    """
    graphdef, _, shardings = abstract_state(make, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return graphdef, state, shardings
