"""Device meshes from ``--mesh data=2,fsdp=2,tensor=2`` specs."""

from __future__ import annotations

import math

import jax
import numpy as np

from sharding.rules import named_sharding

AXES = ("data", "fsdp", "tensor")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """Parses a mesh spec into sizes for every axis in ``AXES``.

    Axes left out get size 1; one size may be ``-1``, filled with the devices
    that remain. An empty spec puts every device on the data axis.

    Args:
      spec: e.g. ``"data=2,fsdp=2,tensor=2"`` or ``"fsdp=-1"``.
      num_devices: the devices the mesh must cover exactly.

    Returns:
      ``{"data": ..., "fsdp": ..., "tensor": ...}`` whose product is ``num_devices``.

    Raises:
      ValueError: the spec is malformed or does not cover the devices.
    """
    if not spec.strip():
        return {"data": num_devices, "fsdp": 1, "tensor": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = (s.strip() for s in part.partition("="))
        if not sep or name not in AXES:
            raise ValueError(f"--mesh part {part.strip()!r} must be AXIS=N with AXIS one of {', '.join(AXES)}")
        if name in sizes:
            raise ValueError(f"--mesh names axis {name!r} twice")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f"--mesh size {size!r} for axis {name!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"--mesh size {sizes[name]} for axis {name!r} must be positive or -1")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"--mesh may fill only one axis with -1, not {', '.join(fill)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"--mesh {spec!r}: {num_devices} devices do not divide into the fixed sizes' product {known}"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"--mesh {spec!r} covers {known} devices but {num_devices} are present")
    return {name: sizes.get(name, 1) for name in AXES}


def make_mesh(spec: str = "", devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

    ``tensor`` is the innermost axis so that its collectives stay between
    neighbouring devices, the ones with the fastest links. In a multi-process
    run the default covers every process's devices. On CPU and GPU
    ``jax.devices()`` lists them process by process, so each process owns a
    contiguous block of the outer axes (``data``, then ``fsdp``) and of every
    batch; on TPU ``jax.make_mesh`` follows the chips' topology instead.
    Either way :func:`process_rows` names the batch rows a process loads.
    """
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[name] for name in AXES)
    # Auto axes: the compiler propagates shardings from the parameters and the
    # logical constraints in the model; nothing is typed into the arrays.
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if list(devices) == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=axis_types)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


def process_rows(batch_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
    """The rows of a global batch of ``batch_size`` that this process's devices hold.

    In the order ``jax.make_array_from_process_local_data`` reads a process's
    data, so ``batch[process_rows(B, mesh)]`` is what this process loads.
    Usually that is a contiguous ``B // process_count`` rows (all of them on
    one process); where a process's devices hold the whole batch (a mesh whose
    ``data`` and ``fsdp`` axes do not span the processes), it loads all of it.
    """
    sharding = named_sharding(("batch",), (batch_size,), mesh)
    spans = {
        (index[0].start or 0, index[0].stop or batch_size)
        for index in sharding.addressable_devices_indices_map((batch_size,)).values()
    }
    return np.concatenate([np.arange(start, stop) for start, stop in sorted(spans)])
