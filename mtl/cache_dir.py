"""Where mtl keeps what it can rebuild: tokenized task data and compiled programs.

One root for every cache, so a user clears or moves them all at once:
``--cache-dir DIR`` (``train.py``, ``serve.py``), else ``MTL_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/mtl``, else ``~/.cache/mtl``. Each kind of cache has its own
folder under it: ``data/`` (tokenized task files, :mod:`tasks.cache`) and
``jax/`` (compiled programs, :func:`enable_compilation_cache`). The value
``off`` (:func:`is_off`) turns the caches off.

A cache of compiled programs is trusted: JAX loads programs from it and runs
them, so anyone who can write the folder can run code in the process. Its
folders are made private to the user (mode 0700), and one that another user
owns or that others may write is not used (:func:`private_folder`).
"""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Callable

ENV = "MTL_CACHE_DIR"
OFF = ("off", "none")  # --cache-dir off, MTL_CACHE_DIR=off: no cache
MAX_JAX_BYTES = 4 << 30  # compiled programs kept; beyond, the least recently used are removed
HELP = (
    "mtl's cache folder: tokenized task files in its data/, compiled programs in its jax/ "
    "(default: $MTL_CACHE_DIR, else ~/.cache/mtl); off: none"
)


def root(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache root: ``override`` (``--cache-dir``), else ``MTL_CACHE_DIR``, else the user's cache folder."""
    if override:
        return pathlib.Path(override).expanduser()
    if os.environ.get(ENV):
        return pathlib.Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "mtl"


def is_off(override: str | os.PathLike | None = None) -> bool:
    """Whether caching is turned off: ``--cache-dir off`` or ``MTL_CACHE_DIR=off`` (``none`` too)."""
    value = override or os.environ.get(ENV) or ""
    return str(value).strip().lower() in OFF


def data_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of tokenized task data: ``ROOT/data``."""
    return root(override) / "data"


def jax_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of JAX's compiled programs: ``ROOT/jax``."""
    return root(override) / "jax"


class UnsafeCacheDir(ValueError):
    """A cache folder another user owns or others may write: loading code from it would run theirs."""


def private_folder(path: pathlib.Path) -> pathlib.Path:
    """Makes ``path`` and its missing parents with mode 0700, and checks it is the user's alone.

    Raises:
      UnsafeCacheDir: it is not a folder, another user owns it, or group or others may write it.
      OSError: it cannot be made.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheDir(f"cache folder {str(path)!r} is not a folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeCacheDir(f"cache folder {str(path)!r} belongs to another user; use a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDir(
            f"cache folder {str(path)!r} may be written by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"make it private with chmod 700, or choose another with --cache-dir or {ENV}"
        )
    return path


def enable_compilation_cache(
    override: str | os.PathLike | None = None, log: Callable[[str], object] = print
) -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache in ``ROOT/jax``; returns that folder, or None when off.

    Every program is kept, however quickly it compiled, so that a second start
    compiles nothing. With several processes of one run (``jax.distributed``)
    every one reads the cache and only process 0 writes it, as JAX does by
    itself; separate processes sharing the folder take turns through its lock
    file, which the size bound (:data:`MAX_JAX_BYTES`, least recently used
    entries removed first) turns on. A folder that cannot be made or is not
    private is one line through ``log``, and the process runs without the cache.
    """
    if is_off(override):
        return None
    try:
        private_folder(root(override))
        path = private_folder(jax_dir(override))
    except UnsafeCacheDir as e:
        log(f"compilation cache off: {e}")
        return None
    except OSError as e:
        log(f"compilation cache off: {str(e.filename)!r} cannot be made: {e.strerror}")
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", MAX_JAX_BYTES)
    return path
