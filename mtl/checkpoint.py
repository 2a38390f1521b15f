"""Orbax checkpoints of a run: model, optimizer state and metadata.

A run folder holds ``checkpoints/<step>/`` with three items: ``model`` (the
parameters, all the server needs), ``optimizer`` and ``meta`` (JSON: the
resolved config, the tasks with their label sets, the step and the sampler
position). Saves are asynchronous: ``save`` returns once the arrays are copied
off the devices and the files are written in the background. A checkpoint is
complete only once Orbax has renamed its temporary folder, so a run killed
mid-save resumes from the previous one.

Restores take an abstract target whose leaves carry the shardings wanted now,
so a checkpoint saved on one mesh loads onto any other.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


class Checkpoints:
    """The checkpoints folder of one run."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        # A reader never saves, so it needs no read-only mode (whose warnings
        # name the folder on every load): it just creates and deletes nothing.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, model: nnx.State, optimizer: nnx.State, meta: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(_pure(model)),
                optimizer=ocp.args.StandardSave(_pure(optimizer)),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(
        self, step: int, model: nnx.State, optimizer: nnx.State | None = None
    ) -> tuple[nnx.State, nnx.State | None, dict[str, Any]]:
        """Restores into abstract targets (leaves: ShapeDtypeStruct with a sharding).

        Pass ``optimizer=None`` to read only the parameters, as a server does.
        """
        items = {"model": ocp.args.StandardRestore(_pure(model)), "meta": ocp.args.JsonRestore()}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_pure(optimizer))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        nnx.replace_by_pure_dict(model, restored["model"])
        if optimizer is not None:
            nnx.replace_by_pure_dict(optimizer, restored["optimizer"])
        return model, optimizer, dict(restored["meta"])

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def find(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """Resolves ``--ckpt``: a run folder (its newest checkpoint) or one step's folder.

    Raises:
      ValueError: no complete checkpoint is there.
    """
    path = pathlib.Path(path)
    if path.is_dir() and path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if folder.is_dir():
        steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "meta").exists())
        if steps:
            return folder, steps[-1]
    raise ValueError(f"--ckpt {str(path)!r} holds no complete checkpoint (expected a run folder or checkpoints/<step>)")
