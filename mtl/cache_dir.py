"""Where mtl keeps what it can rebuild: tokenized task data and compiled programs.

One root for every cache, so a user clears or moves them all at once:
``MTL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mtl``, else ``~/.cache/mtl``.
Each kind of cache has its own folder under it: ``data/`` (tokenized task
files, :mod:`tasks.cache`) and ``jax/`` (compiled programs).
"""

from __future__ import annotations

import os
import pathlib

ENV = "MTL_CACHE_DIR"


def root(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache root: ``override`` (``--cache-dir``), else ``MTL_CACHE_DIR``, else the user's cache folder."""
    if override:
        return pathlib.Path(override).expanduser()
    if os.environ.get(ENV):
        return pathlib.Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "mtl"


def data_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of tokenized task data: ``ROOT/data``."""
    return root(override) / "data"


def jax_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of JAX's compiled programs: ``ROOT/jax``."""
    return root(override) / "jax"
