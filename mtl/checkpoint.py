"""Orbax checkpoints of a run: model, optimizer state and metadata.

A run folder holds ``checkpoints/<step>/`` with three items: ``model`` (the
parameters, all the server needs), ``optimizer`` and ``meta`` (JSON: the
resolved config, the tasks with their label sets, the step and the sampler
position). Saves are asynchronous: ``save`` returns once the arrays are copied
off the devices and the files are written in the background. A checkpoint is
complete only once Orbax has renamed its temporary folder, so a run killed
mid-save resumes from the previous one.

Restores take an abstract target whose leaves carry the shardings wanted now,
so a checkpoint saved on one mesh loads onto any other. A checkpoint damaged
after it was written (a truncated data file, a deleted ``manifest.ocdbt`` or
metadata file) is skipped by :func:`restore_newest`, which training and serving
both call: it falls back to the newest checkpoint that restores, with a
one-line warning naming what was skipped and why. Damage that leaves the files
readable (a flipped bit) is caught by the checksums of :mod:`mtl.checksums`:
``save`` records one per array in ``meta``, and ``restore`` and ``read_meta``
verify them, raising :class:`~mtl.checksums.ChecksumError`. A checkpoint saved
before checksums were recorded restores unverified.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orbax.checkpoint as ocp
from flax import nnx

from mtl import checksums
from mtl.config import UsageError

T = TypeVar("T")

# The files every complete checkpoint holds, by item (optimizer: only in a training checkpoint).
REQUIRED_FILES = {
    ".": ("_CHECKPOINT_METADATA",),
    "model": ("_METADATA", "manifest.ocdbt"),
    "optimizer": ("_METADATA", "manifest.ocdbt"),
    "meta": ("metadata",),
}


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
        model, optimizer = _pure(model), _pure(optimizer)
        # Digests come from the arrays as they are now: the next train step donates their buffers.
        sums = {
            "algorithm": checksums.ALGORITHM,
            "meta": checksums.meta_digest(meta),
            "model": checksums.tree_digests(model),
            "optimizer": checksums.tree_digests(optimizer),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model),
                optimizer=ocp.args.StandardSave(optimizer),
                meta=ocp.args.JsonSave({**meta, CHECKSUMS: sums}),
            ),
        )

    def restore(
        self, step: int, model: nnx.State, optimizer: nnx.State | None = None
    ) -> tuple[nnx.State, nnx.State | None, dict[str, Any]]:
        """Restores into abstract targets (leaves: ShapeDtypeStruct with a sharding).

        Pass ``optimizer=None`` to read only the parameters, as a server does.

        Raises:
          ChecksumError: an array or the metadata differs from what was saved.
        """
        items = {"model": ocp.args.StandardRestore(_pure(model)), "meta": ocp.args.JsonRestore()}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_pure(optimizer))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta, sums = _checked_meta(restored["meta"])
        for item in ("model", "optimizer") if optimizer is not None else ("model",):
            checksums.verify(restored[item], sums.get(item, {}), item)
        nnx.replace_by_pure_dict(model, restored["model"])
        if optimizer is not None:
            nnx.replace_by_pure_dict(optimizer, restored["optimizer"])
        return model, optimizer, meta

    def read_meta(self, step: int) -> dict[str, Any]:
        """Reads a checkpoint's metadata alone (verified against its checksum)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return _checked_meta(restored["meta"])[0]

    def reload(self) -> None:
        """Reads the folder's steps again (after another process or :func:`set_aside` changed it)."""
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


CHECKSUMS = "checksums"  # the entry of ``meta`` that holds them


def _checked_meta(restored: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata as saved (less its checksums) and the checksums, once the metadata's own is verified."""
    meta = dict(restored)
    sums = meta.pop(CHECKSUMS, None) or {}
    if "meta" in sums and checksums.meta_digest(meta) != sums["meta"]:
        raise checksums.ChecksumError("meta does not match the checksum saved with it")
    return meta, sums


def complete_steps(folder: str | pathlib.Path) -> list[int]:
    """The steps of ``folder`` whose save finished (Orbax renamed them into place), oldest first."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "meta").exists())


def find(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """Resolves ``--ckpt``: a run folder (its newest checkpoint) or one step's folder.

    Raises:
      ValueError: no complete checkpoint is there.
    """
    folder, steps = candidates(path)
    return folder, steps[-1]


def candidates(path: str | pathlib.Path) -> tuple[pathlib.Path, list[int]]:
    """``--ckpt``'s checkpoints folder and the steps to try, oldest first (one, for a step's folder).

    Raises:
      ValueError: no complete checkpoint is there.
    """
    path = pathlib.Path(path)
    if path.is_dir() and path.name.isdigit() and (path / "meta").exists():
        return path.parent, [int(path.name)]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if steps := complete_steps(folder):
        return folder, steps
    raise ValueError(f"--ckpt {str(path)!r} holds no complete checkpoint (expected a run folder or checkpoints/<step>)")


def missing_files(step_dir: str | pathlib.Path, optimizer: bool = False) -> str | None:
    """What a checkpoint folder lacks of a complete checkpoint's files, as a phrase; None if nothing."""
    step_dir = pathlib.Path(step_dir)
    for item, names in REQUIRED_FILES.items():
        if item == "optimizer" and not optimizer:
            continue
        for name in names:
            if not (step_dir / item / name).is_file():
                return f"{item}/{name} is missing" if item != "." else f"{name} is missing"
    return None


def restore_newest(
    directory: str | pathlib.Path,
    steps: Sequence[int],
    restore: Callable[[int], T],
    warn: Callable[[str], None],
    optimizer: bool = False,
) -> tuple[int, T, list[int]]:
    """Restores the newest checkpoint that restores, walking back past damaged ones.

    Args:
      directory: the checkpoints folder (``RUN/checkpoints``).
      steps: the steps to try, in any order; the newest is tried first.
      restore: restores one step (raising if it cannot); its result is returned.
      warn: called with one line for each step skipped for an older one, naming it and why.
      optimizer: the checkpoints must hold the optimizer state too (training).

    Returns:
      (the step restored, what ``restore`` returned, the steps skipped).

    Raises:
      UsageError: ``restore`` raised one (a mesh that does not fit, say): it is no damage.
      ValueError: no step restores; the message names each step (or the one) and its reason.
    """
    directory = pathlib.Path(directory)
    skipped, reasons = [], []
    for step in sorted(steps, reverse=True):
        reason = missing_files(directory / str(step), optimizer)
        if reason is None:
            try:
                return step, restore(step), skipped
            except UsageError:
                raise
            except Exception as e:  # orbax and tensorstore raise many types for a damaged file
                reason = _first_line(e)
        if older := [s for s in steps if s < step]:  # with none left, the error below says it all in one line
            where = directory / str(step)
            warn(f"warning: checkpoint {where} cannot be restored ({reason}); falling back to step {max(older)}")
        skipped.append(step)
        reasons.append(f"step {step}: {reason}")
    if len(skipped) == 1:
        raise ValueError(f"checkpoint {str(directory / str(skipped[0]))!r} cannot be restored ({reason})")
    raise ValueError(f"no checkpoint in {str(directory)!r} restores ({'; '.join(reasons) or 'there are none'})")


def set_aside(directory: str | pathlib.Path, step: int) -> pathlib.Path:
    """Renames a damaged step folder to ``damaged-STEP`` (kept for a post-mortem; no longer a step)."""
    directory = pathlib.Path(directory)
    target = directory / f"damaged-{step}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"damaged-{step}.{n}"
    (directory / str(step)).rename(target)
    return target


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
