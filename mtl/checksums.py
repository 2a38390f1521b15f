"""Checksums of a checkpoint's arrays, recorded at save and verified at restore.

Orbax writes arrays as zstd frames without a content checksum, so a bit flipped
on disk after the save (a bad sector, a copy gone wrong) restores silently as a
wrong weight. Each array's digest is therefore recorded in the checkpoint's
``meta`` item, written in the same atomic commit as the arrays, and every
restore recomputes it from the arrays it got, one array at a time.

The digest is xxHash's XXH3-64 of the array's bytes in C order, with its dtype
and shape: it depends on the values alone, never on the mesh, so a checkpoint
saved on one mesh verifies on any other. XXH3 rather than CRC32C: it is 64 bits
(CRC32C's 32 let one damaged array in 4 billion pass), about three times as fast
here (6.2 GB/s against google-crc32c's 2.0 GB/s on this 2-core machine), and the
``xxhash`` wheel is already installed as a dependency of ``datasets``.

An array that this process cannot see whole (a multi-process run's sharded
array) gets no digest; :func:`verify` then checks the arrays it can.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import xxhash

ALGORITHM = "xxh3_64"


class ChecksumError(ValueError):
    """A restored array or the checkpoint's metadata differs from what was saved."""


def digest(x: Any) -> str | None:
    """``DTYPE[SHAPE]:HEX`` of one array, or None if this process holds only part of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    a = np.asarray(x)
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape [1])
        a = a.copy(order="C")
    shape = ",".join(map(str, a.shape))
    return f"{a.dtype.name}[{shape}]:{xxhash.xxh3_64_hexdigest(a.reshape(-1).view(np.uint8))}"


def tree_digests(tree: Any) -> dict[str, str]:
    """The digest of each array of a pytree, by its path (``blocks/attn/w_dnh``)."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if (d := digest(leaf)) is not None:
            found[_name(path)] = d
    return found


def verify(tree: Any, recorded: dict[str, str], item: str) -> None:
    """Checks each array of ``tree`` that has a recorded digest, one at a time.

    Raises:
      ChecksumError: an array differs from the one saved, naming it.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _name(path)
        want = recorded.get(name)
        if want is None:
            continue
        got = digest(leaf)
        if got is not None and got != want:
            raise ChecksumError(f"{item} array {name} does not match the checksum saved with it")


def meta_digest(meta: dict[str, Any]) -> str:
    """The digest of the metadata itself (its JSON with sorted keys), so a flipped label or step shows too."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(text.encode())


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
