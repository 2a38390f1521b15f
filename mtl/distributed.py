"""Joining a ``jax.distributed`` cluster: one process per host (or per GPU).

Every process runs the same program on its own devices; together they form
one global device list, one mesh and one global batch. :func:`settings` reads
the cluster from flags, ``MTL_`` variables or the launcher's environment, and
:func:`join` initialises JAX with it before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The multi-process run this process joins; ``None`` values are JAX's to detect from the launcher."""

    coordinator: str | None  # process 0's HOST:PORT
    num_processes: int | None
    process_id: int | None


FLAGS = ("--coordinator", "--num-processes", "--process-id")


def settings(
    coordinator: str | None = None,
    num_processes: str | None = None,
    process_id: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Cluster | None:
    """The cluster this process joins, or ``None`` to run alone.

    Each value comes from its flag (the arguments, as typed), else its
    variable: ``MTL_COORDINATOR`` (or JAX's own ``JAX_COORDINATOR_ADDRESS``),
    ``MTL_NUM_PROCESSES``, ``MTL_PROCESS_ID``. With none of them set, a
    process joins a cluster only when its launcher announces one
    (:func:`launcher`), and JAX reads every value from the launcher.
    ``--num-processes 1`` runs alone, whatever the environment says.

    Raises:
      ValueError: a malformed address, count or id, or a cluster described by
        halves (a count but no coordinator, say) with no launcher to fill in the rest.
    """
    flags = dict(zip(FLAGS, (coordinator, num_processes, process_id)))

    def pick(flag: str, *variables: str) -> tuple[str, str | None]:
        if flags[flag] is not None:
            return flag, flags[flag]
        for name in variables:
            if environ.get(name):
                return name, environ[name]
        return flag, None

    def shown(source: str, value) -> str:
        return f"{source} {value!r}" if source.startswith("--") else f"{source}={value!r}"

    def integer(source: str, text: str | None, least: int, what: str) -> int | None:
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise ValueError(f"{shown(source, text)} must be {what}")
        return value

    coordinator_from, coordinator = pick("--coordinator", "MTL_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    count_from, count_text = pick("--num-processes", "MTL_NUM_PROCESSES")
    id_from, id_text = pick("--process-id", "MTL_PROCESS_ID")
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{shown(coordinator_from, coordinator)} must be HOST:PORT, process 0's host and a free port, "
                "e.g. 10.0.0.1:8476"
            )
    count = integer(count_from, count_text, 1, "the number of processes, a positive integer")
    index = integer(id_from, id_text, 0, "this process's index, an integer from 0")
    if count is not None and index is not None and index >= count:
        raise ValueError(
            f"{shown(id_from, id_text)} must be below {shown(count_from, count_text)}: ids run from 0 to {count - 1}"
        )
    if count == 1:
        return None
    values = {coordinator_from: coordinator, count_from: count_text, id_from: id_text}
    given = [shown(source, value) for source, value in values.items() if value is not None]
    if not given:
        return Cluster(None, None, None) if launcher(environ) else None
    missing = [flag for flag, value in zip(FLAGS, values.values()) if value is None]
    if missing and not launcher(environ):
        raise ValueError(
            f"{given[0]} starts a multi-process run, which also needs {' and '.join(missing)} "
            "(or its MTL_ variable) where no SLURM, Open MPI or Cloud TPU launcher supplies it"
        )
    return Cluster(coordinator, count, index)


def launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process launcher this process runs under, if JAX can read the cluster from it.

    The environments ``jax.distributed.initialize()`` detects on its own:
    SLURM's ``srun`` and Open MPI's ``mpirun`` (with more than one task), and
    Cloud TPU VMs (one host or a pod slice; JAX asks the metadata server).
    """
    if "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ and _int(environ.get("SLURM_NTASKS")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    if any(environ.get(v) for v in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "Cloud TPU (GKE)"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "Cloud TPU VM"
    return None


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def join(cluster: Cluster) -> None:
    """Initialises ``jax.distributed``; call it before anything touches a device.

    Raises:
      ValueError: JAX could not complete the cluster's description, or did not reach the coordinator.
    """
    # CPU devices reach other processes only through a collectives library; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot join the multi-process run: {e}") from None
    except jax.errors.JaxRuntimeError as e:
        where = cluster.coordinator or "the launcher's coordinator"
        raise ValueError(f"cannot join the multi-process run at {where}: {str(e).splitlines()[0]}") from None


def sync(name: str) -> None:
    """Waits for every process to get here (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
