"""The cache root: --cache-dir, then MTL_CACHE_DIR, then XDG_CACHE_HOME, then ~/.cache."""

import pathlib

from mtl import cache_dir


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
