"""The cache root (--cache-dir, then MTL_CACHE_DIR, then XDG_CACHE_HOME, then ~/.cache), that its folders are
private, and that a second process reads the programs the first compiled."""

import os
import pathlib
import stat
import subprocess
import sys

import pytest

from mtl import cache_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_override_then_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir.root(tmp_path / "flag") == tmp_path / "flag"
    assert cache_dir.root() == tmp_path / "env"
    assert cache_dir.data_dir() == tmp_path / "env" / "data"
    assert cache_dir.jax_dir() == tmp_path / "env" / "jax"
    monkeypatch.delenv("MTL_CACHE_DIR")
    assert cache_dir.root() == tmp_path / "xdg" / "mtl"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec: a relative path is ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir.root() == pathlib.Path(tmp_path / "home" / ".cache" / "mtl")


def test_the_test_session_never_caches_in_the_users_home():
    assert not str(cache_dir.root()).startswith(str(pathlib.Path.home() / ".cache"))


def test_off_turns_the_caches_off(monkeypatch, tmp_path):
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path))
    assert not cache_dir.is_off()
    assert cache_dir.is_off("off") and cache_dir.is_off("None")
    monkeypatch.setenv("MTL_CACHE_DIR", "OFF")
    assert cache_dir.is_off() and not cache_dir.is_off(tmp_path)  # the flag wins over the environment
    assert cache_dir.enable_compilation_cache() is None


def test_folders_are_made_private(tmp_path):
    path = cache_dir.private_folder(tmp_path / "a" / "root")
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o775, 0o777])
def test_a_folder_others_may_write_is_not_used(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(cache_dir.UnsafeCacheDir, match=f"'{shared}' may be written by others"):
        cache_dir.private_folder(shared)
    lines = []
    assert cache_dir.enable_compilation_cache(shared, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("compilation cache off: ") and "chmod 700" in lines[0]
    assert not (shared / "jax").exists()


def test_a_file_in_its_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    lines = []
    assert cache_dir.enable_compilation_cache(tmp_path / "file" / "x", log=lines.append) is None
    assert len(lines) == 1 and "compilation cache off" in lines[0] and "cannot be made" in lines[0]


# Compiles one program with the cache on; prints the folder and how many programs came from the cache.
COMPILE = """
import jax, jax.numpy as jnp
from jax._src import monitoring
from mtl import cache_dir
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
print(cache_dir.enable_compilation_cache())
jax.jit(lambda x: jnp.sin(x) * 3 + x.sum()).lower(jnp.ones(7)).compile()
print(len(hits))
"""


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    env = {**os.environ, "MTL_CACHE_DIR": str(tmp_path / "c"), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)

    def run():
        out = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    folder, hits = run()
    assert folder == str(tmp_path / "c" / "jax") and hits == "0"
    assert stat.S_IMODE(pathlib.Path(folder).stat().st_mode) == 0o700
    assert any(p.name.endswith("-cache") for p in pathlib.Path(folder).iterdir())
    assert int(run()[1]) >= 1  # the programs came from the cache
