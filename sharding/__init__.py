"""Meshes, the logical-name to mesh-axis rules, and ``shard_map`` pieces."""

from sharding.mesh import AXES, make_mesh, parse_mesh
from sharding.rules import RULES, constrain, logical_to_spec, named_sharding

__all__ = ["AXES", "RULES", "constrain", "logical_to_spec", "make_mesh", "named_sharding", "parse_mesh"]
