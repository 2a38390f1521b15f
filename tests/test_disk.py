"""mtl.disk: a full disk or a read-only folder is one line, checked before writing where it can be known."""

import errno
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest

from mtl import disk
from mtl.config import UsageError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_disk_errors_are_found_in_what_the_writers_raise():
    assert disk.disk_error(OSError(errno.ENOSPC, "x")) == os.strerror(errno.ENOSPC)
    try:  # tensorstore's words, wrapped by Orbax
        try:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write 188577 bytes: No space [os_error_code='28']")
        except ValueError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk.disk_error(outer) == os.strerror(errno.ENOSPC)
    assert disk.disk_error(ValueError("Read-only [os_error_code=30]")) == os.strerror(errno.EROFS)
    assert disk.disk_error(ValueError("shape mismatch")) is None
    assert disk.disk_error(OSError(errno.ENOENT, "gone")) is None


def _statvfs(flag=0, free_blocks=10**9):
    return lambda path: types.SimpleNamespace(f_flag=flag, f_bavail=free_blocks, f_frsize=4096)


def test_a_read_only_or_full_folder_is_refused_before_writing(tmp_path, monkeypatch):
    target = tmp_path / "a" / "run"  # not there yet: its nearest existing parent decides
    disk.check_writable(target, 10**6)
    monkeypatch.setattr(os, "statvfs", _statvfs(flag=os.ST_RDONLY))
    with pytest.raises(UsageError, match=rf"^--out {str(target)!r} is on a read-only filesystem"):
        disk.check_writable(target)
    monkeypatch.setattr(os, "statvfs", _statvfs(free_blocks=100))  # 409.6 kB
    with pytest.raises(UsageError, match=r"has 409.6 kB free, less than the 3.0 MB its checkpoints need"):
        disk.check_writable(target, 3 * 10**6)
    assert not (tmp_path / "a").exists()


def test_orbax_threads_logging_a_disk_error_are_dropped():
    quiet = disk.QuietDiskErrors()
    record = logging.LogRecord("absl", logging.ERROR, "", 0, "write failed [os_error_code='28']", None, None)
    assert not quiet.filter(record)
    record = logging.LogRecord("absl", logging.ERROR, "", 0, "Failed to run 5 Handler Commit operations", None, None)
    assert quiet.filter(record)
    record.exc_info = (OSError, OSError(errno.ENOSPC, "full"), None)
    assert not quiet.filter(record)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MB tmpfs (room for the pre-check, not for the run), where this user may mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?); the unit tests above cover the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_up_mid_run_is_one_line_and_exit_2(small_tmpfs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "train.py"), "--tasks", "langid", "--steps", "6", "--batch-size", "8"]
    command += ["--set", "train.checkpoint_every=1", "--set", "train.eval_examples=4"]
    result = subprocess.run([*command, "--out", str(small_tmpfs / "run")], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if "train.py:" in x or "Traceback" in x or "ERROR" in x]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line == (
        f"train.py: error: --out {str(small_tmpfs / 'run')!r} cannot be written: No space left on device; "
        "make room and run the same command"
    )
    assert "Event loop is closed" not in result.stderr
